"""Preemption: a signal on one rank, mid-update or mid-generation, stops every rank at the
same point with a checkpoint and exit code 75; resume=auto then continues exactly as a run
that was never stopped (metrics and final weights bit for bit), synchronous and one-step-off.
Also a single `tune run` process sent a real SIGTERM from outside; a signal during a periodic
checkpoint (written once); a reward worker killed mid-check (its check scored again)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from harness import TUNE_RUN, child_env, run_torchrun
from omegaconf import OmegaConf
from safetensors.torch import load_file

from simko_tune.checkpoint import CheckpointManager
from simko_tune.config import check_schema, resolve_config_path
from simko_tune.metrics.tensorboard import read_scalars
from simko_tune.preemption import EXIT_CODE, Preempted, PreemptionWatch, signal_number

RUNNER = Path(__file__).with_name("fault_runner.py")
STEPS = 5
VOLATILE = ("time/", "time_share/", "throughput/", "perf/", "eta_s", "memory/")


def test_signal_names():
    assert signal_number("SIGTERM") == signal.SIGTERM and signal_number("USR1") == signal.SIGUSR1
    assert PreemptionWatch.check_names(["SIGTERM", "SIGNOPE", "SIGKILL"]) == [
        "checkpoint.preempt_signals: 'SIGNOPE' is not a signal that can be caught",
        "checkpoint.preempt_signals: 'SIGKILL' is not a signal that can be caught",
    ]


def test_a_handled_signal_only_sets_the_flag():
    watch = PreemptionWatch(["SIGUSR1"])
    try:
        assert not watch.agreed()
        signal.raise_signal(signal.SIGUSR1)  # the process goes on: the handler only records it
        assert watch.agreed() and watch.signal_name == "SIGUSR1"
        assert watch.seconds_since_request() >= 0
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


# --------------------------------------------------------------------------- real runs


def _args(out: Path, policy: Path, staleness: int, *extra: str) -> list[str]:
    return [
        "--config", "tiny_cpu", f"output_dir={out}", f"model_dir={policy}", "prepare_model=null",
        "generation.backend=native", "generation.weight_transfer=files",
        f"generation.sync_dir={out}/sync", "dataset.n=32",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "ppo.mini_batch_prompts=2",
        "ppo.micro_batch_size=8", "rewards.num_workers=1", "eval.every_n_steps=0",
        "eval.before_training=false", "log.samples_every_n_steps=0", f"max_steps={STEPS}",
        "checkpoint.every_n_steps=2", f"rollout.max_staleness={staleness}", *extra,
    ]  # fmt: skip


def _run(tmp_path: Path, args: list[str], signal_at: str = "", check: bool = True):
    env = child_env(SIMKO_TEST_SIGNAL=signal_at) if signal_at else child_env()
    return run_torchrun(2, RUNNER, args, cwd=tmp_path, env=env, timeout_s=600, check=check)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    hf = out / "checkpoints" / f"step_{STEPS:08d}" / "hf"
    return {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}


def _by_step(tb: Path) -> dict[str, dict[int, float]]:
    """Every non-volatile scalar; a step logged twice (before and after a stop) keeps the
    last value, which must equal the uninterrupted run's anyway."""
    return {t: v for t, v in read_scalars(tb).items() if not t.startswith(VOLATILE)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, policy_dir):
    runs = {}
    for staleness in (0, 1):
        root = tmp_path_factory.mktemp(f"full_s{staleness}")
        _run(root, _args(root / "out", policy_dir, staleness))
        runs[staleness] = root / "out"
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 1])
@pytest.mark.parametrize(
    "signal_at", ["update:2:1", "generate:3"], ids=["mid_update_rank1", "mid_generation_rank0"]
)
def test_stop_on_one_ranks_signal_then_resume_exactly(
    tmp_path, policy_dir, uninterrupted, staleness, signal_at
):
    out = tmp_path / "out"
    stopped = _run(tmp_path, _args(out, policy_dir, staleness), signal_at, check=False)
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, log[-4000:]  # torchrun reports the ranks' code 75 as a failure
    assert "preempted" in log and f"exiting with {EXIT_CODE}" in log, log[-4000:]
    assert "failed, ending every rank" not in log  # a stop, not a crash
    assert not (out / "checkpoints" / f"step_{STEPS:08d}").exists()
    _run(tmp_path, _args(out, policy_dir, staleness, "resume=auto"))
    ref, got = _by_step(uninterrupted[staleness] / "tb"), _by_step(out / "tb")
    assert set(ref) == set(got)
    for tag, values in ref.items():
        assert got[tag] == values, tag  # every step, bit for bit
    a, b = _weights(uninterrupted[staleness]), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_one_process_stops_on_an_outside_sigterm(tmp_path, policy_dir):
    """`tune run` without torchrun, SIGTERM from outside mid-run: exit code 75 within the
    CPU default's grace, then the resumed run ends as an uninterrupted one."""
    full = tmp_path / "full"
    subprocess.run([*TUNE_RUN, "simko_recipe", *_args(full, policy_dir, 0)], cwd=tmp_path,
                   env=child_env(), check=True, capture_output=True, timeout=600)  # fmt: skip
    out = tmp_path / "out"
    args = [*TUNE_RUN, "simko_recipe", *_args(out, policy_dir, 0)]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    first = out / "checkpoints" / "step_00000002" / "COMPLETE"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    started = time.time()
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CODE, log[-4000:]
    assert time.time() - started < 60  # the CPU default stops within its grace
    subprocess.run([*args, "resume=auto"], cwd=tmp_path, env=child_env(), check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    a, b = _weights(full), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref, got = _by_step(full / "tb"), _by_step(out / "tb")
    assert all(got[tag] == values for tag, values in ref.items())


# --------------------------------------------------------------------------- in process


def _recipe(out: Path, policy: Path, **overrides):
    """The recipe in this process (its signal handlers are real: pytest runs tests in the
    main thread), set up as _args configures the torchrun runs."""
    import simko_recipe

    cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
    for key, value in {
        "output_dir": str(out), "model_dir": str(policy), "prepare_model": None,
        "generation.backend": "native", "generation.weight_transfer": "memory", "dataset.n": 32,
        "rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 4,
        "ppo.mini_batch_prompts": 2, "ppo.micro_batch_size": 8, "rewards.num_workers": 1,
        "eval.every_n_steps": 0, "eval.before_training": False, "log.samples_every_n_steps": 0,
        "max_steps": STEPS, "checkpoint.every_n_steps": 2, **overrides,
    }.items():  # fmt: skip
        OmegaConf.update(cfg, key, value, force_add=True)
    recipe = simko_recipe.SimKORecipe(check_schema(cfg))
    recipe.setup()
    return recipe


@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 1])
def test_a_signal_during_a_periodic_checkpoint_writes_it_once(
    tmp_path, policy_dir, monkeypatch, staleness
):
    """The signal comes while step 2's periodic checkpoint is written. Synchronous, that
    checkpoint is the stop's: it is not written again. One-step-off, the stop's holds the
    prefetched rollout as well, so it is written once more, with it."""
    writes: list[tuple[int, bool]] = []
    save = CheckpointManager.save

    def save_and_signal(self, step, **kwargs):
        writes.append((step, "pending_rollout" in kwargs["extra"]))
        path = save(self, step, **kwargs)
        if len(writes) == 1:
            signal.raise_signal(signal.SIGUSR1)  # before the write returns
        return path

    monkeypatch.setattr(CheckpointManager, "save", save_and_signal)
    recipe = _recipe(tmp_path / "out", policy_dir, **{"rollout.max_staleness": staleness})
    try:
        with pytest.raises(Preempted, match="preempted at step 2 \\(SIGUSR1\\)"):
            recipe.train()
    finally:
        recipe.cleanup()
    assert writes == ([(2, False)] if staleness == 0 else [(2, False), (2, True)])
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step_00000002"]


