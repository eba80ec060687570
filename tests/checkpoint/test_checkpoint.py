"""CheckpointManager: exact resume (one process and FSDP2 on two torchrun ranks), incomplete
checkpoints never taken, corrupt ones skipped on resume, keep-last pruning."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from harness import child_env, load_module, run_process, run_torchrun

from simko_tune.checkpoint import (
    MARKER,
    CheckpointLoadError,
    CheckpointManager,
    resolve_resume,
)

WORKER = Path(__file__).with_name("ckpt_worker.py")
TIMEOUT_S = 150


def _load_worker():
    return load_module(WORKER)


def assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        assert got[name].dtype == want[name].dtype, f"{what} {name}"
        assert torch.equal(got[name], want[name]), f"{what} {name}"


def assert_same_optimizer_state(got: dict, want: dict, what: str) -> None:
    """Every parameter's AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``), bit for bit."""
    assert got.keys() == want.keys(), what
    for name in want:
        assert sorted(want[name]) == ["exp_avg", "exp_avg_sq", "step"], f"{what} {name}"
        assert_same_tensors(got[name], want[name], f"{what} {name}")


def assert_resumed_exactly(resumed: dict, saved: dict) -> None:
    """The resumed run continues the saved one bit for bit: weights at the save, the next
    random draws of every rank, the LR, the extra dict, and the weights after one more step
    (which also depend on AdamW's moments and step count)."""
    assert resumed["extra"] == saved["extra"]
    assert resumed["lr"] == saved["lr"]
    assert len(resumed["draws"]) == len(saved["draws"])
    for got, want in zip(resumed["draws"], saved["draws"]):
        assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    for key in ("at_save", "after_next_step"):
        assert_same_tensors(resumed[key], saved[key], key)


def assert_optimizer_state_kept(resumed: dict, saved: dict, saved_at: int) -> None:
    """AdamW's state after the load is the saved one, and the step after a resume equals
    the step of a run that was never checkpointed (parameters and optimizer state)."""
    for name, state in saved["optim_at_save"].items():
        # a state a fresh optimizer cannot have, so a load that dropped it would show
        assert float(state["step"]) == saved_at and state["exp_avg"].abs().sum() > 0, name
    assert_same_optimizer_state(resumed["optim_at_save"], saved["optim_at_save"], "at save")
    straight = saved["uninterrupted"]
    for run in (resumed, saved):
        assert_same_tensors(run["after_next_step"], straight["params"], "next step")
        assert_same_optimizer_state(run["optim_after_next_step"], straight["optim"], "next step")


def test_round_trip_single_process(tmp_path):
    worker = _load_worker()
    saved = worker.run("save", str(tmp_path))
    resumed = worker.run("load", str(tmp_path))
    assert_resumed_exactly(resumed, saved)
    assert_optimizer_state_kept(resumed, saved, worker.SAVED_AT)
    # The load really replaced a different initialisation.
    fresh = worker.full_params(worker.tiny_model(seed=1))
    assert not torch.equal(
        fresh["tok_embeddings.weight"], saved["at_save"]["tok_embeddings.weight"]
    )


