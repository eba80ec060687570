"""Tensor-parallel plans for torchtune decoders (module paths → ``ParallelStyle``).

Every plan leaves block outputs and the final hidden states as plain, replicated local
tensors (``use_local_output``), so ``final_hidden`` works unchanged under TP and the loss sees
the same [B, S, D] tensor on every TP rank.

The output projection: the policy loss projects hidden states itself with
``output_weight(model).full_tensor()``, so its sharding only saves memory between steps.
With tied embeddings (Qwen2.5 ≤ 3B, Llama 3.2) the table is sharded by vocabulary rows as the
embedding and there is no separate output module to parallelize; untied models shard the
output layer by vocabulary columns, which also keeps ``model(tokens)`` returning full logits.
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.parallel.style import ParallelStyle


def qwen2_tp_plan() -> dict[str, ParallelStyle]:
    """Qwen2 / Qwen2.5. Like Llama's, except that q/k/v carry biases, which
    ``ColwiseParallel`` shards with their weights (bias rows follow output features)."""
    return {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),
        "layers.*.attn.q_proj": ColwiseParallel(),
        "layers.*.attn.k_proj": ColwiseParallel(),
        "layers.*.attn.v_proj": ColwiseParallel(),
        "layers.*.attn.output_proj": RowwiseParallel(),
        "layers.*.mlp.w1": ColwiseParallel(),
        "layers.*.mlp.w2": RowwiseParallel(),
        "layers.*.mlp.w3": ColwiseParallel(),
    }


def llama3_tp_plan() -> dict[str, ParallelStyle]:
    """Llama 3.x: torchtune's own plan."""
    from torchtune.models.llama3._parallelism import base_llama_tp_plan

    return dict(base_llama_tp_plan())


_PLANS = {"qwen2": qwen2_tp_plan, "llama3": llama3_tp_plan}


def get_tp_plan(
    model_family: str, *, tie_word_embeddings: bool = False
) -> dict[str, ParallelStyle]:
    """The plan for ``model_family`` ("qwen2" or "llama3"); tied models drop the ``output``
    entry (their output layer is the embedding table, already sharded as ``tok_embeddings``)."""
    if model_family not in _PLANS:
        raise ValueError(
            f"model_family {model_family!r} has no tensor-parallel plan; known: {sorted(_PLANS)}"
        )
    plan = _PLANS[model_family]()
    if tie_word_embeddings:
        del plan["output"]
    return plan
