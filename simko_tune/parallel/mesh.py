"""Process group, device mesh and the one collective the loss needs.

The trainer's ranks form a 2-D mesh: ``dp_shard`` ranks hold different data and shard
parameters with FSDP2; the ``tp`` ranks of one data-parallel group hold the same data and
split each matmul. A single process started without torchrun has no process group and no mesh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE`` in the environment)
    and return ``(rank, world_size)``; ``(0, 1)`` with no process group when not under torchrun.

    The backend defaults to NCCL when CUDA is available, else gloo (CPU).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it.

    Without the barrier a rank that finishes first tears down its gloo pairs while a peer
    still has traffic in flight, and the peer aborts at exit ("terminate called without an
    active exception"). A no-op without a process group.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass
class ParallelDims:
    """Degrees of the 2-D mesh: ``dp_shard`` (FSDP2) × ``tp`` (tensor parallel).

    ``dp_shard = -1`` takes whatever the world size leaves after ``tp``.
    """

    dp_shard: int = -1
    tp: int = 1

    def resolve(self, world_size: int) -> tuple[int, int]:
        """``(dp_shard, tp)`` for ``world_size`` ranks; a clear error when they don't fit."""
        if self.tp < 1:
            raise ValueError(f"parallel.tp must be >= 1, got {self.tp}")
        if self.dp_shard == -1:
            if world_size % self.tp:
                raise ValueError(
                    f"parallel.tp ({self.tp}) must divide the world size ({world_size})"
                )
            return world_size // self.tp, self.tp
        if self.dp_shard < 1 or self.dp_shard * self.tp != world_size:
            raise ValueError(
                f"parallel.dp_shard ({self.dp_shard}) × parallel.tp ({self.tp}) must equal the "
                f"world size ({world_size}); set parallel.dp_shard to -1 to infer it"
            )
        return self.dp_shard, self.tp

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The ("dp_shard", "tp") mesh over all ranks, or None without a process group."""
        if not dist.is_initialized():
            self.resolve(1)
            return None
        dp_shard, tp = self.resolve(dist.get_world_size())
        return init_device_mesh(device_type, (dp_shard, tp), mesh_dim_names=("dp_shard", "tp"))


def all_reduce_sum(x: torch.Tensor | float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group`` (a new tensor; ``x`` is left untouched).

    Used for the global token count that normalises the loss: pass the data-parallel group
    (``mesh["dp_shard"].get_group()``), since the tensor-parallel ranks of one group hold the
    same tokens and summing over them would count each token ``tp`` times.
    """
    if isinstance(x, torch.Tensor):
        out = x.detach().clone()
    else:
        out = torch.tensor(x, dtype=torch.float64)
    if not dist.is_initialized():
        return out
    if dist.get_backend(group) == "nccl":
        out = out.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters living on different meshes.

    Under TP + FSDP2 the transformer blocks' gradients are DTensors on the 2-D mesh while the
    root's (embedding, norm) are on the ``dp_shard`` mesh alone, and torch's version cannot
    stack norms across meshes. Here each group of gradients sharing a mesh and placements
    gets its norm reduced over that mesh, and the groups combine as a sum of squares.
    Returns the total (pre-clipping) norm as a plain tensor, the same value on every rank.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    groups: dict[object, list[torch.nn.Parameter]] = {}
    for p in params:
        key = (
            (p.grad.device_mesh, tuple(p.grad.placements)) if isinstance(p.grad, DTensor) else None
        )
        groups.setdefault(key, []).append(p)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.tensor(0.0)
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
