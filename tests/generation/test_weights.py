"""Weight publication: layout, atomicity, verification, pruning, sharded (FSDP2) gathering
spread over the ranks, and the WeightSync directory's life (ownership, stale versions, free
space, acknowledgement, pruning)."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simko_tune.generation import (
    PublicationError,
    WeightSync,
    prune_versions,
    publish_weights,
    verify_publication,
)
from simko_tune.generation.shards import _assign, _rounds, streamed_tensors, verified_tensors
from simko_tune.generation.sync_dir import default_sync_dir, published_versions, version_dir
from simko_tune.generation.weights import parse_weight_dtype, read_manifest
from simko_tune.models import read_hf_config
from simko_tune.parallel import exit_without_teardown


def _published_state(folder: Path) -> dict:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _publish_small_shards(gen_model_dir: Path, ref, sync_dir: Path) -> tuple[Path, list[dict]]:
    """Version 1 of the trainer's model, published in 20 kB shards (several files), and its
    manifest's file entries."""
    folder = publish_weights(
        ref.trainer_model(gen_model_dir),
        1,
        sync_dir,
        read_hf_config(gen_model_dir),
        max_shard_bytes=20_000,
    )
    return folder, read_manifest(sync_dir, 1)[1]


def test_publication_round_trips_hf_weights(gen_model_dir, ref, tmp_path):
    """The published tensors are exactly the HF checkpoint the trainer's weights came from."""
    model = ref.trainer_model(gen_model_dir)
    folder = publish_weights(
        model, 3, tmp_path, read_hf_config(gen_model_dir), max_shard_bytes=20_000
    )
    assert folder == version_dir(tmp_path, 3) and folder.name == "v000003"
    assert not (tmp_path / "v000003.tmp").exists()
    original = load_file(str(gen_model_dir / "model.safetensors"))
    published = _published_state(folder)
    assert published.keys() == original.keys()
    for k in original:
        torch.testing.assert_close(published[k], original[k], rtol=0, atol=0)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == 3 and len(manifest["files"]) > 1  # sharded at 20 kB
    for name, f in manifest["files"].items():
        assert (folder / name).stat().st_size == f["bytes"]
    _, shapes = verify_publication(tmp_path, 3)
    assert shapes == {k: list(v.shape) for k, v in original.items()}


def test_manifest_is_written_last(gen_model_dir, ref, tmp_path, monkeypatch):
    """A publish that dies before the manifest leaves only a .tmp folder, never a final one."""
    import simko_tune.generation.shards as shards

    calls = []
    real = shards._write_shard

    def write_then_die(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, path)

    monkeypatch.setattr(shards, "_write_shard", write_then_die)
    with pytest.raises(OSError):
        publish_weights(
            ref.trainer_model(gen_model_dir),
            1,
            tmp_path,
            read_hf_config(gen_model_dir),
            max_shard_bytes=20_000,
        )
    assert not version_dir(tmp_path, 1).exists()
    assert not (tmp_path / "v000001.tmp" / "manifest.json").exists()
    with pytest.raises(PublicationError, match="only a partial .tmp folder exists"):
        verify_publication(tmp_path, 1)


def _publish(gen_model_dir, ref, sync, version=1):
    return publish_weights(
        ref.trainer_model(gen_model_dir), version, sync, read_hf_config(gen_model_dir)
    )


def test_truncated_shard_is_refused(gen_model_dir, ref, tmp_path):
    shard = next(_publish(gen_model_dir, ref, tmp_path).glob("*.safetensors"))
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(PublicationError, match="truncated"):
        verify_publication(tmp_path, 1)


def test_missing_manifest_or_extra_shard_is_refused(gen_model_dir, ref, tmp_path):
    folder = _publish(gen_model_dir, ref, tmp_path)
    (folder / "stray.safetensors").write_bytes(b"x")
    with pytest.raises(PublicationError, match="not in the manifest"):
        verify_publication(tmp_path, 1)
    (folder / "manifest.json").unlink()
    with pytest.raises(PublicationError, match="manifest missing"):
        verify_publication(tmp_path, 1)
    with pytest.raises(PublicationError, match="not published"):
        verify_publication(tmp_path, 2)


