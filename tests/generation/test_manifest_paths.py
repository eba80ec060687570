"""A publication's manifest is read, not trusted: a worker refuses, before it opens or
creates any file, every name or delta target that is not a plain file name of the
publication's folder, and no byte outside that folder changes (a forged target once made
the rebuild write over any file the worker could). Workers refuse a sync dir that another
user owns or may write to, as the trainer does."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from simko_tune.generation import PublicationError, publish_weights
from simko_tune.generation.deltas import (
    DELTA_SUFFIX,
    FRAME_CHECKSUMS,
    DeltaSettings,
    DeltaWriter,
    ServedWeights,
)
from simko_tune.generation.sync_dir import MANIFEST, version_dir
from simko_tune.generation.weights import read_publication
from simko_tune.models import read_hf_config

SHARD = 20_000  # bytes: the tiny model in several shards


@pytest.fixture
def pubs(gen_model_dir, ref, tmp_path, monkeypatch):
    """``tmp_path/sync`` with version 1 (full) and 2 (a delta on it, in frames of 4 KiB);
    the workers' private folders under ``tmp_path/shm``."""
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o700)
    monkeypatch.setattr("simko_tune.generation.deltas.private_root", lambda: shm)
    hf = read_hf_config(gen_model_dir)
    model = ref.trainer_model(gen_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = tmp_path / "sync"
    writer = DeltaWriter(DeltaSettings(max_ratio=1.0, frame_bytes=4096))
    for version in (1, 2):
        torch.manual_seed(version)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        writer.begin(version)
        publish_weights(model, version, sync, hf, max_shard_bytes=SHARD, delta=writer)
        writer.end(True)
    return sync


def _outside(tmp_path: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ``tmp_path`` but the publications and the
    workers' own private folders: what a forged manifest must not touch."""
    out = {}
    for p in sorted(tmp_path.rglob("*")):
        rel = p.relative_to(tmp_path).parts
        if rel[0] == "sync" or (rel[0] == "shm" and len(rel) > 1 and rel[1].startswith("worker-")):
            continue
        if p.is_file() or p.is_symlink():
            out[str(p)] = (p.read_bytes() if p.is_file() else b"", p.lstat().st_mtime_ns)
        else:
            out[str(p)] = (b"<dir>", 0)
    return out


def _forge(sync: Path, version: int, change) -> tuple[Path, str]:
    """Edit ``version``'s manifest: ``change(files)`` returns the name of the entry it
    forged. Returns the manifest's path and that name."""
    path = version_dir(sync, version) / MANIFEST
    meta = json.loads(path.read_text())
    forged = change(meta["files"])
    path.write_text(json.dumps(meta))
    return path, forged


def _refused(worker: ServedWeights, version: int, manifest: Path, entry: str, tmp_path: Path):
    """``prepare`` refuses, naming the manifest and the entry; nothing outside changed."""
    before = _outside(tmp_path)
    try:
        worker.prepare(version)
        error = "accepted"
    except PublicationError as e:
        error = str(e)
    assert _outside(tmp_path) == before
    assert str(manifest) in error and repr(entry) in error, error


@pytest.mark.parametrize("target", ["absolute", "dotdot", "separator", "empty", "nul", "null"])
def test_a_forged_delta_target_is_refused_before_any_file_is_written(pubs, tmp_path, target):
    """Version 2's first delta names another target; its frame checksums are wrong too, so
    only the name check stands between the rebuild and the file (``absolute``: the case that
    overwrote a file). The victim has the served shard's size and bytes, so the rebuild
    would go through to the checksum."""
    worker = ServedWeights(pubs)
    folder, files, _ = worker.prepare(1)
    worker.served(1, folder, files)
    first = sorted(f["name"] for f in files)[0]
    victim = tmp_path / "victim.safetensors"
    shutil.copyfile(folder / first, victim)
    forged = {
        "absolute": str(victim),
        "dotdot": "../../victim.safetensors",
        "separator": "sub/victim.safetensors",
        "empty": "",
        "nul": first + "\0",
        "null": None,
    }[target]

    def change(entries: dict) -> str:
        name = first + DELTA_SUFFIX
        entries[name]["target"] = forged
        entries[name][FRAME_CHECKSUMS] = ["0" * 16 for _ in entries[name][FRAME_CHECKSUMS]]
        return name

    manifest, entry = _forge(pubs, 2, change)
    _refused(worker, 2, manifest, entry, tmp_path)
    assert (worker.version, worker.folder) == (1, folder)
    worker.close()


@pytest.mark.parametrize("name", ["absolute", "dotdot", "separator", "symlink"])
def test_a_forged_file_name_is_refused(pubs, tmp_path, name):
    """Version 1's first shard moved out of its folder (or replaced by a symlink to it) and
    the manifest pointed at it, with its true size and checksum."""
    folder = version_dir(pubs, 1)
    first = sorted(folder.glob("*.safetensors"))[0]
    (tmp_path / "sub").mkdir()
    moved = tmp_path / ("sub" if name == "separator" else "") / first.name
    first.rename(moved)
    if name == "separator":
        (folder / "sub").symlink_to(tmp_path / "sub", target_is_directory=True)
    if name == "symlink":
        first.symlink_to(moved)
    forged = {
        "absolute": str(moved),
        "dotdot": f"../../{first.name}",
        "separator": f"sub/{first.name}",
        "symlink": first.name,
    }[name]

    def change(entries: dict) -> str:
        entries[forged] = entries.pop(first.name)
        return forged

    manifest, entry = _forge(pubs, 1, change)
    _refused(ServedWeights(pubs), 1, manifest, entry, tmp_path)
    with pytest.raises(PublicationError, match="refusing the manifest"):
        read_publication(pubs, 1)


@pytest.mark.parametrize("problem", ["group_writable", "world_writable", "symlink", "owner"])
def test_a_worker_refuses_a_sync_dir_others_may_write(pubs, tmp_path, problem):
    """As the trainer does (``prepare_sync_dir``): whoever may write there chooses the
    weights the worker loads."""
    sync = pubs
    if problem == "group_writable":
        sync.chmod(0o770)
    if problem == "world_writable":
        sync.chmod(0o757)
    if problem == "symlink":
        sync = tmp_path / "link"
        sync.symlink_to(pubs, target_is_directory=True)
    if problem == "owner":
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(sync, os.getuid() + 1, -1)
    worker = ServedWeights(sync)
    with pytest.raises(PublicationError, match=re.escape(f"sync dir {sync}: ")):
        worker.prepare(1)
    assert worker.version is None


def test_a_worker_refuses_a_bad_sync_dir_at_start(pubs, capsys, monkeypatch):
    """Before its engine spends a minute starting."""
    from simko_tune.generation import server

    def serve(*args, **kwargs):
        raise AssertionError("the worker started serving")

    monkeypatch.setattr(server, "serve", serve)
    pubs.chmod(0o777)
    with pytest.raises(SystemExit):
        server.main(["--model", str(pubs), "--sync-dir", str(pubs), "--port", "0"])
    assert f"sync dir {pubs}" in capsys.readouterr().err
