"""Trainer parallelism: process group and 2-D (dp_shard × tp) mesh, tensor-parallel plans,
and ``parallelize_model`` (TP → activation checkpointing → compile → FSDP2)."""

from simko_tune.parallel.apply import (
    apply_ac,
    apply_compile,
    apply_fsdp,
    apply_tp,
    full_output_weight,
    hidden_states,
    load_rank0_state_dict,
    parallelize_model,
)
from simko_tune.parallel.mesh import (
    ParallelDims,
    all_reduce_sum,
    clip_grad_norm_,
    init_distributed,
    shutdown_distributed,
)
from simko_tune.parallel.tp_plans import get_tp_plan

__all__ = [
    "ParallelDims",
    "all_reduce_sum",
    "apply_ac",
    "apply_compile",
    "apply_fsdp",
    "apply_tp",
    "clip_grad_norm_",
    "full_output_weight",
    "get_tp_plan",
    "hidden_states",
    "init_distributed",
    "load_rank0_state_dict",
    "parallelize_model",
    "shutdown_distributed",
]
