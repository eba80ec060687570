"""``gather_to``: a DTensor's whole value on one rank, against the tensor it was sharded from
(and DTensor's own ``full_tensor()``), on real gloo ranks; ``shard_box`` against
``torch.chunk``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simko_tune.parallel.collectives import exit_without_teardown, gather_to, shard_box


@pytest.mark.parametrize("size", range(0, 10))
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_shard_box_splits_as_torch_chunk(size, parts):
    """Rows ``torch.chunk`` gives each rank (an empty block past its last chunk)."""
    from torch.distributed.tensor import Shard

    x = torch.arange(size * 3).view(size, 3)
    chunks = x.chunk(parts) if size else ()
    for c in range(parts):
        shape, offset = shard_box(x.shape, (parts,), (c,), [Shard(0)])
        got = x[offset[0] : offset[0] + shape[0]]
        expected = chunks[c] if c < len(chunks) else x[:0]
        assert shape[1] == 3 and offset[1] == 0
        assert torch.equal(got, expected), (size, parts, c)


def _cases(world: int) -> list[tuple]:
    """(global shape, mesh shape, placements, dtype) to gather."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if world == 2:
        return [
            ((5, 3), (2,), [Shard(0)], None),  # FSDP2, uneven: 3 + 2 rows
            ((1, 4), (2,), [Shard(0)], None),  # rank 1 holds nothing
            ((4, 5), (2,), [Shard(1)], None),  # TP row-wise: columns, uneven
            ((3, 2), (2,), [Replicate()], None),
            ((7, 3), (2,), [Shard(0)], torch.bfloat16),  # cast before it travels
            ((6,), (2,), [Shard(0)], None),  # even: received in place
            ((4, 3), (2,), [Shard(0)], torch.bfloat16),
        ]
    return [
        ((5, 7), (2, 2), [Shard(0), Shard(1)], None),  # FSDP2 x TP on dim 1
        ((6, 3), (2, 2), [Replicate(), Shard(0)], None),
        ((2, 7), (2, 2), [Shard(1), Shard(1)], None),  # a chunk of a chunk
        ((3, 2), (4,), [Shard(0)], None),  # the last rank holds nothing
        ((8, 3), (2, 2), [_StridedShard(0, split_factor=2), Shard(0)], None),  # all-gathered
    ]


def _gather_rank(rank: int, world: int, init_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case, (shape, mesh_shape, placements, dtype) in enumerate(_cases(world)):
            mesh = init_device_mesh("cpu", mesh_shape)
            torch.manual_seed(case)
            whole = torch.randn(shape)  # the same on every rank
            sharded = distribute_tensor(whole, mesh, placements)
            reference = sharded.full_tensor()
            assert torch.equal(reference, whole), case
            expected = whole if dtype is None else whole.to(dtype)
            for dst in range(world):
                got = gather_to(sharded, dst, dtype)
                if rank == dst:
                    assert got is not None and got.dtype == expected.dtype, case
                    assert torch.equal(got, expected), (case, dst)
                else:
                    assert got is None, (case, dst)
            ids = torch.arange(4) + 10 * rank  # a plain tensor: the writer's own, as it is
            got = gather_to(ids, world - 1, torch.bfloat16)
            if rank == world - 1:
                assert torch.equal(got, ids) and got.dtype == torch.int64
            else:
                assert got is None
        dist.barrier()  # no rank tears its gloo pairs down while a peer still uses them
    finally:
        dist.destroy_process_group()
    exit_without_teardown(0)  # every check passed (an exception reaches mp.spawn instead)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_gather_to_places_every_piece(world, tmp_path):
    mp.spawn(_gather_rank, args=(world, str(tmp_path / "init")), nprocs=world)


def test_exit_without_teardown_flushes_and_keeps_the_code(tmp_path):
    """What was printed (unflushed) reaches the pipe, the exit code is the one given, and no
    atexit handler (the interpreter's teardown) runs."""
    import subprocess
    import sys

    script = (
        "import atexit, sys\n"
        "from simko_tune.parallel import exit_without_teardown\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "print('out', end=''); print('err', end='', file=sys.stderr)\n"
        "exit_without_teardown(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3
    assert proc.stdout == "out"
    assert proc.stderr.endswith("err")
