"""Two real torchrun ranks (gloo) through the recipe: waits for rank-0-only work never meet
the main group's timeout, and a failure on rank 0 (in generation, in publication) ends every
rank quickly, non-zero, with the cause in the log, instead of hanging in a collective."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import child_env, run_torchrun

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("fault_runner.py")
HANG_S = 240  # far beyond the fail-fast bound: reaching it means a rank hung (the test fails)
FAILED = "[rank 0] failed, ending every rank"


def _run(tmp_path: Path, model_dir: Path, *extra: str, env: dict[str, str]):
    """Two ranks through the recipe: exit code, output, when rank 0 reported its failure
    (None if it did not), when every rank had ended."""
    out = tmp_path / "out"
    args = [
        "--config", "tiny_cpu", f"output_dir={out}", f"model_dir={model_dir}",
        "prepare_model=null", "generation.backend=native", "generation.weight_transfer=files",
        "dataset.n=16",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "ppo.mini_batch_prompts=2",
        "rewards.num_workers=1", "eval.every_n_steps=0", "eval.before_training=false",
        "log.samples_every_n_steps=0", "max_steps=1", "checkpoint.every_n_steps=1",
        f"generation.sync_dir={out}/sync", *extra,
    ]  # fmt: skip
    failed_at = []

    def note_failure(line: str) -> None:
        if FAILED in line:
            failed_at.append(time.time())

    result = run_torchrun(
        2, RUNNER, args, cwd=tmp_path, env=child_env(**env), timeout_s=HANG_S, check=False,
        on_line=note_failure,
    )  # fmt: skip
    ended_at = time.time()
    log = result.stdout + result.stderr
    return result.returncode, log, min(failed_at, default=None), ended_at


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
