"""Weight deltas: chains over real AdamW steps rebuild the full publications bit for bit (one
rank and two FSDP2 ranks); every failure is refused and keeps the served version; a refused
delta is republished whole and the run goes on; a real vLLM worker serves a delta chain
exactly as it serves the full publication of the same weights."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from simko_tune.generation import PublicationError, WeightSync, publish_weights
from simko_tune.generation.deltas import (
    DELTA_SUFFIX,
    DeltaSettings,
    DeltaWriter,
    ServedWeights,
)
from simko_tune.generation.sync_dir import prune_versions, published_versions, version_dir
from simko_tune.generation.types import DeltaRefused
from simko_tune.models import read_hf_config
from simko_tune.parallel import exit_without_teardown

SHARD = 20_000  # bytes: the tiny model in several shards


def _kind(sync: Path, version: int) -> str:
    return json.loads((version_dir(sync, version) / "manifest.json").read_text())["kind"]


def _adamw_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    """One real AdamW step on random gradients."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _same_bytes(rebuilt: Path, files: list[dict], reference: Path) -> None:
    """Every rebuilt shard equals the reference publication's file of the same name."""
    names = sorted(f["name"] for f in files)
    assert names == sorted(p.name for p in reference.glob("*.safetensors"))
    for name in names:
        assert (rebuilt / name).read_bytes() == (reference / name).read_bytes(), name