def test_manifest_for_another_version_is_refused(gen_model_dir, ref, tmp_path):
    folder = _publish(gen_model_dir, ref, tmp_path, version=1)
    os.replace(folder, version_dir(tmp_path, 2))
    with pytest.raises(PublicationError, match="names version 1, expected 2"):
        verify_publication(tmp_path, 2)


def test_prune_keeps_acknowledged_and_newer(tmp_path):
    for name in ["v000001", "v000002", "v000003.tmp", "v000004", "v000005.tmp", "logs"]:
        (tmp_path / name).mkdir()
    prune_versions(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "v000004", "v000005.tmp"]
    assert published_versions(tmp_path) == [4]


def test_version_zero_is_reserved(gen_model_dir, ref, tmp_path):
    with pytest.raises(ValueError, match="positive"):
        _publish(gen_model_dir, ref, tmp_path, version=0)


def _fsdp2_model(model_dir):
    """The tiny model, seeded, sharded with FSDP2 over the process group there is."""
    from torch.distributed.fsdp import fully_shard

    from simko_tune.models import model_from_hf_config

    torch.manual_seed(0)
    model = model_from_hf_config(model_dir)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert any(type(p).__name__ == "DTensor" for p in model.parameters())
    return model


def _fsdp_rank(rank: int, world: int, init_file: str, model_dir: str, sync: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _fsdp2_model(model_dir)
        path = publish_weights(model, 5, sync, read_hf_config(model_dir), max_shard_bytes=50_000)
        result = {"rank": rank, "path": None if path is None else str(path)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # no rank tears its gloo pairs down while a peer still uses them
    finally:
        dist.destroy_process_group()
    exit_without_teardown(0)  # its result is written (an exception reaches mp.spawn instead)


@pytest.mark.slow
def test_fsdp2_publication_gathers_full_tensors(gen_model_dir, tmp_path):
    """Two gloo ranks with FSDP2-sharded parameters: each rank gathers and writes its own
    share of the tensors into its own shards, rank 0 the manifest (rank 1 returns None);
    the result equals the unsharded model's weights."""
    import torch.multiprocessing as mp

    from simko_tune.models import model_from_hf_config, tune_to_hf_converter

    sync, out = tmp_path / "sync", tmp_path / "out"
    out.mkdir()
    mp.spawn(
        _fsdp_rank,
        args=(2, str(tmp_path / "init"), str(gen_model_dir), str(sync), str(out)),
        nprocs=2,
    )
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["path"] == str(version_dir(sync, 5)) and results[1]["path"] is None
    torch.manual_seed(0)
    expected = tune_to_hf_converter(read_hf_config(gen_model_dir))(
        model_from_hf_config(gen_model_dir).state_dict()
    )
    published = _published_state(version_dir(sync, 5))
    assert published.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(published[k], expected[k], rtol=0, atol=0)
    verify_publication(sync, 5)
    _, files = read_manifest(sync, 5)
    writers = {f["name"].split("-")[1] for f in files}
    assert writers == {"r00000", "r00001"}  # both ranks wrote shards
    per_rank = {w: sum(f["tensor_bytes"] for f in files if w in f["name"]) for w in writers}
    total = sum(per_rank.values())
    assert max(per_rank.values()) < 0.75 * total  # and shared the bytes


def test_publication_in_the_engine_dtype(gen_model_dir, ref, tmp_path):
    """bf16 publication (the GPU engines' dtype): each tensor is the fp32 weight rounded
    to bf16, half the bytes."""
    hf_config = read_hf_config(gen_model_dir)
    fp32 = publish_weights(ref.trainer_model(gen_model_dir), 1, tmp_path, hf_config)
    bf16 = publish_weights(
        ref.trainer_model(gen_model_dir), 2, tmp_path, hf_config, dtype=torch.bfloat16
    )
    original = load_file(str(gen_model_dir / "model.safetensors"))
    published = _published_state(bf16)
    for k, v in original.items():
        assert published[k].dtype == torch.bfloat16
        assert torch.equal(published[k], v.to(torch.bfloat16)), k
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(bf16) < 0.51 * size(fp32)
    verify_publication(tmp_path, 2)


def test_weight_dtype_follows_the_engine():
    cfg = {"torch_dtype": "bfloat16"}
    assert parse_weight_dtype(None, {"dtype": "float32"}, cfg) == torch.float32
    assert parse_weight_dtype(None, {"dtype": "bfloat16"}, {}) == torch.bfloat16
    assert parse_weight_dtype(None, {}, cfg) == torch.bfloat16  # vLLM's "auto"
    assert parse_weight_dtype(None, {"dtype": "auto"}, {}) == torch.float32
    assert parse_weight_dtype("float16", {"dtype": "bfloat16"}, cfg) == torch.float16
    with pytest.raises(ValueError, match="generation.weight_dtype.*int3"):
        parse_weight_dtype("int3", {}, cfg)


def test_verified_tensors_are_the_published_bytes(gen_model_dir, ref, tmp_path):
    """The loader's tensors equal safetensors' own reading of the shards, layer by layer."""
    folder, files = _publish_small_shards(gen_model_dir, ref, tmp_path)
    expected = _published_state(folder)
    with verified_tensors(folder, files) as tensors:
        got = [(name, t.clone()) for name, t in tensors]
    assert sorted(n for n, _ in got) == sorted(expected)
    for name, t in got:
        assert torch.equal(t, expected[name]), name
    layers = [int(n.split(".")[2]) for n, _ in got if ".layers." in n]
    assert layers == sorted(layers)  # one layer at a time, whatever the file order


def test_assign_splits_the_order_into_balanced_runs():
    sizes = [100, 1, 50, 50, 3, 7, 90, 10]
    owner = _assign(sizes, 3)
    assert owner == sorted(owner) and sorted(set(owner)) == [0, 1, 2]  # contiguous runs
    load = [sum(s for s, o in zip(sizes, owner) if o == w) for w in range(3)]
    assert max(load) - min(load) <= max(sizes)  # off by at most one tensor
    assert _assign(sizes, 1) == [0] * len(sizes)
    assert _assign([5] * 8, 2) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_rounds_hold_one_shard_per_writer():
    """Each round holds at most one shard per writer; a writer's shards are consecutive
    runs of its tensors, each within the limit unless a single tensor exceeds it."""
    sizes = [40, 70, 10, 30, 100, 5, 60, 60, 20]
    owners = [0, 0, 0, 0, 1, 1, 1, 3, 3]
    rounds = _rounds(sizes, owners, max_shard_bytes=80)
    assert sorted(i for r in rounds for i in r) == list(range(len(sizes)))
    shards = {w: [[i for i in r if owners[i] == w] for r in rounds] for w in set(owners)}
    assert shards[0] == [[0], [1, 2], [3]]  # 40 + 70 > 80: a new shard
    assert shards[1] == [[4], [5, 6], []]  # 100 alone, over the limit
    assert shards[3] == [[7, 8], [], []]
    assert all(r == sorted(r) for r in rounds)
    assert _rounds([], [], 10) == []


class _Consumer:
    """A generator stand-in: records what it was asked to load and what the sync dir held."""

    def __init__(self, sync_dir: Path, fail_on: tuple[int, ...] = ()) -> None:
        self.sync_dir, self.fail_on, self.loads = sync_dir, fail_on, []

    def load_weights(self, version: int, timeout_s: float = 300.0) -> None:
        self.loads.append((version, published_versions(self.sync_dir)))
        verify_publication(self.sync_dir, version)
        if version in self.fail_on:
            raise RuntimeError("worker refused")


def test_weight_sync_delivers_then_prunes(gen_model_dir, ref, tmp_path):
    hf_config = read_hf_config(gen_model_dir)
    sync = WeightSync(tmp_path / "sync", hf_config)
    consumer = _Consumer(sync.sync_dir)
    sync.attach(consumer)
    model = ref.trainer_model(gen_model_dir)
    sync.publish(model, 1)
    sync.publish(model, 2)
    sync.close()  # joins the pruner
    # each version was complete when delivered, and the previous one still there (not
    # pruned before every worker acknowledged the new one)
    assert consumer.loads == [(1, [1]), (2, [1, 2])]
    assert published_versions(sync.sync_dir) == [2] and sync.acknowledged == 2

    failing = WeightSync(tmp_path / "sync", hf_config)
    failing.attach(_Consumer(failing.sync_dir, fail_on=(2,)))
    failing.publish(model, 1)  # a fresh start: no consumer acked yet, nothing to prune
    with pytest.raises(RuntimeError, match="refused"):
        failing.publish(model, 2)
    failing.close()
    assert published_versions(failing.sync_dir) == [1, 2]  # unacked: nothing pruned


def test_a_pruned_publication_is_written_over_in_place(gen_model_dir, ref, tmp_path):
    """Pruning keeps the newest full publication it removes as the spare; the next one is
    written into the spare's very files (same inodes: on /dev/shm, the same memory pages),
    holds exactly the new weights, and carries no file the spare had that it did not write.
    Closing with remove_on_close takes the spare too."""
    hf_config = read_hf_config(gen_model_dir)
    sync = WeightSync(tmp_path / "sync", hf_config, max_shard_bytes=20_000, remove_on_close=True)
    sync.attach(_Consumer(sync.sync_dir))
    model = ref.trainer_model(gen_model_dir)
    v1 = sync.publish(model, 1)
    inodes = {f.name: f.stat().st_ino for f in v1.iterdir() if f.name != "manifest.json"}
    assert len(inodes) > 1  # several shards at 20 kB
    v2_state = _published_state(sync.publish(model, 2))
    sync.transport._join_pruner()  # v1 pruned after every worker acknowledged v2
    spare = sync.sync_dir / "spare"
    assert published_versions(sync.sync_dir) == [2] and spare.is_dir()
    assert not (spare / "manifest.json").exists()
    (spare / "model-r00000-99999.safetensors").write_bytes(b"a shard v3 will not write")

    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    v3 = sync.publish(model, 3)
    assert not spare.exists()
    written = {f.name: f.stat().st_ino for f in v3.iterdir() if f.name != "manifest.json"}
    assert written == inodes  # the spare's files, written over; the stray one removed
    verify_publication(sync.sync_dir, 3)  # sizes and checksums of what was written over
    v3_state = _published_state(v3)
    assert v3_state.keys() == v2_state.keys()
    for name, tensor in v3_state.items():
        torch.testing.assert_close(tensor, v2_state[name] + 1.0, rtol=0, atol=0)
    sync.close()
    assert not sync.sync_dir.exists()  # its versions and the spare removed, then the folder


def test_weight_sync_deferred_delivery(gen_model_dir, ref, tmp_path):
    """One-step-off: the trainer writes versions without delivering them; the rollout
    thread delivers one just before it generates. Delivery is once per version, never of
    the start-up weights, and pruning never touches a version newer than the one served."""
    sync = WeightSync(tmp_path / "sync", read_hf_config(gen_model_dir))
    consumer = _Consumer(sync.sync_dir)
    sync.attach(consumer)
    model = ref.trainer_model(gen_model_dir)
    assert sync.deliver(0) == {}  # the workers' start-up weights: nothing to load
    sync.publish(model, 1, deliver=False)
    sync.publish(model, 2, deliver=False)
    assert consumer.loads == [] and sync.acknowledged is None
    assert set(sync.last_timings) == {"write_s"}
    timings = sync.deliver(1)
    assert "ack_s" in timings and sync.acknowledged == 1
    assert sync.deliver(1) == {}  # already served
    assert sync.deliver(3) == {}  # not published (yet)
    sync.publish(model, 3, deliver=False)  # joins the pruner: < 1 pruned, 2 and 3 kept
    assert published_versions(sync.sync_dir) == [1, 2, 3]
    sync.deliver(3)
    sync.close()
    assert consumer.loads == [(1, [1, 2]), (3, [1, 2, 3])]
    assert published_versions(sync.sync_dir) == [3] and sync.acknowledged == 3


class _StateConsumer:
    """An in-process generator stand-in: keeps a copy of every state it is handed."""

    def __init__(self) -> None:
        self.loads: list[tuple[int, dict[str, torch.Tensor]]] = []

    def load_state(self, version: int, state: dict[str, torch.Tensor]) -> None:
        self.loads.append((version, {k: v.clone() for k, v in state.items()}))


def test_weight_sync_in_memory_hands_over_each_version_as_published(
    gen_model_dir, ref, tmp_path, monkeypatch
):
    """Without a sync dir, a version is a copy of the weights taken at publish time: a
    deferred delivery hands over those weights, not the ones the trainer has updated since;
    delivered and older snapshots are dropped, a newer one is kept; no file is written."""
    monkeypatch.chdir(tmp_path)
    sync = WeightSync(None, read_hf_config(gen_model_dir), dtype=torch.float32)
    with pytest.raises(TypeError, match="generation.backend=native"):
        sync.attach(_Consumer(tmp_path))  # reads files: cannot take snapshots
    consumer = _StateConsumer()
    sync.attach(consumer)
    model = ref.trainer_model(gen_model_dir)
    expected = {}
    assert sync.deliver(0) == {}  # the start-up weights: nothing to hand over
    for version in (1, 2):
        expected[version] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        assert sync.publish(model, version, deliver=False) is None
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the trainer's next update, before any delivery
    assert consumer.loads == [] and set(sync.last_timings) == {"write_s"}
    assert sorted(sync.transport._snapshots) == [1, 2]
    assert "ack_s" in sync.deliver(1) and sync.acknowledged == 1
    assert sorted(sync.transport._snapshots) == [2]  # the delivered one dropped, the newer kept
    assert sync.deliver(1) == {} and sync.deliver(3) == {}  # served; not published
    sync.publish(model, 3)  # staleness 0: delivered at once
    assert sync.transport._snapshots == {} and sync.acknowledged == 3
    with pytest.raises(PublicationError, match="version 2: no snapshot"):
        sync.deliver(2)  # superseded by 3, which was delivered
    sync.close()
    assert [v for v, _ in consumer.loads] == [1, 3]
    for version, state in consumer.loads[:1]:
        assert state.keys() == expected[version].keys()
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, expected[version][name], rtol=0, atol=0)
    final = consumer.loads[1][1]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == []  # nothing on disk


def test_weight_sync_in_memory_casts_to_the_publication_dtype(gen_model_dir, ref):
    sync = WeightSync(None, read_hf_config(gen_model_dir), dtype=torch.bfloat16)
    consumer = _StateConsumer()
    sync.attach(consumer)
    model = ref.trainer_model(gen_model_dir)
    sync.publish(model, 1)
    ((_, state),) = consumer.loads
    for name, tensor in model.state_dict().items():
        assert state[name].dtype == torch.bfloat16
        torch.testing.assert_close(state[name], tensor.to(torch.bfloat16), rtol=0, atol=0)


def test_weight_sync_in_memory_unshards_a_one_rank_fsdp2_model(gen_model_dir, tmp_path):
    """torchrun with one process: the trainer's model is FSDP2-sharded on a one-rank mesh
    and holds DTensors; the in-process generator must get plain tensors, whole."""
    import torch.distributed as dist

    from simko_tune.models import model_from_hf_config

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = model_from_hf_config(gen_model_dir)
        model = _fsdp2_model(gen_model_dir)
        sync = WeightSync(None, read_hf_config(gen_model_dir), dtype=torch.float32)
        consumer = _StateConsumer()
        sync.attach(consumer)
        sync.publish(model, 1)
        sync.close()
    finally:
        dist.destroy_process_group()
    ((_, state),) = consumer.loads
    expected = plain.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert type(tensor) is torch.Tensor, name
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_weight_sync_clears_stale_versions_and_keeps_the_rest(gen_model_dir, tmp_path):
    root = tmp_path / "sync"
    for name in ["v000001", "v000002.tmp", "worker_logs"]:
        (root / name).mkdir(parents=True)
    sync = WeightSync(root, read_hf_config(gen_model_dir), remove_on_close=True)
    assert sorted(p.name for p in root.iterdir()) == ["worker_logs"]
    sync.close()
    assert root.is_dir()  # not empty: only our publications go


def test_weight_sync_refuses_directories_it_does_not_own(gen_model_dir, tmp_path):
    hf_config = read_hf_config(gen_model_dir)
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PublicationError, match="symlink"):
        WeightSync(tmp_path / "link", hf_config)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(PublicationError, match="other users"):
        WeightSync(open_dir, hf_config)
    if os.getuid() == 0:  # only root can give a directory away
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 12345, -1)
        with pytest.raises(PublicationError, match="owned by uid 12345"):
            WeightSync(theirs, hf_config)


