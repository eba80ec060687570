"""One training step of a tiny model, run as a torchrun rank (or as one plain process for the
reference). Rank 0 writes the global loss, the full gradients and the AdamW-updated full
parameters to ``--out``.

The loss is the plain per-token negative log-likelihood of the targets, projected from
``hidden_states`` with the gathered output weight and divided by the all-reduced token count;
each data-parallel rank holds a different, uneven slice of one global batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from simko_tune.models import model_from_hf_config, output_weight, read_hf_config
from simko_tune.parallel import (
    ParallelDims,
    all_gather_object,
    all_reduce_sum,
    exit_without_teardown,
    full_output_weight,
    hidden_states,
    hostnames,
    init_distributed,
    parallelize_model,
    reshard,
    set_gradient_sync,
    shutdown_distributed,
)

GLOBAL_BATCH = 5
SEQ_LEN = 12
LENGTHS = (12, 7, 10, 4, 9)  # valid tokens per row, right padded
DP_SLICES = {1: [(0, 5)], 2: [(0, 2), (2, 5)]}  # uneven rows per data-parallel rank
# eps well above the noise of near-zero gradients (k biases: softmax ignores them); the
# tests derive the parameters' tolerance from these (``adam_first_step_tolerance``).
ADAM_LR, ADAM_EPS, ADAM_WEIGHT_DECAY = 1e-2, 1e-4, 0.01


def build_model(spec: str) -> torch.nn.Module:
    """``qwen2:<hf dir>`` (tied, weights loaded) or ``llama3`` (untied, seeded init)."""
    if spec.startswith("qwen2:"):
        from safetensors.torch import load_file
        from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

        model_dir = spec.split(":", 1)[1]
        cfg = read_hf_config(model_dir)
        model = model_from_hf_config(model_dir, max_seq_len=64)
        state = qwen2_hf_to_tune(
            load_file(os.path.join(model_dir, "model.safetensors")),
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg["num_key_value_heads"],
            dim=cfg["hidden_size"],
            tie_word_embeddings=cfg["tie_word_embeddings"],
        )
        model.load_state_dict(state)
        return model
    if spec == "llama3":
        from torchtune.models.llama3_2 import llama3_2

        torch.manual_seed(0)
        return llama3_2(
            vocab_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            embed_dim=64,
            intermediate_dim=128,
            max_seq_len=64,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown model spec {spec!r}")


def global_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
    valid = torch.arange(SEQ_LEN - 1)[None, :] < (torch.tensor(LENGTHS)[:, None] - 1)
    return tokens, valid


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def train_step(
    model_spec: str,
    family: str,
    dp: int = -1,
    tp: int = 1,
    ac: bool = False,
    compile_blocks: bool = False,
    mixed_precision: str | None = None,
    micro_batches: int = 1,
) -> dict | None:
    """One AdamW step; rank 0 (or the single process) returns the results. With several
    ``micro_batches`` each rank splits its rows and syncs gradients on the last one only."""
    rank, _ = init_distributed()
    mesh = ParallelDims(dp_shard=dp, tp=tp).build_mesh("cpu")
    model = build_model(model_spec)
    parallelize_model(
        model,
        mesh,
        model_family=family,
        activation_checkpointing=ac,
        compile_blocks=compile_blocks,
        mixed_precision=mixed_precision,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=ADAM_LR, weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPS
    )

    dp_group = mesh["dp_shard"].get_group() if mesh is not None else None
    dp_rank = mesh["dp_shard"].get_local_rank() if mesh is not None else 0
    dp_size = mesh["dp_shard"].size() if mesh is not None else 1
    tokens, valid = global_batch(full(output_weight(model)).shape[0])
    lo, hi = DP_SLICES[dp_size][dp_rank]
    tokens, valid = tokens[lo:hi], valid[lo:hi]

    guard_raised = root_sharded(model)  # the FSDP guard: before hidden_states it raises
    token_count = all_reduce_sum(valid.sum(), group=dp_group)
    loss = torch.zeros(())
    held = []  # after each deferred backward: are the gathered parameters kept?
    parts = torch.arange(len(tokens)).tensor_split(micro_batches)
    for i, rows in enumerate(parts):
        set_gradient_sync(model, i == len(parts) - 1)
        h = hidden_states(model, tokens[rows, :-1])
        weight = full_output_weight(model)
        logp = F.log_softmax(h.float() @ weight.float().T, dim=-1)
        nll = -logp.gather(-1, tokens[rows, 1:, None]).squeeze(-1)
        part = (nll * valid[rows]).sum() / token_count
        part.backward()
        loss = loss + part.detach()
        if i < len(parts) - 1:
            held.append(not root_sharded(model))
    sharded_after_last = root_sharded(model)  # before the optimizer steps the shards

    grads = {clean(n): full(q.grad) for n, q in model.named_parameters()}
    optimizer.step()
    params = {clean(n): full(q) for n, q in model.named_parameters()}
    global_loss = all_reduce_sum(loss.detach(), group=dp_group)
    # a forward-only pass (the KL reference's) keeps the root unsharded until reshard()
    with torch.no_grad():
        hidden_states(model, tokens[:, :-1])
    root_kept = not root_sharded(model)
    reshard(model)
    root_freed = root_sharded(model)
    gathered = all_gather_object({"rank": rank})
    hosts = hostnames()
    if rank != 0:
        return None
    return {
        "loss": global_loss,
        "grads": grads,
        "params": params,
        "guard_raised": guard_raised,
        "held_between_micro_batches": held,
        "sharded_after_last": sharded_after_last,
        "root_kept_after_forward_only": root_kept,
        "root_freed_by_reshard": root_freed,
        "gathered": gathered,
        "hostnames": hosts,
    }


def root_sharded(model: torch.nn.Module) -> bool:
    """Whether the output weight is FSDP-sharded now (``full_output_weight`` raises)."""
    try:
        full_output_weight(model)
        return False
    except RuntimeError:
        return True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--family", required=True)
    p.add_argument("--dp", type=int, default=-1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ac", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--mixed-precision", default=None)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    result = train_step(
        args.model,
        args.family,
        args.dp,
        args.tp,
        args.ac,
        args.compile,
        args.mixed_precision,
        args.micro_batches,
    )
    shutdown_distributed()
    if result is not None:
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
    exit_without_teardown(0)  # everything is checked and written by now
