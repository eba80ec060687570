"""Trainer parallelism: process groups and the collectives the loop uses, the 2-D
(dp_shard × tp) mesh, tensor-parallel plans, and ``parallelize_model`` (TP → activation
checkpointing → compile → FSDP2)."""

from simko_tune.parallel.apply import (
    apply_ac,
    apply_compile,
    apply_fsdp,
    apply_tp,
    full_output_weight,
    hidden_states,
    load_rank0_state_dict,
    materialize,
    parallelize_model,
    reshard,
    set_gradient_sync,
)
from simko_tune.parallel.collectives import (
    all_gather_object,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    dp_coords,
    dp_group,
    exit_without_teardown,
    gather_to,
    hostnames,
    init_distributed,
    shutdown_distributed,
    unshard,
    wait_group,
)
from simko_tune.parallel.mesh import ParallelDims, clip_grad_norm_, cpu_threads
from simko_tune.parallel.microbatch import micro_batches, row_lengths
from simko_tune.parallel.tp_plans import get_tp_plan

__all__ = [
    "ParallelDims",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_sum",
    "apply_ac",
    "apply_compile",
    "apply_fsdp",
    "apply_tp",
    "barrier",
    "broadcast_object",
    "clip_grad_norm_",
    "cpu_threads",
    "dp_coords",
    "dp_group",
    "exit_without_teardown",
    "full_output_weight",
    "gather_to",
    "get_tp_plan",
    "hidden_states",
    "hostnames",
    "init_distributed",
    "load_rank0_state_dict",
    "materialize",
    "micro_batches",
    "parallelize_model",
    "reshard",
    "row_lengths",
    "set_gradient_sync",
    "shutdown_distributed",
    "unshard",
    "wait_group",
]