def test_default_sync_dir_is_private(tmp_path):
    path = default_sync_dir("run_x")
    parent = path.parent
    st = os.lstat(parent)
    assert parent.name == f"simko_tune-{os.getuid()}" and st.st_uid == os.getuid()
    assert stat.S_IMODE(st.st_mode) == 0o700


def test_free_space_is_checked_before_writing(gen_model_dir, ref, tmp_path, monkeypatch):
    import simko_tune.generation.weights as weights

    sync = WeightSync(tmp_path / "sync", read_hf_config(gen_model_dir))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(PublicationError, match=r"GiB free, publishing version 1 needs"):
        sync.publish(ref.trainer_model(gen_model_dir), 1)
    assert not any((tmp_path / "sync").iterdir())  # nothing half-written


def test_streamed_tensors_hash_what_they_hand_out(gen_model_dir, ref, tmp_path):
    """Streaming: the same tensors as safetensors reads, in the model's order; a damaged
    file is reported at its end (its tensors were handed out: the caller rolls back)."""
    folder, files = _publish_small_shards(gen_model_dir, ref, tmp_path)
    expected = _published_state(folder)
    errors: list[str] = []
    with streamed_tensors(folder, files, errors) as tensors:
        got = [(name, t.clone()) for name, t in tensors]
    assert errors == [] and sorted(n for n, _ in got) == sorted(expected)
    for name, t in got:
        assert torch.equal(t, expected[name]), name
    layers = [int(n.split(".")[2]) for n, _ in got if ".layers." in n]
    assert layers == sorted(layers)