def _plain_pairs(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """(gap from the previous differing byte, XOR) for each byte that differs, plainly."""
    pairs, last = [], 0
    for p, (a, b) in enumerate(zip(old, new)):
        if a != b:
            pairs.append((p - last, a ^ b))
            last = p
    return pairs


def _read_pairs(data: bytes) -> list[tuple[int, int]]:
    """The format read plainly: LEB128 gaps, each followed by its XOR byte."""
    pairs, k = [], 0
    while k < len(data):
        gap, shift = 0, 0
        while True:
            gap |= (data[k] & 127) << shift
            shift += 7
            k += 1
            if data[k - 1] < 128:
                break
        pairs.append((gap, data[k]))
        k += 1
    return pairs


@pytest.mark.parametrize("frame_bytes", [1 << 22, 1000])
def test_a_delta_lists_the_bytes_that_differ_between_two_shards(tmp_path, frame_bytes):
    """DeltaWriter's delta file is one zstd frame per ``frame_bytes`` of the shard (its
    manifest entry lists their sizes and the encoding), each holding the (gap, XOR) pairs,
    computed plainly here, of the bytes that differ in that slice of the whole shard files
    of the two versions; the entry names the rebuilt bytes' checksum; applying it to version
    1 gives version 2; a frame table that does not fit the delta is refused."""
    import xxhash
    import zstandard

    from simko_tune.generation.deltas import ENCODING, apply_delta
    from simko_tune.generation.shards import _write_shard

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3000, generator=g), "b": torch.randn(7, 5, generator=g)}
    writer = DeltaWriter(DeltaSettings(frame_bytes=frame_bytes, threads=2))
    for version in (1, 2, 3):
        (tmp_path / f"v{version}").mkdir()
    shard = "model-00001.safetensors"  # a shard keeps its name from version to version
    writer.begin(1)
    whole = writer.write(tensors, tmp_path / "v1" / shard)
    writer.end(True)
    assert "target" not in whole  # no base yet: written whole
    v1 = (tmp_path / "v1" / shard).read_bytes()
    tensors["a"][[5, 900, 2999]] += 1.0  # three weights move
    tensors["b"][6, 4] = -tensors["b"][6, 4]  # and the last one's sign
    writer.begin(2)
    entry = writer.write(tensors, tmp_path / "v2" / shard)
    writer.end(True)
    _write_shard(tensors, tmp_path / "v3" / shard)  # version 2 written whole, independently
    v2 = (tmp_path / "v3" / shard).read_bytes()
    packed = (tmp_path / "v2" / entry["name"]).read_bytes()
    assert entry["name"] == shard + DELTA_SUFFIX and entry["target_bytes"] == len(v2)
    assert entry["encoding"] == ENCODING
    assert len(packed) < len(v2) // 20 and entry["bytes"] == len(packed)
    frames, at = entry["frames"], 0
    assert entry["frame_bytes"] == frame_bytes
    assert len(frames) == -(-len(v2) // frame_bytes) and sum(frames) == len(packed)
    changed = 0
    for i, n in enumerate(frames):  # each frame on its own, by the library alone
        part = zstandard.ZstdDecompressor().decompress(packed[at : at + n])
        lo, hi = i * frame_bytes, (i + 1) * frame_bytes
        assert _read_pairs(part) == _plain_pairs(v1[lo:hi], v2[lo:hi]), i
        changed += len(_read_pairs(part))
        at += n
    assert 4 <= changed <= 4 * 4  # four weights, up to 4 bytes each
    assert entry["target_xxh3_64"] == xxhash.xxh3_64_hexdigest(v2)
    assert entry["frame_xxh3_64"] == [
        xxhash.xxh3_64_hexdigest(v2[lo : lo + frame_bytes]) for lo in range(0, len(v2), frame_bytes)
    ]
    out = np.frombuffer(v1, dtype=np.uint8).copy()
    apply_delta(packed, out, frames, frame_bytes)
    assert out.tobytes() == v2
    with pytest.raises(ValueError, match="frame table"):
        apply_delta(packed, out, frames[:-1] + [frames[-1] + 1], frame_bytes)
    with pytest.raises(ValueError, match="frame table"):
        apply_delta(packed, np.zeros(len(v2) + frame_bytes, np.uint8), frames, frame_bytes)
    with pytest.raises(ValueError, match="not a zstd frame"):
        apply_delta(b"\x00" * 20, out[:10], [20], 10)


def test_delta_chain_rebuilds_full_publications_bit_for_bit(gen_model_dir, ref, tmp_path):
    """12 versions of real AdamW steps (lr 1e-6) in bf16, published with deltas (a full one
    every 5) and, as the reference, whole: a worker that follows the chain, and one that
    starts mid-chain, rebuild each version's files byte for byte; the deltas are a few
    percent of the bytes; pruning keeps what a restarted worker needs."""
    hf = read_hf_config(gen_model_dir)
    model = ref.trainer_model(gen_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    deltas, full = tmp_path / "deltas", tmp_path / "full"
    sync = WeightSync(
        deltas,
        hf,
        dtype=torch.bfloat16,
        max_shard_bytes=SHARD,
        delta=DeltaSettings(full_every=5, frame_bytes=4096),  # many frames, rebuilt on threads
    )
    worker = ServedWeights(deltas)
    fracs = {}
    for version in range(1, 13):
        _adamw_step(model, opt, seed=version)
        sync.publish(model, version)
        publish_weights(model, version, full, hf, dtype=torch.bfloat16, max_shard_bytes=SHARD)
        fracs[version] = sync.last_stats["bytes_frac"]
        folder, files, _ = worker.prepare(version)
        _same_bytes(folder, files, version_dir(full, version))
        worker.served(version, folder, files)
        if version == 3:  # version 2's rebuilt folder is kept for the next rebuild to reuse
            assert sorted(p.name for p in worker._private.iterdir()) == ["spare", "v000003"]
        if version in (4, 9):  # a worker (re)started mid-chain: from the newest full one
            fresh = ServedWeights(deltas)
            folder, files, timings = fresh.prepare(version)
            assert timings["chain"] == 4  # e.g. 9, 8, 7 and the full 6
            _same_bytes(folder, files, version_dir(full, version))
            fresh.close()
    kinds = [_kind(deltas, v) for v in range(1, 13)]
    assert kinds == ["full", "delta", "delta", "delta", "delta"] * 2 + ["full", "delta"]
    assert all(fracs[v] < 0.05 for v in range(1, 13) if kinds[v - 1] == "delta"), fracs
    assert all(fracs[v] == 1.0 for v in (1, 6, 11))
    # the served version's rebuilt folder only: version 12 was rebuilt into the spare
    assert sorted(p.name for p in worker._private.iterdir()) == ["v000012"]
    worker.close()
    prune_versions(deltas, 12)  # the newest full at or before 12 is 11
    assert published_versions(deltas) == [11, 12]
    restarted = ServedWeights(deltas)
    folder, files, _ = restarted.prepare(12)
    _same_bytes(folder, files, version_dir(full, 12))
    restarted.close()
    sync.close()


def test_large_updates_are_published_whole(gen_model_dir, ref, tmp_path, caplog):
    """lr 1e-2: nearly every bf16 weight changes, a delta would be as large as the shard:
    each shard goes whole, the publication is a full one, and the log says why."""
    hf = read_hf_config(gen_model_dir)
    model = ref.trainer_model(gen_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sync = WeightSync(tmp_path, hf, dtype=torch.bfloat16, delta=DeltaSettings())
    sync.publish(model, 1)
    _adamw_step(model, opt, seed=0)
    with caplog.at_level(logging.INFO, logger="simko_tune.generation.weights"):
        sync.publish(model, 2)
    assert _kind(tmp_path, 2) == "full" and sync.last_stats["delta"] == 0.0
    assert sync.last_stats["bytes_frac"] == 1.0
    assert "weight version 2 published whole" in caplog.text
    sync.close()


@pytest.fixture
def chain(gen_model_dir, ref, tmp_path):
    """Versions 1 (full), 2 and 3 (deltas, in frames of 4 KiB) of AdamW steps in fp32
    (max_ratio 1: always a delta), and a worker serving version 2."""
    hf = read_hf_config(gen_model_dir)
    model = ref.trainer_model(gen_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync_dir = tmp_path / "sync"
    writer = DeltaWriter(DeltaSettings(max_ratio=1.0, frame_bytes=4096))
    for version in (1, 2, 3):
        _adamw_step(model, opt, seed=version)
        writer.begin(version)
        publish_weights(model, version, sync_dir, hf, max_shard_bytes=SHARD, delta=writer)
        writer.end(True)
    assert [_kind(sync_dir, v) for v in (1, 2, 3)] == ["full", "delta", "delta"]
    worker = ServedWeights(sync_dir)
    for version in (1, 2):
        folder, files, _ = worker.prepare(version)
        worker.served(version, folder, files)
    yield sync_dir, worker
    worker.close()


def _refused(worker: ServedWeights, version: int, match: str) -> None:
    """``prepare`` raises, naming the problem; the served version and its files stay, and
    no rebuilt folder is left behind."""
    served = (worker.version, worker.folder, worker.files)
    before = {p.name: p.read_bytes() for p in worker.folder.iterdir()}
    with pytest.raises(PublicationError, match=match):
        worker.prepare(version)
    assert (worker.version, worker.folder, worker.files) == served
    assert {p.name: p.read_bytes() for p in worker.folder.iterdir()} == before
    assert sorted(p.name for p in worker._private.iterdir()) == [worker.folder.name]


def test_a_flipped_byte_in_a_delta_is_refused(chain):
    sync_dir, worker = chain
    delta = sorted(version_dir(sync_dir, 3).glob(f"*{DELTA_SUFFIX}"))[0]
    data = bytearray(delta.read_bytes())
    data[len(data) // 2] ^= 0x01
    delta.write_bytes(bytes(data))
    _refused(worker, 3, "corrupt")


def test_a_frame_table_that_does_not_fit_the_delta_is_refused(chain):
    """The manifest's frame sizes are read, not trusted: two frames' sizes swapped (the
    total still fits) make a frame that is not a whole zstd frame."""
    sync_dir, worker = chain
    path = version_dir(sync_dir, 3) / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = next(f for f in manifest["files"].values() if len(f.get("frames", [])) > 2)
    frames = entry["frames"]
    i = next(i for i in range(len(frames) - 1) if frames[i] != frames[i + 1])
    frames[i], frames[i + 1] = frames[i + 1], frames[i]
    path.write_text(json.dumps(manifest))
    _refused(worker, 3, "corrupt")


def test_a_delta_on_the_wrong_base_is_refused(chain):
    """The worker believes it serves version 2 but holds other bytes (version 1's): the
    rebuilt bytes miss the trainer's checksum."""
    sync_dir, worker = chain
    for f in worker.folder.iterdir():
        f.write_bytes((version_dir(sync_dir, 1) / f.name).read_bytes())
    _refused(worker, 3, "wrong base")


def test_a_gap_in_the_chain_is_refused(chain):
    """A worker restarted mid-chain (it holds nothing) while version 2 is gone."""
    import shutil

    sync_dir, worker = chain
    shutil.rmtree(version_dir(sync_dir, 2))
    restarted = ServedWeights(sync_dir)
    with pytest.raises(PublicationError, match="chain needs version 2"):
        restarted.prepare(3)
    restarted.close()


def test_a_missing_served_copy_is_refused(chain):
    sync_dir, worker = chain
    next(worker.folder.iterdir()).unlink()
    with pytest.raises(PublicationError, match="served copy .* is missing"):
        worker.prepare(3)


# ----------------------------------------------------------------------------- real worker

PROMPTS = [[3, 17, 42, 7], [9, 1, 5]]


def _greedy(workers) -> tuple[list, list]:
    from simko_tune.generation import SamplingConfig

    out = workers.generate(PROMPTS, 1, SamplingConfig(temperature=0.0, max_tokens=12))
    return [g[0].token_ids for g in out], [g[0].logprobs for g in out]


def _flip_delta(sync_dir: Path, version: int) -> None:
    delta = sorted(version_dir(sync_dir, version).glob(f"*{DELTA_SUFFIX}"))[0]
    data = bytearray(delta.read_bytes())
    data[len(data) // 2] ^= 0x01
    delta.write_bytes(bytes(data))


def test_real_worker_serves_deltas_and_recovers_from_a_refused_one(
    vllm_worker, gen_model_dir, sync_dir, versions, ref, monkeypatch
):
    """Through WeightSync with deltas, a real vLLM worker:
    - serves a chain of deltas exactly as the full publication of the same weights (same
      tokens, same log-probs to the last bit);
    - refuses a corrupt delta delivered by the trainer itself: every rank republishes that
      version whole and the worker serves it (the sync path);
    - refuses one delivered by the rollout thread: the thread waits, the trainer's next
      publication republishes it whole first, the thread delivers it; the next delta then
      applies to it (the one-step-off path)."""
    hf = read_hf_config(gen_model_dir)
    model = ref.perturbed_model(gen_model_dir, seed=21)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = WeightSync(sync_dir, hf, delta=DeltaSettings(max_ratio=1.0))
    sync.attach(vllm_worker)
    chain = [next(versions) for _ in range(4)]
    for step, version in enumerate(chain):
        _adamw_step(model, opt, seed=step)
        sync.publish(model, version)
    assert [_kind(sync_dir, v) for v in chain] == ["full", "delta", "delta", "delta"]
    assert vllm_worker.weight_version == chain[-1]
    from_deltas = _greedy(vllm_worker)
    whole = next(versions)
    publish_weights(model, whole, sync_dir, hf)
    vllm_worker.load_weights(whole)
    assert _greedy(vllm_worker) == from_deltas
    vllm_worker.load_weights(chain[-1])  # back to the chain's end (rebuilt from its full one)
    assert _greedy(vllm_worker) == from_deltas

    # the sync path: the trainer delivers, the worker refuses, the version is rewritten whole
    real_publish = sync.transport.publish

    def publish_then_corrupt(model, version):
        path = real_publish(model, version)
        _flip_delta(sync_dir, version)
        return path

    monkeypatch.setattr(sync.transport, "publish", publish_then_corrupt)
    _adamw_step(model, opt, seed=10)
    v_sync = next(versions)
    sync.publish(model, v_sync)
    monkeypatch.undo()
    assert vllm_worker.weight_version == v_sync == sync.acknowledged
    assert _kind(sync_dir, v_sync) == "full"
    served_sync = _greedy(vllm_worker)
    whole = next(versions)
    publish_weights(model, whole, sync_dir, hf)
    vllm_worker.load_weights(whole)
    assert _greedy(vllm_worker) == served_sync
    vllm_worker.load_weights(v_sync)

    # the one-step-off path: the rollout thread delivers, the trainer republishes
    _adamw_step(model, opt, seed=11)
    v_thread = next(versions)
    sync.publish(model, v_thread, deliver=False)
    assert _kind(sync_dir, v_thread) == "delta"
    _flip_delta(sync_dir, v_thread)
    weights_then = {k: v.clone() for k, v in model.state_dict().items()}
    errors: list[BaseException] = []

    def rollout_thread():
        try:
            sync.deliver(v_thread)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    sync.reserve(v_thread)  # as the recipe does before it submits the rollout thread
    thread = threading.Thread(target=rollout_thread)
    thread.start()
    _adamw_step(model, opt, seed=12)  # the trainer's next update meanwhile
    v_next = next(versions)
    sync.publish(model, v_next, deliver=False)  # republishes v_thread whole, then writes v_next
    thread.join(timeout=120)
    assert not thread.is_alive() and errors == []
    assert vllm_worker.weight_version == v_thread and _kind(sync_dir, v_thread) == "full"
    assert _kind(sync_dir, v_next) == "delta"
    served_then = _greedy(vllm_worker)
    whole = next(versions)
    model_then = ref.perturbed_model(gen_model_dir, seed=21)
    model_then.load_state_dict(weights_then)
    publish_weights(model_then, whole, sync_dir, hf)
    sync.deliver(v_next)  # a delta against the republished version
    assert vllm_worker.weight_version == v_next
    vllm_worker.load_weights(whole)
    assert _greedy(vllm_worker) == served_then  # what the thread served were v_thread's weights
    sync.close()


def test_main_thread_refusal_outside_publish_raises(gen_model_dir, ref, tmp_path):
    """Only publish() (every rank) can republish: a refusal on the trainer's own thread
    outside it is an error naming the version, never a silent wait."""
    hf = read_hf_config(gen_model_dir)
    model = ref.trainer_model(gen_model_dir)

    class Refusing:
        def load_weights(self, version, timeout_s=300.0):
            from simko_tune.generation.types import GenerationError

            raise GenerationError("corrupt")

    sync = WeightSync(tmp_path, hf, delta=DeltaSettings(max_ratio=1.0))
    sync.publish(model, 1)
    sync.attach(Refusing())
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    sync.publish(model, 2, deliver=False)
    with pytest.raises(DeltaRefused, match="weight version 2, a delta"):
        sync.deliver(2)
    sync.close()


# ----------------------------------------------------------------------------- two ranks


def _fsdp_delta_rank(rank: int, world: int, init_file: str, model_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from simko_tune.models import model_from_hf_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = model_from_hf_config(model_dir)
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        hf = read_hf_config(model_dir)
        sync = WeightSync(
            Path(out, "deltas"),
            hf,
            dtype=torch.bfloat16,
            max_shard_bytes=SHARD,
            delta=DeltaSettings(full_every=4, frame_bytes=4096),
        )
        for version in range(1, 11):
            g = torch.Generator().manual_seed(version)
            for p in model.parameters():  # the same full gradient on both ranks, sharded
                full = torch.randn(p.shape, generator=g)
                p.grad = distribute_tensor(full, p.device_mesh, p.placements)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync.publish(model, version)
            publish_weights(
                model, version, Path(out, "full"), hf, dtype=torch.bfloat16, max_shard_bytes=SHARD
            )
        sync.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_without_teardown(0)


@pytest.mark.slow
def test_two_fsdp2_ranks_write_their_shares_as_deltas(gen_model_dir, tmp_path):
    """Two gloo ranks, FSDP2: each writes its share of every version as deltas against the
    bytes it holds; a worker rebuilds each version equal to the full publication."""
    import torch.multiprocessing as mp

    mp.spawn(
        _fsdp_delta_rank,
        args=(2, str(tmp_path / "init"), str(gen_model_dir), str(tmp_path)),
        nprocs=2,
    )
    deltas, full = tmp_path / "deltas", tmp_path / "full"
    kinds = [_kind(deltas, v) for v in range(1, 11)]
    assert kinds == ["full", "delta", "delta", "delta"] * 2 + ["full", "delta"]
    worker = ServedWeights(deltas)
    writers = set()
    for version in range(1, 11):
        folder, files, _ = worker.prepare(version)
        _same_bytes(folder, files, version_dir(full, version))
        worker.served(version, folder, files)
        writers |= {f["name"].split("-")[1] for f in files}
    assert writers == {"r00000", "r00001"}
    worker.close()


def test_the_next_delta_is_rebuilt_before_it_is_asked_for(gen_model_dir, ref, tmp_path):
    """A worker's watcher (``prefetch``) rebuilds the delta on the version it serves as soon
    as it is published (one-step-off: while the engine still generates with the old
    weights); the load then takes it as it is, the same bytes as a rebuild on demand."""
    import time

    hf = read_hf_config(gen_model_dir)
    model = ref.trainer_model(gen_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync_dir, full = tmp_path / "sync", tmp_path / "full"
    writer = DeltaWriter(DeltaSettings(max_ratio=1.0))
    worker = ServedWeights(sync_dir, prefetch=True, poll_s=0.01)
    for version in (1, 2, 3):
        _adamw_step(model, opt, seed=version)
        writer.begin(version)
        publish_weights(model, version, sync_dir, hf, max_shard_bytes=SHARD, delta=writer)
        writer.end(True)
        publish_weights(model, version, full, hf, max_shard_bytes=SHARD)
        if version > 1:
            deadline = time.monotonic() + 30
            while version not in worker._prefetched and time.monotonic() < deadline:
                time.sleep(0.01)
        folder, files, timings = worker.prepare(version)
        assert timings.get("prefetched", 0.0) == (1.0 if version > 1 else 0.0), timings
        _same_bytes(folder, files, version_dir(full, version))
        worker.served(version, folder, files)
    worker.close()
    assert worker._watcher is None and worker._private is None


def test_a_delta_the_load_rebuilt_is_not_rebuilt_again_by_the_watcher(gen_model_dir, ref, tmp_path):
    """The sync path: the trainer asks for the load right after publishing, before the
    watcher's next poll, so the load rebuilds the delta itself; the watcher, waking while
    the engine reloads it, must leave it alone (it once rebuilt it a second time then,
    taking the cores from the reload)."""
    import time

    hf = read_hf_config(gen_model_dir)
    model = ref.trainer_model(gen_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync_dir = tmp_path / "sync"
    writer = DeltaWriter(DeltaSettings(max_ratio=1.0))
    # the watcher's first poll comes 1 s after each served(): the publication and the load
    # below come well before it, the sleep after it
    worker = ServedWeights(sync_dir, prefetch=True, poll_s=1.0)
    rebuilt: list[int] = []
    prepare = worker._prepare
    worker._prepare = lambda v: rebuilt.append(v) or prepare(v)
    for version in (1, 2, 3):
        _adamw_step(model, opt, seed=version)
        writer.begin(version)
        publish_weights(model, version, sync_dir, hf, max_shard_bytes=SHARD, delta=writer)
        writer.end(True)
        folder, files, timings = worker.prepare(version)  # before the watcher's next poll
        assert timings.get("prefetched", 0.0) == 0.0
        time.sleep(1.5)  # the watcher polls meanwhile, as it would during the reload
        assert rebuilt == list(range(1, version + 1)) and not worker._prefetched
        worker.served(version, folder, files)
    worker.close()


def test_rebuild_threads_run_on_the_workers_cores(monkeypatch):
    """A CPU worker's main thread is pinned to one core by OpenMP and threads inherit the
    pin: the rebuild's threads are given the worker's whole core list instead, read from
    the binding the client sets (comma lists, ranges, TP lists joined by '|')."""
    from simko_tune.generation.deltas import _frames_in_order
    from simko_tune.generation.server import bound_cores

    for spec, cores in [("0,1", {0, 1}), ("2-4", {2, 3, 4}), ("0|1", {0, 1}), ("auto", None)]:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", spec)
        assert bound_cores() == (frozenset(cores) if cores else None), spec
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    assert bound_cores() is None

    one = frozenset([min(os.sched_getaffinity(0))])
    seen, order = [], []
    _frames_in_order(
        6,
        8,
        2,
        lambda i, buf: seen.append(frozenset(os.sched_getaffinity(0))) or i,
        lambda i, buf, result: order.append(result),
        one,
    )
    assert seen == [one] * 6 and order == list(range(6))


# --------------------------------------------------------------------- private folders

# A worker (its private folder made, then held until killed) whose PID, as it sees it, is
# absent from this namespace's /proc: argv root, pid (a fake os.getpid when given).
_HOLDER = """
import os, signal, sys
from pathlib import Path
import simko_tune.generation.deltas as deltas
root = Path(sys.argv[1])
deltas.private_root = lambda: root
if len(sys.argv) > 2:
    os.getpid = lambda: int(sys.argv[2])
print(deltas.ServedWeights(None)._private_dir(), flush=True)
signal.pause()
"""


def _absent_pid() -> int:
    return next(p for p in range(30_000, 300, -1) if not Path(f"/proc/{p}").exists())


def _start_holder(root: Path, how: str):
    """``fake_pid``: this namespace, ``os.getpid`` says a PID absent here; ``unshare``: a
    real second PID namespace (docker's ``--ipc=host`` without ``--pid=host``) where the
    holder's PID is absent from this one's /proc."""
    import shutil
    import subprocess
    import sys

    from harness import child_env

    pid = _absent_pid()
    if how == "fake_pid":
        cmd = [sys.executable, "-c", _HOLDER, str(root), str(pid)]
    else:
        unshare = shutil.which("unshare")
        probe = [unshare or "unshare", "--user", "--map-root-user", "--pid", "--fork"]
        probe += ["--mount-proc", "true"]
        if unshare is None or subprocess.run(probe, capture_output=True).returncode != 0:
            pytest.skip("no unshare, or user and PID namespaces are not allowed here")
        script = f'echo {pid - 1} > /proc/sys/kernel/ns_last_pid; "$@"; exit $?'
        cmd = [*probe[:-1], "sh", "-c", script, "sh", sys.executable, "-c", _HOLDER, str(root)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env=child_env(), start_new_session=True
    )
    return proc, Path(proc.stdout.readline().strip())


def _wait_unlocked(folder: Path, timeout_s: float = 30) -> None:
    """Until no process holds ``folder``'s lock: a killed process's files close as it exits,
    which in another PID namespace can come after its parent's ``wait`` returned."""
    import fcntl
    import time

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{folder} still locked"
                time.sleep(0.05)
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["fake_pid", "unshare"])
def test_the_orphan_sweep_spares_a_live_worker_in_another_pid_namespace(tmp_path, monkeypatch, how):
    """A worker's private folder is its own while it lives (a lock it holds), whatever PIDs
    another worker sharing /dev/shm can see; once it is killed (no ``close``), the next
    worker's sweep removes it."""
    import signal

    root = tmp_path / "shm"
    root.mkdir(mode=0o700)
    monkeypatch.setattr("simko_tune.generation.deltas.private_root", lambda: root)
    holder, held = _start_holder(root, how)
    try:
        assert held.parent == root and held.is_dir(), held
        (held / "v000002").mkdir()  # a rebuilt version it serves
        other = ServedWeights(None)
        mine = other._private_dir()  # sweeps
        assert held.is_dir() and (held / "v000002").is_dir()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    _wait_unlocked(held)
    third = ServedWeights(None)
    third._private_dir()  # the next worker's sweep
    assert not held.exists() and mine.is_dir()
    other.close()
    third.close()
    assert not mine.exists()


def test_a_worker_whose_private_folder_is_gone_makes_a_new_one(chain):
    """Its served rebuild went with it: the next delta is rebuilt from the chain's full
    publication into a new private folder (it once kept the removed path and failed every
    delta after with FileNotFoundError)."""
    import shutil

    sync_dir, worker = chain
    gone = worker._private
    shutil.rmtree(gone)
    folder, files, _ = worker.prepare(3)
    assert folder.parent.is_dir() and folder.parent != gone
    fresh = ServedWeights(sync_dir)
    reference, _, _ = fresh.prepare(3)
    _same_bytes(folder, files, reference)
    worker.served(3, folder, files)
    assert worker.folder == folder and folder.is_dir()
    fresh.close()