@pytest.mark.slow
def test_a_rollout_whose_reward_worker_was_killed_is_scored_right(
    tmp_path, policy_dir, monkeypatch
):
    """A reward worker killed mid-check (SIGKILL: no handler can spare it) does not turn
    that check into a 0 the step trains on: the check is scored again. Every completion
    earns 1 here, so any silent 0 would show; the rescore is counted in TensorBoard."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # spawned workers import it
    import slow_reward

    recipe = _recipe(
        tmp_path / "out", policy_dir, max_steps=1, **{"rewards.fn": "slow_reward.slow_full_reward",
        "rewards.num_workers": 2, "rewards.timeout_s": 30.0},
    )  # fmt: skip
    try:
        pool = recipe.reward_pool
        score = pool.score
        score(["warm-up"], ["0"])  # both workers are up

        def score_and_kill(texts, golds):
            victim = pool.worker_pids()[0]
            timer = threading.Timer(3 * slow_reward.CHECK_S, os.kill, (victim, signal.SIGKILL))
            timer.start()
            try:
                return score(texts, golds)
            finally:
                timer.join()

        pool.score = score_and_kill
        sampled = recipe.sample(recipe.batches.peek_batch(), 0, recipe.weight_version)
        assert sampled.batch.rewards.tolist() == [1.0] * 16
        assert (pool.stats.rescored, pool.stats.crashes) == (1, 0)
        del pool.score
        recipe.train()
    finally:
        recipe.cleanup()
    scalars = read_scalars(tmp_path / "out" / "tb")
    assert scalars["reward/rescored_total"] == {1: 1.0}
    assert scalars["reward/crashes_total"] == {1: 0.0}
