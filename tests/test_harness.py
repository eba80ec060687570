"""The test harness itself: failures and timeouts show the output, a timeout ends the whole
process tree, one failed process ends the others, and children get a clean environment."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import harness
import pytest


def test_child_env_drops_rank_variables_and_applies_overrides(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("SIMKO_HARNESS_PROBE", "kept")
    env = harness.child_env(OMP_NUM_THREADS="2")
    assert "RANK" not in env and "MASTER_PORT" not in env
    assert env["SIMKO_HARNESS_PROBE"] == "kept" and env["OMP_NUM_THREADS"] == "2"
    assert env["PYTHONUNBUFFERED"] == "1"
    run = harness.run_process([sys.executable, "-c", "import os; print(os.environ.get('RANK'))"])
    assert run.stdout.strip() == "None"


def test_each_run_gets_a_temp_dir_of_its_own_removed_after_it():
    """What children leave in the temp dir (torchrun's log dirs) goes with the run."""
    code = (
        "import tempfile, pathlib; d = tempfile.gettempdir(); "
        "pathlib.Path(tempfile.mkdtemp(prefix='torchelastic_')).joinpath('x').write_text('x'); "
        "print(d)"
    )
    first = harness.run_process([sys.executable, "-c", code]).stdout.strip()
    second = harness.run_process([sys.executable, "-c", code]).stdout.strip()
    assert first != second and Path(first).name.startswith("simko_test_run_")
    assert not Path(first).exists() and not Path(second).exists()


def test_failure_shows_both_streams_and_every_line_is_seen():
    code = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(3)"
    seen = []
    with pytest.raises(AssertionError, match="exited 3") as failure:
        harness.run_process([sys.executable, "-c", code], on_line=seen.append)
    assert "to stdout" in str(failure.value) and "to stderr" in str(failure.value)
    assert sorted(seen) == ["to stderr\n", "to stdout\n"]
    run = harness.run_process([sys.executable, "-c", code], check=False)
    assert run.returncode == 3 and run.stdout == "to stdout\n" and run.stderr == "to stderr\n"


def _gone(pid: int) -> bool:
    """Ends soon: SIGKILL is delivered asynchronously, so wait for the process to be gone or
    a zombie nobody has reaped yet (a live one is still there after 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _spawner(pid_file: Path, then: str) -> list[str]:
    """A child that starts two sleeping grandchildren, one in its session and one in a new
    session as torchrun starts its ranks, writes their pids, prints, then runs ``then``."""
    code = (
        "import subprocess, sys, time\n"
        "sleep = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
        "kids = [subprocess.Popen(sleep), subprocess.Popen(sleep, start_new_session=True)]\n"
        f"open({str(pid_file)!r}, 'w').write(' '.join(str(k.pid) for k in kids))\n"
        "print('started', flush=True)\n"
        f"{then}\n"
    )
    return [sys.executable, "-c", code]


def test_timeout_ends_the_whole_tree_and_shows_the_output(tmp_path):
    pid_file = tmp_path / "grandchildren.pid"
    with pytest.raises(pytest.fail.Exception, match="timed out after 20 s") as failure:
        harness.run_process(_spawner(pid_file, "time.sleep(600)"), timeout_s=20)
    assert "started" in str(failure.value)
    for pid in pid_file.read_text().split():
        assert _gone(int(pid)), pid


def test_a_process_outliving_the_child_does_not_hang_the_run(tmp_path):
    """The grandchild in its own session keeps the pipes open after the child exits: the
    run still returns, says so, and its session's grandchild is ended."""
    pid_file = tmp_path / "grandchildren.pid"
    run = harness.run_process(_spawner(pid_file, "sys.exit(0)"), timeout_s=60)
    same_session, own_session = (int(pid) for pid in pid_file.read_text().split())
    try:
        assert run.stdout == "started\n" and "output may be cut" in run.stderr
        assert _gone(same_session)
    finally:
        os.kill(own_session, signal.SIGKILL)


def test_one_failed_process_ends_the_others(tmp_path):
    """Like a torchrun agent waiting for a node that crashed: it is ended, not waited for."""
    waiter = [sys.executable, "-c", "import time; time.sleep(600)"]
    crash = [sys.executable, "-c", "import sys; sys.exit(7)"]
    run = harness._run_together(
        [waiter, crash], cwd=tmp_path, env=None, timeout_s=300, check=False, on_line=None
    )
    assert run.returncode == 7
    assert run.stdout.startswith("--- process 0 ---\n") and "--- process 1 ---\n" in run.stdout
