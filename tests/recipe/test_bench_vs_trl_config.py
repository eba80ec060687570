"""tools/bench_vs_trl.py runs the real recipe with overrides: they must stay a valid config
with the batch the benchmark promises (one optimizer step per rollout, TRL's GRPO loss)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import load_module
from omegaconf import OmegaConf

from simko_tune.config import check_schema, resolve_config_path, resolve_weight_transfer
from simko_tune.plan import validate

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_vs_trl.py"


def _bench():
    return load_module(TOOL)


@pytest.mark.parametrize("backend", ["native", "vllm"])
@pytest.mark.parametrize("staleness", [0, 1])
def test_our_overrides_are_a_valid_config_with_the_promised_batch(
    tmp_path, staleness, backend, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    bench = _bench()
    cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
    overrides = bench.our_overrides(tmp_path / "model", tmp_path / "out", 5, staleness)
    overrides += bench.BACKENDS[backend]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    cfg = check_schema(cfg)
    errors, _ = validate(cfg)
    assert not errors, errors
    assert cfg.rollout.prompts_per_step == cfg.ppo.mini_batch_prompts == 4
    assert cfg.rollout.samples_per_prompt == 8 and cfg.rollout.max_response_tokens == 32
    assert cfg.ppo.epochs == 1 and cfg.rollout.max_staleness == staleness
    assert cfg.loss.mode == "grpo" and cfg.loss.agg == "seq_mean_token_mean"
    assert cfg.lr_scheduler is None or cfg.lr_scheduler.get("_component_") is None
    assert cfg.eval.every_n_steps == 0 and not cfg.eval.before_training
    assert cfg.optimizer.fused is True  # the docstring promises the fused AdamW kernel
    # "native" is tiny_cpu as users get it: no override names the generator
    assert cfg.generation.backend == backend
    transfer, _ = resolve_weight_transfer(cfg.generation, world_size=1)
    assert transfer == ("memory" if backend == "native" else "files")
    assert not bench.BACKENDS["native"]


def test_steady_state_is_the_second_half_of_each_run():
    bench = _bench()
    assert bench.steady([9.0, 5.0, 2.0, 2.2]) == [2.0, 2.2]
    assert bench.steady([9.0, 5.0, 2.0, 2.2, 2.1]) == [2.0, 2.2, 2.1]
    runs = [{"step_s": [9.0, 5.0, 2.0, 2.4]}, {"step_s": [8.0, 4.0, 2.2, 2.6]}]
    assert bench.median_steady(runs) == pytest.approx(2.3)  # median of 2.0, 2.4, 2.2, 2.6


def test_both_sides_run_in_the_users_environment(tmp_path, monkeypatch):
    """No thread variable (or any other) is added for either trainer: both start as a user
    starts them."""
    bench = _bench()
    seen = []

    class Done:
        returncode, stdout, stderr = 0, '{"step_s": [1.0]}\n', ""

    def fake_run(cmd, **kwargs):
        seen.append(kwargs)
        return Done()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "read_scalars", lambda path: {"time/step": {1: 1.0}})
    bench.run_trl(tmp_path, 2, tmp_path / "trl", "adamw_torch")
    bench.run_ours(tmp_path, 2, 0, tmp_path, backend="vllm")
    assert len(seen) == 2 and all("env" not in kwargs for kwargs in seen)
