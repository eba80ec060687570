"""Two real torchrun ranks (gloo) through the recipe: waits for rank-0-only work never meet
the main group's timeout, and a failure on rank 0 (in generation, in publication) ends every
rank quickly, non-zero, with the cause in the log, instead of hanging in a collective."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from simko_tune.paths import free_port

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("fault_runner.py")
HANG_S = 240  # far beyond the fail-fast bound: reaching it means a rank hung
FAILED = "[rank 0] failed, ending every rank"


def _run(tmp_path: Path, model_dir: Path, *extra: str, env: dict[str, str]):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(RUNNER),
        "--config", "tiny_cpu", f"output_dir={out}", f"model_dir={model_dir}",
        "prepare_model=null", "generation.backend=native", "dataset.n=16",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "ppo.mini_batch_prompts=2",
        "rewards.num_workers=1", "eval.every_n_steps=0", "eval.before_training=false",
        "log.samples_every_n_steps=0", "max_steps=1", "checkpoint.every_n_steps=1",
        f"generation.sync_dir={out}/sync", *extra,
    ]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    failed_at = None  # when rank 0 reported its failure
    timer = threading.Timer(HANG_S, os.killpg, (proc.pid, signal.SIGKILL))
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if failed_at is None and FAILED in line:
                failed_at = time.time()
        proc.wait()
    finally:
        timer.cancel()
    ended_at = time.time()
    log = "".join(lines)
    if proc.returncode == -signal.SIGKILL:
        pytest.fail(f"ranks hung for {HANG_S} s:\n{log[-6000:]}")
    return proc.returncode, log, failed_at, ended_at


def test_generation_longer_than_the_collective_timeout_completes(tmp_path, tiny_model_dir):
    """Rank 1 waits 12 s for rank 0's generation; the main group's timeout is 4 s."""
    rc, log, _, _ = _run(
        tmp_path,
        tiny_model_dir,
        "parallel.collective_timeout_s=4",
        env={"SIMKO_TEST_GENERATE_SLEEP_S": "12"},
    )
    assert rc == 0, log[-6000:]
    assert (tmp_path / "out" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()


def _assert_failed_fast(rc: int, log: str, failed_at: float | None, ended_at: float, cause: str):
    assert rc != 0, log[-6000:]
    assert cause in log, log[-6000:]
    assert failed_at is not None, log[-6000:]
    assert ended_at - failed_at < 60, f"ranks took {ended_at - failed_at:.0f} s to end"
    # torchrun reports the failed rank with its non-zero exit code; the other was stopped
    assert "exitcode  : 1" in log or "exitcode: 1" in log, log[-3000:]


def test_generation_failure_ends_every_rank(tmp_path, tiny_model_dir):
    rc, log, failed_at, ended_at = _run(
        tmp_path, tiny_model_dir, env={"SIMKO_TEST_GENERATE_FAIL": "injected generation failure"}
    )
    _assert_failed_fast(rc, log, failed_at, ended_at, "injected generation failure")


def test_unwritable_sync_dir_ends_every_rank(tmp_path, tiny_model_dir):
    """Rank 0 cannot create the publication while rank 1 waits in the weights' all-gather."""
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the sync directory should be")
    rc, log, failed_at, ended_at = _run(
        tmp_path, tiny_model_dir, f"generation.sync_dir={blocker}/sync", env={}
    )
    _assert_failed_fast(rc, log, failed_at, ended_at, str(blocker))
