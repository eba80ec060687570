"""The process group and the few collectives the trainer uses, in one place (torchtitan's
``distributed/utils.py``).

Two process groups live side by side:

- the main (default) group: NCCL on GPUs, gloo on CPU. It carries the real collectives
  (FSDP2/TP traffic, loss sums, gradient norms) and its timeout is
  ``parallel.collective_timeout_s``.
- a CPU (gloo) group for *waits*: barriers and object broadcasts that cover work only rank 0
  does (starting workers, generation, scoring, evaluation, writing exports). Those can take
  far longer than any collective; on the main group NCCL's watchdog would kill the job
  (torchtitan and torchforge keep such waits off NCCL the same way). Its timeout is
  ``parallel.wait_timeout_s``.

Every helper is a no-op (or the identity) in a single process started without torchrun.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

_wait_group: dist.ProcessGroup | None = None


def init_distributed(
    backend: str | None = None,
    *,
    timeout_s: float = 1800.0,
    wait_timeout_s: float = 4 * 3600.0,
) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE`` in the environment),
    create the CPU wait group, and return ``(rank, world_size)``; ``(0, 1)`` with no process
    group when not under torchrun.

    The backend defaults to NCCL when CUDA is available, else gloo (CPU).
    """
    global _wait_group
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        _wait_group = dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=wait_timeout_s)
        )
    return dist.get_rank(), dist.get_world_size()


def wait_group() -> dist.ProcessGroup | None:
    """The CPU group for waits on rank-0-only work (the default group if none was made)."""
    return _wait_group


def shutdown_distributed() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it.

    Only for a run that ended normally: after a failure, a peer may never reach the barrier
    (the recipe then exits without it, see ``recipe_main``). Without the barrier a rank that
    finishes first tears down its gloo pairs while a peer still has traffic in flight. A
    process that used DTensors should then leave by :func:`exit_without_teardown`.
    """
    global _wait_group
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    _wait_group = None


def exit_without_teardown(code: int) -> NoReturn:
    """End a process that used gloo process groups now, skipping the interpreter's teardown.

    ``destroy_process_group`` does not stop gloo's worker threads once DTensor has used the
    group: something still holds it (clearing DTensor's caches frees the mesh, not the
    threads; without DTensor the destroy joins them). A worker thread that is still releasing a
    finished collective (a barrier keeps the collectives before it alive until then) when
    the interpreter starts its teardown has to take the GIL to free the tensors' Python
    objects, and the process aborts: "terminate called without an active exception",
    SIGABRT, after every check has passed (core: ``ProcessGroupGloo::runLoop`` →
    ``~AsyncBarrierWork`` → ``~AsyncGatherWork`` → ``decref_pyobject`` → ``take_gil`` →
    ``pthread_exit``; see pytorch/pytorch#179291). ``os._exit`` runs no teardown at all.
    Call it once everything the process owes has been written, closed and flushed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def rank() -> int:
    """This process's rank in the default group; 0 in a single process without torchrun."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks; 1 in a single process without torchrun."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank, on the CPU wait group: the usual reason to wait is rank 0's work."""
    if dist.is_initialized():
        dist.barrier(group=_wait_group)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled, over the CPU wait group, so the wait
    for ``src`` to produce it never meets the accelerator's watchdog)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_wait_group)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (pickled, over the CPU wait group:
    ranks may reach it after unequal shares of work, such as writing files)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_wait_group)
    return out


def hostnames() -> list[str]:
    """Each rank's host name, in rank order: which ranks share a node (and its files)."""
    return all_gather_object(socket.gethostname())


