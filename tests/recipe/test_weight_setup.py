"""The main config as users start it: `generation.weight_transfer: auto` trains on two torchrun
ranks (files) and on one (memory), saying which in the run's first lines; a start whose weight
copies do not fit the sync dir's filesystem is refused before any publication."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from harness import TUNE_RUN, child_env, run_process, run_torchrun

from simko_tune.metrics.tensorboard import read_scalars

pytestmark = pytest.mark.slow

STEPS = 2


def _args(out: Path, policy: Path, *extra: str) -> list[str]:
    """tiny_cpu with a small batch and no evaluation; generation left at the config's."""
    return [
        "--config", "tiny_cpu", f"output_dir={out}", f"model_dir={policy}", "prepare_model=null",
        f"max_steps={STEPS}", "rollout.prompts_per_step=4", "ppo.mini_batch_prompts=2",
        "ppo.micro_batch_size=8", "dataset.n=64", "eval.every_n_steps=0",
        "eval.before_training=false", "checkpoint.every_n_steps=0", *extra,
    ]  # fmt: skip


def _first_lines(stderr: str) -> list[str]:
    """The run's first lines: stderr before the progress bar's first line (the first step)."""
    lines = stderr.splitlines()
    return lines[: next((i for i, line in enumerate(lines) if "%|" in line), len(lines))]


def _trained(out: Path) -> None:
    scalars = read_scalars(out / "tb")
    assert sorted(scalars["loss"]) == list(range(1, STEPS + 1)), scalars.get("loss")


@pytest.mark.parametrize(
    ("nproc", "expected"),
    [(2, "weight transfer: files (auto: 2 trainer ranks"), (1, "weight transfer: memory (auto:")],
    ids=["two_ranks_files", "one_rank_memory"],
)
def test_main_config_trains_with_the_transfer_auto_picks(tmp_path, policy_dir, nproc, expected):
    out = tmp_path / "out"
    args = _args(out, policy_dir)
    if nproc == 1:
        result = run_process([*TUNE_RUN, "simko_recipe", *args], cwd=tmp_path, timeout_s=600)
    else:
        result = run_torchrun(
            nproc, "simko_recipe", args, launcher=TUNE_RUN, cwd=tmp_path, timeout_s=600
        )
    first = _first_lines(result.stderr)
    assert any(line.startswith(expected) for line in first), (first, result.stderr[-3000:])
    _trained(out)


RUNNER = """
import shutil, sys
import simko_recipe
usage = shutil.disk_usage("/")
shutil.disk_usage = lambda path: usage._replace(free=1000)  # a full filesystem everywhere
sys.argv = ["simko_recipe", *sys.argv[1:]]
sys.exit(simko_recipe.recipe_main())
"""


def test_start_refuses_weight_copies_that_do_not_fit(tmp_path, policy_dir):
    """Files with deltas: the sync dir (on tmp_path) and the native generator's rebuilt copies
    (under private_root) each need more than the 1000 bytes free; the run stops at its start,
    naming both remedies, before any publication or generation."""
    out, sync = tmp_path / "out", tmp_path / "sync"
    args = _args(
        out, policy_dir, "generation.weight_transfer=files", "generation.weight_delta=true",
        f"generation.sync_dir={sync}",
    )  # fmt: skip
    result = run_process(
        [sys.executable, "-c", RUNNER, *args], cwd=tmp_path, env=child_env(), check=False,
        timeout_s=600,
    )  # fmt: skip
    assert result.returncode != 0
    assert "not enough space for the weight copies" in result.stderr, result.stderr[-3000:]
    assert "set generation.weight_delta=false" in result.stderr
    assert "point generation.sync_dir at a larger filesystem" in result.stderr
    assert sync.is_dir() and not any(sync.iterdir())  # prepared, nothing published
    assert not (out / "tb").exists() or not read_scalars(out / "tb")
