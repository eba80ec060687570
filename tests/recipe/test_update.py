"""The recipe's model setup and PPO update: every tensor on the target device; the efficient
update (token-budget micro-batches, one gradient sync and one host sync per mini-batch) gives
the loss and weights of the plain one (fixed rows, sync every micro-batch)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from simko_tune.config import check_schema, resolve_config_path
from simko_tune.parallel import materialize, row_lengths

OVERRIDES = {
    "generation.backend": "native",
    "generation.weight_transfer": "files",
    "dataset.n": 16,
    "rollout.prompts_per_step": 2,
    "rollout.samples_per_prompt": 4,
    "ppo.mini_batch_prompts": 1,  # two optimizer steps per update
    "rewards.num_workers": 1,
}


def _cfg(tmp_path, model_dir, **extra):
    cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
    for key, value in {
        "output_dir": str(tmp_path / "out"),
        "model_dir": str(model_dir),
        "prepare_model": None,
        "generation.sync_dir": str(tmp_path / "sync"),
        **OVERRIDES,
        **extra,
    }.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return check_schema(cfg)


def _all_tensors(model):
    return list(model.named_parameters()) + list(model.named_buffers())


def test_materialize_puts_rope_caches_on_the_target_device():
    """``meta`` stands in for CUDA: a buffer rebuilt without the device context lands on CPU."""
    from torchtune.models.qwen2 import qwen2

    with torch.device("meta"):
        model = qwen2(
            vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=32,
            intermediate_dim=64, max_seq_len=16,
        )  # fmt: skip
    materialize(model, "meta")
    buffers = dict(model.named_buffers())
    assert any("rope" in n or "pos_embeddings" in n for n in buffers), list(buffers)
    wrong = [(n, t.device) for n, t in _all_tensors(model) if t.device.type != "meta"]
    assert not wrong


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_recipe_model_setup_places_every_tensor_on_cfg_device(tmp_path, tiny_model_dir):
    import simko_recipe

    from simko_tune.models import read_hf_config

    recipe = simko_recipe.SimKORecipe(_cfg(tmp_path, tiny_model_dir, device="meta"))
    recipe.mesh, recipe.is_rank_zero = None, True
    recipe.hf_config = read_hf_config(tiny_model_dir)
    model = recipe.build_model()
    wrong = [(n, t.device) for n, t in _all_tensors(model) if t.device.type != "meta"]
    assert not wrong, f"not on cfg.device: {wrong}"


@pytest.mark.slow
def test_efficient_update_matches_the_plain_update(tmp_path, tiny_model_dir):
    import simko_recipe

    recipe = simko_recipe.SimKORecipe(_cfg(tmp_path, tiny_model_dir))
    recipe.setup()
    try:
        rollout, _ = recipe.get_rollout(recipe.batches.next_batch(), {})
        rollout.rewards[:] = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
        initial = {k: v.detach().clone() for k, v in recipe.model.state_dict().items()}

        def run(**ppo):
            recipe.model.load_state_dict(initial)
            for k, v in ppo.items():
                recipe.cfg.ppo[k] = v
            recipe.setup_update()
            micro = recipe.ppo.micro_batches(
                rollout, range(4), recipe.cfg.ppo.max_tokens_per_micro_batch
            )
            old, _ = recipe.ppo.old_logprobs(rollout)  # (old, reference): no KL here
            stats = recipe.ppo.update(rollout, old)
            weights = {k: v.detach().clone() for k, v in recipe.model.state_dict().items()}
            return old, stats, weights, len(micro)

        plain = run(max_tokens_per_micro_batch=None, defer_grad_sync=False, micro_batch_size=2)
        widths = row_lengths(rollout.mask)
        budget = int(2 * widths.max())  # a few rows per micro-batch, grouped by length
        fast = run(
            max_tokens_per_micro_batch=budget,
            logprob_max_tokens_per_micro_batch=4 * budget,
            defer_grad_sync=True,
        )
        assert plain[3] == 2 and fast[3] >= 2  # both really split the mini-batch
        torch.testing.assert_close(fast[0], plain[0], rtol=1e-6, atol=1e-6)
        for key in ("loss", "policy/entropy_gated", "policy/logprob_rank1_all", "ratio_max",
                    "grad_norm_mean"):  # fmt: skip
            assert fast[1][key] == pytest.approx(plain[1][key], rel=1e-5, abs=1e-7), key
        moved = [k for k in initial if not torch.equal(plain[2][k], initial[k])]
        assert moved, "the update changed nothing: the comparison would be vacuous"
        for k in initial:
            torch.testing.assert_close(fast[2][k], plain[2][k], rtol=1e-5, atol=1e-6, msg=k)
    finally:
        recipe.cleanup()
