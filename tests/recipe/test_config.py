"""Configs: bare names resolve, every shipped config validates (dry run, no weights), and
config errors name the key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import tomllib
from omegaconf import OmegaConf

from simko_tune.config import ConfigError, check_schema, packaged_configs, resolve_config_path
from simko_tune.plan import validate

REPO = Path(__file__).resolve().parents[2]
RECIPE_CONFIGS = [
    "qwen2_5_0_5b",
    "qwen2_5_1_5b",
    "qwen2_5_7b",
    "qwen2_5_math_7b",
    "llama3_2_3b",
    "tiny_cpu",
]
REQUIRED_TOP_LEVEL = {"output_dir", "max_steps", "seed", "resume", "dry_run"}


def _load(name: str, **overrides):
    cfg = OmegaConf.load(resolve_config_path(name))
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return check_schema(cfg)


def test_all_recipe_configs_are_packaged():
    assert set(RECIPE_CONFIGS) <= set(packaged_configs())


def test_bare_names_and_paths_resolve(tmp_path):
    assert resolve_config_path("tiny_cpu").name == "tiny_cpu.yaml"
    assert resolve_config_path("tiny_cpu.yaml").name == "tiny_cpu.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("output_dir: x\n")
    assert resolve_config_path(str(own)) == own
    with pytest.raises(FileNotFoundError, match="available: .*tiny_cpu"):
        resolve_config_path("no_such_config")


@pytest.mark.parametrize("name", RECIPE_CONFIGS)
def test_shipped_config_validates_without_weights(name):
    raw = OmegaConf.load(resolve_config_path(name))
    assert REQUIRED_TOP_LEVEL <= set(raw), f"{name} lacks {REQUIRED_TOP_LEVEL - set(raw)}"
    cfg = _load(name)
    errors, plan = validate(cfg)
    assert errors == []
    assert isinstance(plan["parameters"], int) or name == "tiny_cpu"
    if name in ("qwen2_5_7b", "qwen2_5_math_7b"):
        assert 7.0e9 < plan["parameters"] < 8.0e9
        assert plan["updates_per_step"] == 4  # 1024 prompts, mini-batches of 256 (paper)


def test_paper_settings_in_math_7b():
    cfg = _load("qwen2_5_math_7b")
    assert cfg.loss.mode == "simko" and cfg.loss.top_k == 3 and cfg.loss.alpha == 0.01
    assert cfg.loss.lam == 1.1 and cfg.loss.tau == 0.8
    assert cfg.optimizer.lr == 1e-6 and cfg.optimizer.weight_decay == 0.01
    assert cfg.rollout.samples_per_prompt == 8 and cfg.rollout.temperature == 1.0
    assert cfg.rollout.max_response_tokens == 3072 and cfg.ppo.max_grad_norm == 1.0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rollout.prompts_per_stepp", 3, "rollout.prompts_per_stepp"),
        ("rollout.prompts_per_step", "many", "rollout.prompts_per_step"),
        ("ppo.micro_batch_size", [1], "ppo.micro_batch_size"),
    ],
)
def test_schema_errors_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _load("tiny_cpu", **{key: value})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss.mode": "ppo"}, "mode"),
        ({"loss.nope": 1}, r"loss\.nope"),
        ({"ppo.mini_batch_prompts": 5}, r"rollout\.prompts_per_step=1024 is not a multiple"),
        ({"parallel.tp": 3, "parallel.dp_shard": 1}, "num_attention_heads"),
        ({"generation.backend": "sglang"}, r"generation\.backend"),
        ({"rollout.max_staleness": 2}, r"rollout\.max_staleness: 2 is not 0 or 1"),
        ({"rollout.is_cap": 0.5}, r"rollout\.is_cap: 0\.5 must be >= 1"),
    ],
)
def test_semantic_errors_name_the_key(overrides, message, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = _load("qwen2_5_7b", **overrides)
    errors, _ = validate(cfg)
    assert errors and any(__import__("re").search(message, e) for e in errors), errors


def test_mesh_must_match_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    errors, _ = validate(_load("qwen2_5_7b"))
    assert any("world size 6" in e for e in errors)


def test_packages_listed_in_pyproject():
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "simko_tune").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to pyproject packages: {on_disk - listed}"


@pytest.mark.slow
def test_tune_run_dry_run_from_any_directory(tmp_path):
    """The real CLI: `tune run simko_recipe --config NAME dry_run=true` from an unrelated cwd."""
    out = subprocess.run(
        [
            "tune",
            "run",
            "simko_recipe",
            "--config",
            "qwen2_5_math_7b",
            "dry_run=true",
            f"output_dir={tmp_path}/out",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "config is valid" in out.stdout and "dp_shard" in out.stdout
    bad = subprocess.run(
        [
            "tune",
            "run",
            "simko_recipe",
            "--config",
            "qwen2_5_math_7b",
            "dry_run=true",
            "rollout.bogus=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "rollout.bogus" in bad.stderr


def test_generation_devices_overlapping_the_trainers_are_refused(monkeypatch):
    """qwen2_5_7b: the trainer on GPUs 0-3 (CUDA_VISIBLE_DEVICES), workers on 4-7."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    errors, _ = validate(_load("qwen2_5_7b"))
    assert not errors, errors
    errors, _ = validate(_load("qwen2_5_7b", **{"generation.devices": ["4", "5", "3", "7"]}))
    assert any(
        "generation.devices[2]='3' uses GPU 3, which the trainer's ranks use" in e for e in errors
    ), errors
