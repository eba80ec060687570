"""How tests start the processes they check: one child environment, one launcher.

A run that times out is ended with every process under it (torchrun agents, their ranks,
generation and reward workers), and so is whatever a run leaves in its session. Output is
captured, stdout and stderr apart, and shown when a run fails. Tests import this module as
``harness`` (pytest puts ``tests/`` on ``sys.path``: ``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import psutil
import pytest

from simko_tune.paths import free_port

TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
TUNE_RUN = ("tune", "run")  # torchtune's CLI: torchrun's options, then a recipe name or path
# Set by torchrun in its ranks; a child that inherited them would join the wrong group.
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_TAIL = 4000  # characters of each stream shown on failure
_READ_GRACE_S = 10  # for the pipes to close once every process of a run has ended


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a child: one thread per process (a 2-core machine runs
    several ranks), unbuffered output (read while it runs), no inherited rank variables,
    then ``overrides``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in _RANK_VARS:
        env.pop(key, None)
    env.update(overrides)
    return env


def output_tail(result: subprocess.CompletedProcess) -> str:
    """The end of a finished child's stdout and stderr, for assertion messages."""
    return f"--- stdout ---\n{result.stdout[-_TAIL:]}\n--- stderr ---\n{result.stderr[-_TAIL:]}"


class _Child:
    """A started child in its own session whose two streams are read line by line as they
    come (by two threads, so neither pipe fills and blocks it)."""

    def __init__(self, cmd: Sequence[str], cwd, env, on_line: Callable[[str], None] | None):
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: tuple[list[str], list[str]] = ([], [])
        self.readers = [
            threading.Thread(target=self._read, args=(stream, lines, on_line), daemon=True)
            for stream, lines in zip((self.proc.stdout, self.proc.stderr), self.lines)
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str], on_line) -> None:
        for line in stream:
            lines.append(line)
            if on_line is not None:
                on_line(line)
        stream.close()

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self) -> subprocess.CompletedProcess:
        """End the child if it still runs, with every process under it (torchrun starts each
        rank in a session of its own, so ending the child's session alone would leave them
        holding the pipes), end whatever it left in its session, and collect its output."""
        if self.proc.poll() is None:
            _kill_tree(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for reader in self.readers:  # a process that escaped both may still hold a pipe
            reader.join(timeout=_READ_GRACE_S)
        stdout, stderr = ("".join(lines) for lines in self.lines)
        if any(reader.is_alive() for reader in self.readers):
            stderr += "\n[harness: output may be cut: a process outlived the child, pipes open]\n"
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants, listed first (once the parent is gone, they are
    no longer reachable through it)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _run_together(
    commands: Sequence[Sequence[str]],
    *,
    cwd: Path | str | None,
    env: dict[str, str] | None,
    timeout_s: float,
    check: bool,
    on_line: Callable[[str], None] | None,
) -> subprocess.CompletedProcess:
    """Start every command at once and wait until all have ended, one has failed (the
    others are then ended: they may be waiting for it) or ``timeout_s`` has passed. One
    result: the first non-zero exit code, the outputs one after the other."""
    deadline = time.monotonic() + timeout_s
    # A temp dir of the run's own, removed after it: torchrun's agents leave their log dirs
    # (torchelastic_*) in the temp dir, and killed vLLM engines their file stores.
    tmp = tempfile.mkdtemp(prefix="simko_test_run_")
    env = {**(child_env() if env is None else env), "TMPDIR": tmp}
    try:
        children = [_Child(cmd, cwd, env, on_line) for cmd in commands]
        codes = [child.proc.poll() for child in children]
        while None in codes and not any(codes) and time.monotonic() < deadline:
            time.sleep(0.05)
            codes = [child.proc.poll() for child in children]
        timed_out = None in codes and not any(codes)
        results = [child.finish() for child in children]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = results[0]
    if len(results) > 1:
        label = [f"--- process {i} ---\n" for i in range(len(results))]
        result = subprocess.CompletedProcess(
            [r.args for r in results],
            next((c for c in codes if c), 0),  # ended after a failure: -9, not the cause
            "".join(lb + r.stdout for lb, r in zip(label, results)),
            "".join(lb + r.stderr for lb, r in zip(label, results)),
        )
    if timed_out:
        pytest.fail(f"{result.args} timed out after {timeout_s} s\n{output_tail(result)}")
    if check:
        assert result.returncode == 0, f"{result.args} exited {result.returncode}\n" + (
            output_tail(result)
        )
    return result


def run_process(
    cmd: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
    check: bool = True,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (environment: ``child_env()`` unless given) to its end; the test fails,
    showing the output's end, if it runs past ``timeout_s`` or (``check``) exits non-zero.
    ``on_line`` sees every line of either stream as it arrives."""
    return _run_together([cmd], cwd=cwd, env=env, timeout_s=timeout_s, check=check, on_line=on_line)


def run_torchrun(
    nproc: int,
    script: Path | str,
    args: Sequence[str] = (),
    *,
    nnodes: int = 1,
    launcher: Sequence[str] = TORCHRUN,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
    check: bool = True,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess:
    """``script args`` on ``nproc`` ranks per node, as :func:`run_process` runs a command.

    One node: one agent on a free port of 127.0.0.1. Several: one agent per node, all on
    this machine, meeting through c10d rendezvous as agents on separate machines do.
    ``launcher`` is torchrun, or ``TUNE_RUN`` with a recipe name as ``script``.
    """
    launch = [*launcher, "--nproc_per_node", str(nproc)]
    if nnodes == 1:
        commands = [[*launch, "--master_addr", "127.0.0.1", "--master_port", str(free_port())]]
    else:
        rendezvous = [
            "--nnodes", str(nnodes), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "simko-test",
        ]  # fmt: skip
        commands = [[*launch, *rendezvous, "--node_rank", str(n)] for n in range(nnodes)]
    return _run_together(
        [[*c, str(script), *args] for c in commands],
        cwd=cwd, env=env, timeout_s=timeout_s, check=check, on_line=on_line,
    )  # fmt: skip


def load_module(path: Path | str) -> ModuleType:
    """The script at ``path`` (a tool or a rank's worker, which are not packages) imported
    as a module named after its file, so a test can call its functions directly."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
