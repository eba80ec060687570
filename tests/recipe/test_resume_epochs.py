"""Resume at the edges of an epoch: stopped just before, exactly at and just after an epoch
boundary, the resumed run draws the prompts an uninterrupted run draws, step for step, and
every prompt comes once per epoch (synchronous and one-step-off, whose prefetch peeks
across the boundary)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from simko_tune.config import check_schema, resolve_config_path

pytestmark = pytest.mark.slow

PROMPTS, PER_STEP = 12, 4  # three steps per epoch
STEPS = 7


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    from simko_tune.demo.warm_start import WarmStartConfig, build_tiny_policy

    out = tmp_path_factory.mktemp("policy") / "tiny_policy"
    return build_tiny_policy(
        out, WarmStartConfig(max_steps=20, target_success=None, sft_problems=64, eval_problems=8)
    )


def _recipe(out: Path, policy: Path, max_steps: int, staleness: int):
    import simko_recipe

    cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
    for key, value in {
        "output_dir": str(out), "model_dir": str(policy), "prepare_model": None,
        "generation.backend": "native", "generation.weight_transfer": "memory",
        "dataset.n": PROMPTS, "rollout.prompts_per_step": PER_STEP,
        "rollout.samples_per_prompt": 2, "ppo.mini_batch_prompts": PER_STEP,
        "rewards.num_workers": 1, "eval.before_training": False, "eval.every_n_steps": 0,
        "checkpoint.every_n_steps": 1, "log.samples_every_n_steps": 0,
        "max_steps": max_steps, "rollout.max_staleness": staleness, "resume": "auto",
    }.items():  # fmt: skip
        OmegaConf.update(cfg, key, value, force_add=True)
    recipe = simko_recipe.SimKORecipe(check_schema(cfg))
    recipe.setup()
    return recipe


def _drawn(out: Path, policy: Path, stops: list[int], staleness: int) -> list[list[int]]:
    """The prompts each step trained on, the run stopped after each step count in
    ``stops`` and resumed from its checkpoint."""
    drawn: list[list[int]] = []
    for max_steps in [*stops, STEPS]:
        recipe = _recipe(out, policy, max_steps, staleness)
        rollout_for = recipe.get_rollout

        def spy(indices, timings, sampled=None, _f=rollout_for):
            drawn.append(list(indices))
            return _f(indices, timings, sampled)

        recipe.get_rollout = spy
        try:
            recipe.train()
        finally:
            recipe.cleanup()
    return drawn


@pytest.mark.parametrize("staleness", [0, 1])
@pytest.mark.parametrize(
    "stop", [2, 3, 4], ids=["before_boundary", "at_boundary", "after_boundary"]
)
def test_resume_at_an_epoch_boundary_draws_what_a_straight_run_draws(
    tmp_path, policy_dir, staleness, stop
):
    straight = _drawn(tmp_path / "straight", policy_dir, [], staleness)
    resumed = _drawn(tmp_path / "resumed", policy_dir, [stop], staleness)
    assert len(straight) == STEPS and resumed == straight
    per_epoch = PROMPTS // PER_STEP
    for epoch in range(STEPS // per_epoch):
        prompts = [
            i for step in straight[epoch * per_epoch : (epoch + 1) * per_epoch] for i in step
        ]
        assert sorted(prompts) == list(range(PROMPTS)), epoch  # each prompt once per epoch
