"""A NaN/inf in the loss skips the optimizer step, is counted, and never reaches the weights."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from simko_tune.config import check_schema, resolve_config_path

pytestmark = pytest.mark.slow


@pytest.fixture
def recipe(tmp_path, tiny_model_dir):
    import simko_recipe

    cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
    for key, value in {
        "output_dir": str(tmp_path / "out"),
        "model_dir": str(tiny_model_dir),
        "prepare_model": None,
        "generation.backend": "native",
        "generation.weight_transfer": "files",
        "generation.sync_dir": str(tmp_path / "sync"),
        "dataset.n": 16,
        "rollout.prompts_per_step": 2,
        "ppo.mini_batch_prompts": 2,
        "rollout.samples_per_prompt": 4,
        "rewards.num_workers": 1,
    }.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    r = simko_recipe.SimKORecipe(check_schema(cfg))
    r.setup()
    yield r
    r.cleanup()


def test_nonfinite_loss_skips_the_update(recipe):
    rollout, _ = recipe.get_rollout(recipe.batches.next_batch(), {})
    old, _ = recipe.ppo.old_logprobs(rollout)  # (old, reference): no KL here
    rollout.rewards[:] = torch.tensor([1.0, 0.0] * (len(rollout) // 2))  # non-zero advantages
    before = {k: v.detach().clone() for k, v in recipe.model.state_dict().items()}

    poisoned = old.clone()
    row, col = rollout.mask.nonzero()[0].tolist()
    poisoned[row, col] = float("nan")
    stats = recipe.ppo.update(rollout, poisoned)
    assert stats["updates_skipped_nonfinite"] == 1.0
    for k, v in recipe.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in recipe.model.parameters())

    stats = recipe.ppo.update(rollout, old)  # a finite batch afterwards updates as usual
    assert stats["updates_skipped_nonfinite"] == 0.0
    assert any(not torch.equal(v, before[k]) for k, v in recipe.model.state_dict().items())
