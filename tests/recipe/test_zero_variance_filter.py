"""Zero-variance groups: counted every step; with rollout.filter_zero_variance dropped before
the update, with rollout.max_oversample replaced by groups from extra rounds of prompts drawn
from the data order (resume stays exact); the update on the kept groups is the update on
those groups written out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from simko_tune.config import check_schema, resolve_config_path
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
