"""tools/bench_staleness.py runs the real recipe with overrides: they must stay a valid
config that differs between its two runs in the staleness alone, with evaluation off."""

from __future__ import annotations

from pathlib import Path

from harness import load_module
from omegaconf import OmegaConf

from simko_tune.config import check_schema, resolve_config_path
from simko_tune.plan import validate

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_staleness.py"


def _bench():
    return load_module(TOOL)


def test_the_two_runs_differ_in_the_staleness_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    bench = _bench()
    cfgs = {}
    for staleness in (0, 1):
        cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
        dotlist = bench.overrides(tmp_path / "out", 120, staleness, seed=3)
        cfg = check_schema(OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist)))
        errors, _ = validate(cfg)
        assert not errors, errors
        assert cfg.rollout.max_staleness == staleness and cfg.seed == 3 and cfg.max_steps == 120
        assert cfg.eval.every_n_steps == 0 and not cfg.eval.before_training
        assert cfg.checkpoint.every_n_steps == 0
        cfgs[staleness] = OmegaConf.to_container(cfg)
    cfgs[1]["rollout"]["max_staleness"] = 0
    assert cfgs[0] == cfgs[1]