@pytest.mark.parametrize("damaged", ["first", "last"])
@pytest.mark.parametrize("reader", ["verify_publication", "verified_tensors", "streamed_tensors"])
def test_a_flipped_bit_is_refused(reader, damaged, gen_model_dir, ref, tmp_path):
    """One bit flipped in one shard's tensor data, caught by each way of reading: verifying
    (the trainer's check), verify-then-load (nothing handed out) and streaming (the tensors
    up to the damaged file's end are handed out, then the file is named)."""
    folder, files = _publish_small_shards(gen_model_dir, ref, tmp_path)
    k = 0 if damaged == "first" else len(files) - 1
    shard = folder / files[k]["name"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # the last tensor's data: the header still parses
    shard.write_bytes(bytes(data))
    if reader == "verify_publication":
        with pytest.raises(PublicationError, match=f"{shard.name}.*corrupt"):
            verify_publication(tmp_path, 1)
    elif reader == "verified_tensors":
        with pytest.raises(PublicationError, match=f"{shard.name}.*corrupt"):
            with verified_tensors(folder, files):
                pytest.fail("tensors were offered from a corrupt publication")
    else:
        errors: list[str] = []
        with streamed_tensors(folder, files, errors) as tensors:
            names = [name for name, _ in tensors]
        assert names == [n for f in files[: k + 1] for n in f["tensors"]]  # none after it
        assert len(errors) == 1 and "corrupt" in errors[0] and shard.name in errors[0]
