"""Apply tensor parallelism, activation checkpointing, per-block compile and FSDP2 to a
torchtune decoder, in that order (torchtitan's ``parallelize_llama`` shape).

Two conventions the training loop relies on:

- Gradients are SUMMED over data-parallel ranks, not averaged. The loss of each rank is
  already divided by the global token count (``all_reduce_sum`` over the dp group), so the sum
  of the ranks' gradients is the gradient of the global loss. FSDP2's division by the dp size
  is switched off (``set_gradient_divide_factor(1.0)`` with sum-only collectives).
- ``final_hidden`` skips ``model.forward``, but FSDP2's root hooks hang on it: they unshard the
  root's parameters (embedding, final norm, output projection), keep them unsharded through the
  loss, and queue the gradient reduction at the end of backward. ``apply_fsdp`` therefore
  registers ``final_hidden`` as an FSDP forward method of the model, and ``hidden_states`` is
  the entry point the loss calls: it runs that method on a sharded model and ``final_hidden``
  on a plain one. The loss then projects with ``full_output_weight(model)``.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module
from torchtune.modules import TransformerDecoder, TransformerSelfAttentionLayer
from torchtune.modules.tied_linear import TiedLinear

from simko_tune.models import final_hidden, output_weight
from simko_tune.parallel.collectives import unshard
from simko_tune.parallel.tp_plans import get_tp_plan

# Name of the FSDP forward method ``apply_fsdp`` binds on the model.
FSDP_HIDDEN_METHOD = "fsdp_final_hidden"

_PARAM_DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16}


def parallelize_model(
    model: TransformerDecoder,
    mesh: DeviceMesh | None,
    *,
    model_family: str,
    activation_checkpointing: bool,
    compile_blocks: bool,
    mixed_precision: str | None,
    reshard_after_forward: bool = True,
) -> TransformerDecoder:
    """Parallelize ``model`` in place over ``mesh`` (``ParallelDims.build_mesh``) and return it.

    ``mesh=None`` (one process, no torchrun) applies only checkpointing and compile.
    ``mixed_precision``: "bf16" (bf16 parameters in forward/backward, fp32 gradient reduction
    and fp32 master weights: the GPU setting), or None / "fp32" (the CPU setting).
    With a mesh, FSDP2 is always applied (also when ``dp_shard`` is 1) so that mixed precision
    and ``hidden_states`` behave the same for every layout.
    """
    if mixed_precision not in _PARAM_DTYPES:
        raise ValueError(
            f"mixed_precision must be one of {list(_PARAM_DTYPES)}, got {mixed_precision!r}"
        )
    if mesh is None and _PARAM_DTYPES[mixed_precision] is not None:
        raise ValueError(
            f"mixed_precision {mixed_precision!r} is applied by FSDP2: launch with torchrun "
            "(--nproc_per_node 1 for one device)"
        )
    if mesh is not None and mesh["tp"].size() > 1:
        apply_tp(model, mesh["tp"], model_family)
    if activation_checkpointing:
        apply_ac(model)
    if compile_blocks:
        apply_compile(model)
    if mesh is not None:
        apply_fsdp(model, mesh["dp_shard"], mixed_precision, reshard_after_forward)
    return model


def apply_tp(model: TransformerDecoder, tp_mesh: DeviceMesh, model_family: str) -> None:
    """Shard attention heads and MLP columns/rows over ``tp_mesh`` with the family's plan.

    Attention modules are told their local head counts first (torchtune's
    ``prepare_mha_for_tp``, which also checks that heads and KV heads divide by the TP size).
    """
    from torchtune.training import prepare_mha_for_tp

    tied = isinstance(model.output, TiedLinear)
    prepare_mha_for_tp(model, tp_mesh)
    parallelize_module(model, tp_mesh, get_tp_plan(model_family, tie_word_embeddings=tied))
    model.tok_embeddings.register_forward_hook(_materialize_collective)


def _materialize_collective(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """The row-parallel embedding returns its all-reduced output as an
    ``AsyncCollectiveTensor``; entering a compiled block as one, it silently loses its gradient
    path (torch 2.13, cf. pytorch/pytorch#179849) and the embedding gets no gradient. A
    clone waits for the collective and hands on a plain tensor that autograd connects."""
    return out.clone()


def apply_ac(model: TransformerDecoder) -> None:
    """Recompute each transformer block's activations in backward instead of storing them
    (torchtune's wrapper; state-dict keys are unchanged)."""
    from torchtune.training import set_activation_checkpointing

    set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})


def apply_compile(model: TransformerDecoder) -> None:
    """``torch.compile`` each transformer block in place: blocks share one graph, so this
    compiles once and keeps module names (and state-dict keys) as they are."""
    from torchtune.training import compile_model

    compile_model(model, verbose=False)