def all_reduce_sum(x: torch.Tensor | float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group`` (a new tensor; ``x`` is left untouched), on
    the device the group's backend needs (CUDA for NCCL) — the result stays there.

    For token counts and metric sums pass the data-parallel group (``dp_group(mesh)``): the
    tensor-parallel ranks of one group hold the same tokens, and summing over them would
    count each token ``tp`` times.
    """
    return _all_reduce(x, dist.ReduceOp.SUM, group)


def all_reduce_max(x: torch.Tensor | float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Maximum of ``x`` over the ranks of ``group``, as ``all_reduce_sum`` returns a sum."""
    return _all_reduce(x, dist.ReduceOp.MAX, group)


def _all_reduce(x: torch.Tensor | float, op, group: dist.ProcessGroup | None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        out = x.detach().clone()
    else:
        out = torch.tensor(x, dtype=torch.float64)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return out
    if dist.get_backend(group) == "nccl" and out.device.type != "cuda":
        out = out.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(out, op=op, group=group)
    return out


def dp_group(mesh) -> dist.ProcessGroup | None:
    """The data-parallel process group of the ("dp_shard", "tp") mesh (None: one process)."""
    return None if mesh is None else mesh["dp_shard"].get_group()


def dp_coords(mesh) -> tuple[int, int]:
    """``(data-parallel rank, data-parallel size)``; TP ranks of one group share them."""
    if mesh is None:
        return 0, 1
    dp = mesh["dp_shard"]
    return dp.get_local_rank(), dp.size()


def unshard(t: torch.Tensor) -> torch.Tensor:
    """The global tensor behind a DTensor (FSDP2/TP), differentiably: the gradient goes back
    to each rank's shard. A plain tensor is returned as it is. A collective for a DTensor:
    every rank of its mesh calls it."""
    return t.full_tensor() if isinstance(t, DTensor) else t


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
        squares.append(unshard(norm).float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.tensor(0.0)
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def gather_to(t: torch.Tensor, dst: int, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``t``'s whole value on rank ``dst`` (``None`` on the other ranks), floating tensors cast
    to ``dtype`` first (a bf16 publication moves half the bytes). Collective for a DTensor:
    every rank calls it, and each sends its local piece to ``dst`` alone, where
    ``full_tensor()`` would all-gather the whole tensor onto every rank.

    The pieces of ``Shard``/``Replicate`` placements (FSDP2 on dim 0, uneven or empty shards
    included; TP on dim 0 or 1) are placed by :func:`shard_box`. Other placements (the
    strided shard of FSDP2 over a dim-0 TP shard, partial sums) and meshes smaller than the
    world take ``full_tensor()``. A plain tensor is every rank's own copy: no traffic.
    """
    t = t.detach()
    me = rank()

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x

    if not isinstance(t, DTensor):
        return cast(t) if me == dst else None
    mesh, placements = t.device_mesh, t.placements
    if mesh.size() != dist.get_world_size() or not all(
        type(p) in (Shard, Replicate) for p in placements
    ):
        full = cast(t.full_tensor())
        return full if me == dst else None
    local = cast(t.to_local()).contiguous().reshape(-1)
    boxes = [
        shard_box(t.shape, mesh.shape, (mesh.mesh == r).nonzero()[0].tolist(), placements)
        for r in range(dist.get_world_size())
    ]
    width = max(math.prod(shape) for shape, _ in boxes)
    send = local
    if local.numel() < width:  # gather takes equal sizes
        send = torch.cat([local, local.new_empty(width - local.numel())])
    if me != dst:
        dist.gather(send, None, dst=dst)
        return None
    full = send.new_empty(t.shape)
    rows = t.shape[0] // len(boxes) if t.dim() else 0
    zeros = (0,) * (t.dim() - 1)
    if boxes == [((rows, *t.shape[1:]), (r * rows, *zeros)) for r in range(len(boxes))]:
        # even dim-0 shards in rank order (FSDP2's usual case): received in place
        dist.gather(send, list(full.view(len(boxes), width).unbind(0)), dst=dst)
        return full
    received = send.new_empty(len(boxes), width)
    dist.gather(send, list(received.unbind(0)), dst=dst)
    for r, (shape, offset) in enumerate(boxes):
        if (shape, offset) not in boxes[:r]:  # a replica of a block already placed
            block = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            full[block] = received[r, : math.prod(shape)].view(shape)
    return full


def shard_box(
    global_shape: tuple[int, ...] | torch.Size,
    mesh_shape: tuple[int, ...],
    coordinate: tuple[int, ...],
    placements,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(shape, offset)`` of the block of a ``global_shape`` tensor that the rank at mesh
    ``coordinate`` holds under ``Shard``/``Replicate`` ``placements``: each ``Shard(d)`` splits
    dim ``d`` of the block so far as ``torch.chunk`` does (pieces of ``ceil(size / n)``; the
    last ones smaller or empty), in mesh-dim order."""
    shape, offset = list(global_shape), [0] * len(global_shape)
    for n, c, p in zip(mesh_shape, coordinate, placements):
        if isinstance(p, Shard):
            d = p.dim % len(shape)
            step = -(-shape[d] // n)
            start = min(c * step, shape[d])
            offset[d] += start
            shape[d] = min(step, shape[d] - start)
    return tuple(shape), tuple(offset)
