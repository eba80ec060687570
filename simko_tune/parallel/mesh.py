"""The 2-D device mesh, and each CPU rank's threads and heap.

The trainer's ranks form a 2-D mesh: ``dp_shard`` ranks hold different data and shard
parameters with FSDP2; the ``tp`` ranks of one data-parallel group hold the same data and
split each matmul. A single process started without torchrun has no process group and no mesh.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


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


def cpu_threads(environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """How many intra-op threads a CPU trainer rank uses, and why.

    ``OMP_NUM_THREADS`` when it is set; otherwise the cores this process may run on (its
    affinity mask: a container's or ``taskset``'s limit, not the machine's count) divided
    among the ranks on this node (torchrun's ``LOCAL_WORLD_SIZE``), at least one. torchrun
    itself sets ``OMP_NUM_THREADS=1`` when it starts several processes and the variable is
    unset; that is indistinguishable from a user's setting, so the reason says so."""
    if environ.get("OMP_NUM_THREADS"):
        value = environ["OMP_NUM_THREADS"]
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"OMP_NUM_THREADS={value!r}: expected a positive integer")
        note = " (set by you, or by torchrun for several local ranks)"
        return threads, "OMP_NUM_THREADS" + (note if environ.get("LOCAL_WORLD_SIZE") else "")
    cores = len(os.sched_getaffinity(0))
    ranks = max(int(environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(
        cores // ranks, 1
    ), f"{cores} cores in this process's affinity mask / {ranks} local rank(s)"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> str:
    """Make glibc's malloc keep the memory this process frees, for the next step to reuse.

    Why: by default glibc gives every freed block over its mmap threshold (at most 32 MiB:
    a layer's gradients, its activations) back to the kernel, and trims the heap's top; a
    training step frees and then allocates the same sizes again, so every step faults the
    same gigabytes back in, page by page, each zeroed by the kernel. On the Qwen2.5-0.5B
    shape on a 2-core VM that is 0.7-3 M minor faults and 4-18 s of system time per 26 s
    update; with the memory kept, none after the second step (``tools/bench_update_vs_hf.py``
    measures it). Blocks then come from the heap (no mmap), which is never trimmed: the
    process holds its peak, as the CUDA caching allocator does on GPU (so only CPU trainer
    ranks do this; ``parallel.cpu_keep_freed_memory=false`` turns it off). Returns what was
    done (logged): nothing where the C library is not glibc.

    Two limits of glibc that mallopt cannot reach. torch allocates with posix_memalign, which
    asks glibc for the block plus the alignment, so a freed block serves its own size again
    only once merged with a neighbour; before glibc 2.39 (its bug 30723) memalign puts the
    slivers it trims into the thread's tcache, where they never merge, until that tcache bin
    is full (7 chunks). So a thread's first steps may fault some blocks in again
    (``tests/recipe/test_threads.py`` bounds it). And on threads other than the main one,
    glibc maps blocks of a thread heap's size (64 MiB) or more with mmap whatever M_MMAP_MAX
    says, and unmaps them when freed (gloo's collective buffers on its worker threads). Only
    settings read at process start reach them: ``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``
    the first, ``MALLOC_ARENA_MAX=1`` (every thread in the main heap) the second.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError, TypeError):
        return f"left to the C library ({name or 'not found'}: not glibc)"
    # -1: never trim (glibc's documented value; the largest positive one, 2 GiB, is less
    # than a 0.5B update frees at once, and the heap's top was then trimmed every few steps)
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1)):
        return f"left to glibc {version} (mallopt refused)"
    return f"glibc {version} keeps freed memory (no mmap per block, no trim)"