def apply_fsdp(
    model: TransformerDecoder,
    dp_mesh: DeviceMesh,
    mixed_precision: str | None,
    reshard_after_forward: bool,
) -> None:
    """Shard parameters over ``dp_mesh`` with FSDP2: one unit per transformer block, the root
    holding the embedding, final norm and output projection.

    Keeping the embedding in the root matters with tied weights: the root does not reshard
    after forward, so the table the loss projects with is the unsharded parameter whose
    gradient FSDP reduces, not a re-gathered copy whose gradient would skip the reduction.
    torchtune's ``shard_model`` builds the same units but takes no ``MixedPrecisionPolicy``,
    hence ``fully_shard`` directly.
    """
    policy = MixedPrecisionPolicy(
        param_dtype=_PARAM_DTYPES[mixed_precision],
        reduce_dtype=torch.float32 if _PARAM_DTYPES[mixed_precision] else None,
    )
    for block in model.layers:
        fully_shard(
            block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward
        )
    # The root keeps FSDP's default: no resharding after forward (see above).
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    setattr(model, FSDP_HIDDEN_METHOD, types.MethodType(final_hidden, model))
    register_fsdp_forward_method(model, FSDP_HIDDEN_METHOD)


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate a model built on the ``meta`` device on ``device`` (uninitialised; load
    weights next) and rebuild its computed buffers (RoPE caches) there too.

    ``to_empty`` leaves buffers uninitialised, and ``rope_init`` computes them with
    ``torch.arange``, which lands on the default device (CPU) unless a device context says
    otherwise: the first forward on CUDA would then fail. Works on parallelized models
    (FSDP2/TP parameters are DTensors; RoPE buffers stay plain, replicated tensors).
    """
    device = torch.device(device)
    model.to_empty(device=device)
    with torch.device(device), torch.no_grad():
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduces gradients over the data-parallel ranks (FSDP2).

    Off for all but the last micro-batch of a mini-batch, the reduce-scatter runs once per
    optimizer step instead of once per micro-batch; meanwhile each rank accumulates
    unsharded gradients (memory: one full gradient copy per rank, in the reduce dtype).
    The parameters gathered in that backward stay gathered too (FSDP2's
    ``set_reshard_after_backward``), so the next micro-batch's forward all-gathers nothing:
    one more unsharded copy of the parameters, in the compute dtype, between micro-batches.
    The last micro-batch (``enabled``) reshards them before the optimizer steps the shards.
    A no-op on a model that FSDP2 did not shard.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        model.set_reshard_after_backward(enabled)


def reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded parameters of ``model``. The root does not reshard after
    forward (see ``apply_fsdp``) and only backward reshards it, so a model that runs forward
    only (the KL reference) would otherwise keep its root's compute copy for good. A no-op
    on a model that FSDP2 did not shard."""
    if isinstance(model, FSDPModule):
        model.reshard()


def hidden_states(
    model: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor | None = None
) -> torch.Tensor:
    """``final_hidden(model, tokens)``, run inside FSDP2's root forward hooks when the model
    was sharded by ``parallelize_model``. The policy loss calls this, then projects with
    ``full_output_weight(model)``."""
    fsdp_forward = vars(model).get(FSDP_HIDDEN_METHOD)
    if fsdp_forward is None:
        return final_hidden(model, tokens, input_pos)
    return fsdp_forward(tokens, input_pos)


def full_output_weight(model: nn.Module) -> torch.Tensor:
    """The whole [V, D] output projection as a plain tensor, for a loss that projects
    ``hidden_states`` itself; gradients reach the model's parameter (and, under FSDP2, its
    data-parallel reduction).

    Under FSDP2 call it after ``hidden_states`` and before backward: only then is the weight the
    root's unsharded parameter. Outside that window it is the dp-sharded parameter, and
    gathering that would silently skip the gradient reduction, so this raises instead.
    Under TP the unsharded parameter is still split over the TP ranks: it is gathered here, and
    its gradient, identical on every TP rank (same data), goes back to each rank's shard.
    """
    weight = output_weight(model)
    if not isinstance(weight, DTensor):
        return weight
    if "dp_shard" in (weight.device_mesh.mesh_dim_names or ()):
        raise RuntimeError(
            "full_output_weight: the output weight is FSDP-sharded; call it after "
            "hidden_states(model, tokens) in the same forward, before backward"
        )
    return unshard(weight)


def load_rank0_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict that only rank 0 holds into a parallelized model.

    Rank 0 broadcasts one tensor at a time and every rank keeps its own slice, so a node's
    host memory holds one full copy of the weights, not one per rank. The other ranks pass
    ``{}``; all keys must match (strict).
    """
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, state, options=options)
