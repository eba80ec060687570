"""The test harness itself: failures and timeouts show the output, a timeout ends the whole
process tree, one failed process ends the others, and children get a clean environment."""

from __future__ import annotations

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


def test_timeout_ends_the_whole_tree_and_shows_the_output(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(pytest.fail.Exception, match="timed out after 20 s") as failure:
        harness.run_process([sys.executable, "-c", code], timeout_s=20)
    assert "started" in str(failure.value)
    assert _gone(int(pid_file.read_text()))


def test_one_failed_process_ends_the_others(tmp_path):
    """Like a torchrun agent waiting for a node that crashed: it is ended, not waited for."""
    waiter = [sys.executable, "-c", "import time; time.sleep(600)"]
    crash = [sys.executable, "-c", "import sys; sys.exit(7)"]
    run = harness._run_together(
        [waiter, crash], cwd=tmp_path, env=None, timeout_s=300, check=False, on_line=None
    )
    assert run.returncode == 7
    assert run.stdout.startswith("--- process 0 ---\n") and "--- process 1 ---\n" in run.stdout
