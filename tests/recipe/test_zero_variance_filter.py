"""Zero-variance groups: counted every step; with rollout.filter_zero_variance dropped before
the update, with rollout.max_oversample replaced by groups from extra rounds of prompts drawn
from the data order (resume stays exact); the update on the kept groups is the update on
those groups written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import TUNE_RUN, child_env, load_module, run_process, run_torchrun
from omegaconf import OmegaConf

from simko_tune.config import check_schema, resolve_config_path
from simko_tune.metrics.tensorboard import read_scalars
from simko_tune.plan import validate
from simko_tune.rollout import concat_rollouts

pytestmark = pytest.mark.slow

G, PER_STEP = 2, 4


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    from simko_tune.demo.warm_start import WarmStartConfig, build_tiny_policy

    out = tmp_path_factory.mktemp("policy") / "tiny_policy"
    return build_tiny_policy(
        out, WarmStartConfig(max_steps=20, target_success=None, sft_problems=64, eval_problems=8)
    )


def _cfg(out: Path, policy: Path, **extra):
    cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
    for key, value in {
        "output_dir": str(out), "model_dir": str(policy), "prepare_model": None,
        "generation.backend": "native", "generation.weight_transfer": "memory",
        "dataset.n": 64, "rollout.prompts_per_step": PER_STEP, "rollout.samples_per_prompt": G,
        "ppo.mini_batch_prompts": PER_STEP, "rewards.num_workers": 1,
        "eval.before_training": False, "eval.every_n_steps": 0, "checkpoint.every_n_steps": 1,
        "log.samples_every_n_steps": 0, "max_steps": 3, "resume": "auto",
        "rollout.filter_zero_variance": True, "rollout.max_oversample": 2, **extra,
    }.items():  # fmt: skip
        OmegaConf.update(cfg, key, value, force_add=True)
    return check_schema(cfg)


def _recipe(out: Path, policy: Path, **extra):
    import simko_recipe

    recipe = simko_recipe.SimKORecipe(_cfg(out, policy, **extra))
    recipe.setup()
    return recipe


# Scripted rewards per sampling call: groups 0 and 2 of the first round have a signal,
# group 1 of the second, groups 0, 1 and 3 of the third (four prompts of two samples each).
SCRIPT = [
    [1, 0, 0, 0, 0, 1, 1, 1],
    [0, 0, 1, 0, 1, 1, 0, 0],
    [0, 1, 1, 0, 0, 0, 1, 0],
]


def _scripted(recipe):
    calls = []
    score = recipe.reward_pool.score

    def scripted(texts, golds):
        score(texts, golds)  # the real pool still runs
        calls.append(len(texts))
        return [float(r) for r in SCRIPT[(len(calls) - 1) % len(SCRIPT)]]

    recipe.reward_pool.score = scripted
    return calls


def test_settings_are_validated(tmp_path, policy_dir, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    errors, _ = validate(_cfg(tmp_path, policy_dir, **{"rollout.filter_zero_variance": False}))
    assert any("max_oversample > 0 needs rollout.filter_zero_variance" in e for e in errors)
    errors, _ = validate(_cfg(tmp_path, policy_dir, **{"rollout.max_staleness": 1}))
    assert any("max_oversample > 0 needs rollout.max_staleness=0" in e for e in errors)


def test_filter_keeps_the_first_groups_with_a_signal_from_extra_rounds(tmp_path, policy_dir):
    recipe = _recipe(tmp_path / "out", policy_dir)
    try:
        calls = _scripted(recipe)
        drawn = []
        next_batch = recipe.batches.next_batch
        recipe.batches.next_batch = lambda: drawn.append(next_batch()) or drawn[-1]
        indices = recipe.batches.next_batch()
        rollout, texts = recipe.get_rollout(indices, {})
        rounds = drawn  # the step's own batch, then the extra rounds'
        assert len(calls) == 3 and len(rounds) == 3
        kept = [(0, 0), (0, 2), (1, 1), (2, 0)]  # the first four groups with a signal
        expected_rows = [r for k, j in kept for r in SCRIPT[k][j * G : (j + 1) * G]]
        assert rollout.rewards.tolist() == [float(r) for r in expected_rows]
        assert len(texts) == PER_STEP * G
        assert recipe.last_rollout_indices == [rounds[k][j] for k, j in kept]  # logged samples
        stats = recipe.last_rollout_stats
        assert stats["rollout/oversample_rounds"] == 2 and stats["rollout/groups_trained"] == 4
        assert stats["rollout/groups_dropped"] == 12 - 4
        assert stats["reward/identical_group_frac"] == pytest.approx(6 / 12)
        assert recipe.batches.state_dict()["offset"] == 3 * PER_STEP  # the extras count as used
    finally:
        recipe.cleanup()


def test_update_on_kept_groups_is_the_update_on_them_by_hand(tmp_path, policy_dir):
    recipe = _recipe(tmp_path / "out", policy_dir, **{"rollout.max_oversample": 0})
    try:
        calls = _scripted(recipe)
        start = {k: v.detach().clone() for k, v in recipe.model.state_dict().items()}
        raw = recipe.sample(recipe.batches.peek_batch(), recipe.step, recipe.weight_version)
        calls.clear()  # the step samples the same completions (same seed), scored alike
        rollout, _ = recipe.get_rollout(recipe.batches.next_batch(), {})
        by_hand = concat_rollouts(
            [raw.batch.select(torch.tensor([0, 1, 4, 5]))], pad_id=recipe.stop_ids[0]
        )  # groups 0 and 2 of the first script row: the only ones with a signal
        assert torch.equal(rollout.rewards, by_hand.rewards)
        assert torch.equal(rollout.tokens, by_hand.tokens)
        results = []
        for batch in (rollout, by_hand):
            recipe.model.load_state_dict(start)
            recipe.setup_update()
            stats = recipe.ppo.update(batch, None)
            results.append((stats, {k: v.clone() for k, v in recipe.model.state_dict().items()}))
        (a, wa), (b, wb) = results
        assert a["loss"] == b["loss"] and a["kept_responses"] == 4
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    finally:
        recipe.cleanup()


def test_resume_with_oversampling_draws_what_a_straight_run_draws(tmp_path, policy_dir):
    def drawn(out: Path, stops: list[int]) -> list[list[int]]:
        seen: list[list[int]] = []
        for max_steps in [*stops, 4]:
            recipe = _recipe(out, policy_dir, max_steps=max_steps)
            _scripted(recipe)
            next_batch = recipe.batches.next_batch
            recipe.batches.next_batch = lambda f=next_batch: seen.append(f()) or seen[-1]
            try:
                recipe.train()
            finally:
                recipe.cleanup()
        return seen

    straight = drawn(tmp_path / "straight", [])
    assert len(straight) > 4  # extra rounds were drawn
    assert drawn(tmp_path / "resumed", [2]) == straight


# --------------------------------------------------------------------------- skipped steps
SCRIPTED = Path(__file__).with_name("scripted_rewards.py")
SKIP_VOLATILE = ("time/", "time_share/", "throughput/", "perf/", "eta_s", "memory/")


def _cli_args(out: Path, policy: Path, *extra: str) -> list[str]:
    return [
        "--config", "tiny_cpu", f"output_dir={out}", f"model_dir={policy}", "prepare_model=null",
        "generation.backend=native", "dataset.n=64", "rollout.filter_zero_variance=true",
        "rewards.num_workers=1", "eval.every_n_steps=0", "eval.before_training=false",
        "log.samples_every_n_steps=1", "checkpoint.every_n_steps=1", *extra,
    ]  # fmt: skip


def test_two_ranks_skip_a_step_whose_only_signal_group_the_split_drops(tmp_path, policy_dir):
    """Three samples per prompt on two ranks: a group's rows split evenly only in pairs of
    groups. Step 0 has one group with a signal, which the split drops: the step is skipped
    with a message that says so (not that every group's rewards were equal), counted in
    TensorBoard, and step 1, with two such groups, trains."""
    out = tmp_path / "out"
    table = [[[1, 0, 0, 0, 0, 0]], [[1, 0, 0, 0, 1, 0]]]  # step 0: one group; step 1: two
    args = _cli_args(
        out, policy_dir, "generation.weight_transfer=files", f"generation.sync_dir={out}/sync",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=3", "ppo.mini_batch_prompts=2",
        "rollout.max_oversample=0", "max_steps=2",
    )  # fmt: skip
    env = child_env(SIMKO_TEST_REWARDS=json.dumps(table))
    result = run_torchrun(2, SCRIPTED, args, cwd=tmp_path, env=env, timeout_s=600)
    log = result.stdout + result.stderr
    assert "every group's rewards were equal" not in log
    assert (
        "step 0: 1 group with a learning signal in 1 round of sampling, fewer than the 2 "
        "whose rows split evenly over 2 data-parallel ranks: the update is skipped"
    ) in log, log[-4000:]
    scalars = read_scalars(out / "tb")
    assert scalars["rollout/skipped"] == {1: 1.0, 2: 0.0}
    assert scalars["rollout/skipped_steps_total"] == {1: 1.0, 2: 1.0}
    assert set(scalars["loss"]) == {2} and scalars["rollout/groups_trained"] == {1: 0.0, 2: 2.0}
    assert scalars["weight_version"] == {1: 0.0, 2: 1.0}  # the skipped step published nothing


def test_a_policy_that_scores_zero_everywhere_runs_to_the_end(tmp_path, policy_dir):
    """The boxed reward on Countdown's answers (no box): every reward 0. The run skips each
    step's update, logs and counts it, checkpoints and exits 0; the extra rounds' prompts
    count as used."""
    out = tmp_path / "out"
    args = _cli_args(
        out, policy_dir, "rewards.fn=null", "rewards.mode=boxed", "rollout.max_oversample=1",
        f"rollout.prompts_per_step={PER_STEP}", f"rollout.samples_per_prompt={G}",
        f"ppo.mini_batch_prompts={PER_STEP}", "max_steps=2",
    )  # fmt: skip
    result = run_process([*TUNE_RUN, "simko_recipe", *args], cwd=tmp_path, timeout_s=600)
    assert (
        f"step 1: every group's rewards were equal in 2 rounds of sampling ({2 * PER_STEP} "
        "groups): no learning signal, the update is skipped"
    ) in result.stderr, result.stderr[-4000:]
    scalars = read_scalars(out / "tb")
    assert scalars["rollout/skipped"] == {1: 1.0, 2: 1.0}
    assert scalars["rollout/skipped_steps_total"] == {1: 1.0, 2: 2.0}
    assert scalars["reward/identical_group_frac"] == {1: 1.0, 2: 1.0}
    assert scalars["rollout/oversample_rounds"] == {1: 1.0, 2: 1.0}
    assert "loss" not in scalars
    extra = torch.load(out / "checkpoints" / "step_00000002" / "extra.pt", weights_only=True)
    assert extra["extra"]["data"]["offset"] == 2 * 2 * PER_STEP
    assert extra["extra"]["skipped_steps"] == 2


def _skip_step_1(step: int, round_: int) -> list[float]:
    """Step 1: no signal in any round. Others: groups 0 and 2 in round 0, 1 and 3 after."""
    if step == 1:
        return [0.0] * (PER_STEP * G)
    return [
        float(r) for r in ([1, 0, 0, 0, 0, 1, 1, 1] if round_ == 0 else [1, 1, 0, 1, 0, 0, 1, 0])
    ]


def test_resume_after_a_skipped_step_continues_as_a_straight_run(tmp_path, policy_dir, monkeypatch):
    import simko_recipe

    scripted = load_module(SCRIPTED)
    monkeypatch.setattr(simko_recipe.SimKORecipe, "sample", scripted.scripted_sample(_skip_step_1))

    def run(out: Path, stops: list[int]) -> list[list[int]]:
        seen: list[list[int]] = []
        for max_steps in [*stops, 4]:
            recipe = _recipe(out, policy_dir, max_steps=max_steps, **{"rollout.max_oversample": 1})
            next_batch = recipe.batches.next_batch
            recipe.batches.next_batch = lambda f=next_batch: seen.append(f()) or seen[-1]
            try:
                recipe.train()
            finally:
                recipe.cleanup()
        return seen

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    drawn = run(straight, [])
    assert len(drawn) == 8  # two rounds a step
    assert run(resumed, [2]) == drawn  # stopped right after the skipped step
    ref = {
        t: v for t, v in read_scalars(straight / "tb").items() if not t.startswith(SKIP_VOLATILE)
    }
    got = {t: v for t, v in read_scalars(resumed / "tb").items() if not t.startswith(SKIP_VOLATILE)}
    assert ref["rollout/skipped"] == {1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0}
    assert ref["rollout/skipped_steps_total"] == {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert set(ref["loss"]) == {1, 3, 4}
    assert got == ref
    a = torch.load(straight / "checkpoints" / "step_00000004" / "extra.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step_00000004" / "extra.pt", weights_only=True)
    assert a["extra"]["data"] == b["extra"]["data"] and a["extra"]["weight_version"] == 3


def test_one_step_off_skips_a_step_and_samples_the_next_on_policy(
    tmp_path, policy_dir, monkeypatch
):
    """One-step-off, the skipped step publishes nothing: the rollout prefetched meanwhile
    was sampled with the weights the next update starts from (staleness 0 there)."""
    import simko_recipe

    scripted = load_module(SCRIPTED)
    monkeypatch.setattr(simko_recipe.SimKORecipe, "sample", scripted.scripted_sample(_skip_step_1))
    out = tmp_path / "out"
    overrides = {"rollout.max_oversample": 0, "rollout.max_staleness": 1}
    recipe = _recipe(out, policy_dir, max_steps=3, **overrides)
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    scalars = read_scalars(out / "tb")
    assert scalars["rollout/skipped"] == {1: 0.0, 2: 1.0, 3: 0.0}
    assert scalars["weight_version"] == {1: 1.0, 2: 1.0, 3: 2.0}
    assert scalars["rollout/staleness_max"] == {1: 0.0, 3: 0.0}
    assert scalars["rollout/groups_trained"] == {1: 2.0, 2: 0.0, 3: 2.0}