@pytest.fixture(scope="module")
def fsdp2_round_trip(tmp_path_factory) -> tuple[dict, dict, Path]:
    """Save on two FSDP2 ranks, then resume in a second launch: (saved, resumed, ckpt dir)."""
    tmp_path = tmp_path_factory.mktemp("fsdp2")
    results = {}
    for mode in ("save", "load"):
        out = tmp_path / f"{mode}.pt"
        args = ["--mode", mode, "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(out)]
        run_torchrun(2, WORKER, args, timeout_s=TIMEOUT_S)
        results[mode] = torch.load(out)
    return results["save"], results["load"], tmp_path / "ckpt"


@pytest.mark.slow
def test_round_trip_fsdp2_two_ranks(fsdp2_round_trip):
    saved, resumed, ckpt = fsdp2_round_trip
    assert len(saved["draws"]) == 2
    assert not torch.equal(saved["draws"][0][0], saved["draws"][1][0])
    assert_resumed_exactly(resumed, saved)
    files = set(os.listdir(CheckpointManager(ckpt).step_dir(_load_worker().SAVED_AT)))
    assert {"rng_rank00000.pt", "rng_rank00001.pt", "extra.pt", "dcp", MARKER} <= files


@pytest.mark.slow
def test_optimizer_state_survives_a_checkpoint_fsdp2_two_ranks(fsdp2_round_trip):
    """AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step`` of every parameter, each sharded
    over two ranks, equal bit for bit before the save and after the load; the step after
    the resume equals an uninterrupted run's."""
    saved, resumed, _ = fsdp2_round_trip
    assert_optimizer_state_kept(resumed, saved, _load_worker().SAVED_AT)


def _tiny_training_objects():
    worker = _load_worker()
    return worker.setup(seed=0)


def _save(manager: CheckpointManager, step: int) -> Path:
    model, optimizer, scheduler = _tiny_training_objects()
    return manager.save(
        step, model=model, optimizer=optimizer, lr_scheduler=scheduler, extra={"step": step}
    )


def test_incomplete_checkpoints_are_never_taken(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=5)
    good = _save(manager, 2)
    no_marker = tmp_path / "step_00000004"
    no_marker.mkdir()
    (no_marker / "extra.pt").write_bytes(b"partial")
    unpublished = tmp_path / "step_00000005.tmp"
    unpublished.mkdir()
    (unpublished / MARKER).write_text('{"step": 5, "files": []}')
    missing_file = tmp_path / "step_00000006"
    missing_file.mkdir()
    (missing_file / MARKER).write_text(
        '{"step": 6, "files": {"extra.pt": {"bytes": 1, "xxh3_64": "0"}}}'
    )
    truncated = tmp_path / "step_00000003"
    truncated.mkdir()
    (truncated / "extra.pt").write_bytes(b"x")
    (truncated / MARKER).write_text(
        '{"step": 3, "files": {"extra.pt": {"bytes": 2, "xxh3_64": "0"}}}'
    )
    bad_marker = tmp_path / "step_00000007"
    bad_marker.mkdir()
    (bad_marker / MARKER).write_text("{not json")

    with caplog.at_level(logging.WARNING, logger="simko_tune.checkpoint"):
        assert manager.latest() == good
    for path in (no_marker, unpublished, missing_file, bad_marker, truncated):
        assert str(path) in caplog.text
    assert resolve_resume("auto", tmp_path) == good
    assert resolve_resume(True, tmp_path) == good
    assert resolve_resume(str(good), tmp_path) == good
    for path, reason in (
        (no_marker, "no COMPLETE marker"),
        (unpublished, r"\.tmp"),
        (missing_file, "missing"),
        (bad_marker, "unreadable"),
        (truncated, "truncated"),
    ):
        with pytest.raises(ValueError, match=reason):
            resolve_resume(str(path), tmp_path)
        model, optimizer, _ = _tiny_training_objects()
        with pytest.raises(ValueError, match="not a complete checkpoint"):
            manager.load(path, model=model, optimizer=optimizer)


KILLED_WRITER = textwrap.dedent(
    """
    import importlib.util, os, signal, sys
    import simko_tune.checkpoint as ckpt

    spec = importlib.util.spec_from_file_location("w", sys.argv[1])
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    model, optimizer, scheduler = worker.setup(seed=0)
    manager = ckpt.CheckpointManager(sys.argv[2])
    manager.save(1, model=model, optimizer=optimizer, extra={})
    kill = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[3] == "before_marker":
        ckpt.Manifest.write = kill  # the marker is the manifest, written last
    elif sys.argv[3] == "before_rename":
        ckpt.replace_dir = kill
    else:  # "loop": save until killed from outside
        step = 2
        while True:
            manager.save(step, model=model, optimizer=optimizer, extra={})
            step += 1
    manager.save(2, model=model, optimizer=optimizer, extra={})
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", ["before_marker", "before_rename"])
def test_killed_writer_leaves_previous_checkpoint(tmp_path, kill_point):
    r = run_process(
        [sys.executable, "-c", KILLED_WRITER, str(WORKER), str(tmp_path), kill_point],
        timeout_s=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (tmp_path / "step_00000002.tmp").is_dir()
    assert not (tmp_path / "step_00000002").exists()
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000001"


@pytest.mark.slow
def test_writer_killed_at_any_moment_leaves_a_loadable_latest(tmp_path):
    """SIGKILL a process that saves in a loop, at an arbitrary moment: whatever latest()
    then returns loads."""
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(WORKER), str(tmp_path), "loop"],
        env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (tmp_path / "step_00000003").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "writer made no progress"
            time.sleep(0.01)
        time.sleep(0.137)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    latest = CheckpointManager(tmp_path).latest()
    assert latest is not None and int(latest.name.split("_")[1]) >= 2
    model, optimizer, _ = _tiny_training_objects()
    CheckpointManager(tmp_path).load(latest, model=model, optimizer=optimizer)


def test_keep_last_prunes_old_and_stale(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    (tmp_path / "step_00000001.tmp").mkdir(parents=True)
    for step in (1, 2, 3, 4):
        _save(manager, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
    model, optimizer, scheduler = _tiny_training_objects()
    extra = manager.load(manager.latest(), model=model, optimizer=optimizer, lr_scheduler=scheduler)
    assert extra == {"step": 4}


def test_resolve_resume_off_and_missing(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume(False, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "nothing_yet") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(str(tmp_path / "step_00000009"), tmp_path)
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _resume(manager: CheckpointManager, resume="auto"):
    model, optimizer, scheduler = _tiny_training_objects()
    return manager.resume(resume, model=model, optimizer=optimizer, lr_scheduler=scheduler)


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    """A flipped bit in the newest checkpoint's tensor data (which DCP itself would load
    silently) is caught by the marker's checksums: resume=auto warns and takes the previous
    complete checkpoint; named explicitly, the corrupt one is an error."""
    manager = CheckpointManager(tmp_path, keep_last=3)
    _save(manager, 1)
    newest = _save(manager, 2)
    shard = max((newest / "dcp").glob("*.distcp"), key=lambda p: p.stat().st_size)
    _flip_a_byte(shard)
    assert manager.latest() == newest  # sizes still match: the cheap check passes
    with caplog.at_level(logging.WARNING, logger="simko_tune.checkpoint"):
        path, extra = _resume(manager)
    assert path == manager.step_dir(1) and extra == {"step": 1}
    assert f"skipping checkpoint {newest}" in caplog.text and "corrupt" in caplog.text
    with pytest.raises(CheckpointLoadError, match="corrupt.*distcp"):
        _resume(manager, str(newest))


def test_resume_never_starts_over_when_every_checkpoint_fails(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        _flip_a_byte(_save(manager, step) / "extra.pt")
    with pytest.raises(CheckpointLoadError, match="no complete checkpoint loads"):
        _resume(manager)
    assert _resume(CheckpointManager(tmp_path / "fresh")) is None
    assert _resume(manager, None) is None


def test_files_added_before_the_marker_are_inside_the_checkpoint(tmp_path):
    """``write_more`` (the HF export) runs before the marker: its files are listed with
    checksums and published by the same rename."""
    manager = CheckpointManager(tmp_path)
    model, optimizer, scheduler = _tiny_training_objects()

    def export(folder: Path) -> None:
        assert folder.name.endswith(".tmp") and not (folder / MARKER).exists()
        (folder / "hf").mkdir()
        (folder / "hf" / "config.json").write_text("{}")

    path = manager.save(1, model=model, optimizer=optimizer, extra={}, write_more=export)
    files = json.loads((path / MARKER).read_text())["files"]
    assert files["hf/config.json"]["bytes"] == 2
    assert {"bytes", "xxh3_64"} <= files["extra.pt"].keys()
    import xxhash

    for name, info in files.items():  # an independent hash of each file's bytes
        assert xxhash.xxh3_64_hexdigest((path / name).read_bytes()) == info["xxh3_64"], name
