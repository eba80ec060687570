"""Weight publication: layout, atomicity, verification, pruning, sharded (FSDP2) gathering."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simko_tune.generation import (
    PublicationError,
    prune_versions,
    publish_weights,
    verify_publication,
)
from simko_tune.generation.weights import published_versions, version_dir
from simko_tune.models import read_hf_config


def _published_state(folder: Path) -> dict:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


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
    for f in manifest["files"]:
        assert (folder / f["name"]).stat().st_size == f["bytes"]
    _, shapes = verify_publication(tmp_path, 3)
    assert shapes == {k: list(v.shape) for k, v in original.items()}


def test_manifest_is_written_last(gen_model_dir, ref, tmp_path, monkeypatch):
    """A publish that dies before the manifest leaves only a .tmp folder, never a final one."""
    import simko_tune.generation.weights as weights

    calls = []
    real = weights._write_shard

    def write_then_die(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, path)

    monkeypatch.setattr(weights, "_write_shard", write_then_die)
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


def test_flipped_bytes_are_refused(gen_model_dir, ref, tmp_path):
    shard = next(_publish(gen_model_dir, ref, tmp_path).glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PublicationError, match="corrupt"):
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


def _fsdp_rank(rank: int, world: int, init_file: str, model_dir: str, sync: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from simko_tune.models import model_from_hf_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = model_from_hf_config(model_dir)
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert any(type(p).__name__ == "DTensor" for p in model.parameters())
        path = publish_weights(model, 5, sync, read_hf_config(model_dir), max_shard_bytes=50_000)
        result = {"rank": rank, "path": None if path is None else str(path)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # no rank tears its gloo pairs down while a peer still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_publication_gathers_full_tensors(gen_model_dir, tmp_path):
    """Two gloo ranks with FSDP2-sharded parameters: rank 0 writes the full tensors, rank 1
    returns None; the result equals the unsharded model's weights."""
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
