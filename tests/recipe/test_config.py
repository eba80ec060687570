"""Configs: bare names resolve, every shipped config validates (dry run, no weights), and
config errors name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from harness import TUNE_RUN, run_process
from omegaconf import OmegaConf

from simko_tune.config import ConfigError, check_schema, packaged_configs, resolve_config_path
from simko_tune.plan import dry_run, validate

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
        ("loss.nope", 1, "loss.nope"),  # loss is typed by LossConfig
        ("loss.top_k", "many", "loss.top_k"),
        # closed sets: the schema names the key and the allowed values
        (
            "generation.backend",
            "sglang",
            "generation.backend': Invalid value 'sglang', expected one of [vllm, native]",
        ),
        ("generation.weight_transfer", "nccl", "generation.weight_transfer': Invalid value 'nccl'"),
        ("rollout.old_logprobs", "both", "rollout.old_logprobs': Invalid value 'both'"),
        (
            "rewards.mode",
            "boxd",
            "rewards.mode': Invalid value 'boxd', expected one of [boxed, math_verify]",
        ),
    ],
)
def test_schema_errors_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _load("tiny_cpu", **{key: value})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss.mode": "ppo"}, "mode"),
        ({"ppo.mini_batch_prompts": 5}, r"rollout\.prompts_per_step=1024 is not a multiple"),
        ({"parallel.tp": 3, "parallel.dp_shard": 1}, "num_attention_heads"),
        ({"rollout.max_staleness": 2}, r"rollout\.max_staleness: 2 is not 0 or 1"),
        ({"rollout.is_cap": 0.5}, r"rollout\.is_cap: 0\.5 must be >= 1"),
        ({"generation.weight_transfer": "memory"}, r"needs generation\.backend=native"),
        (
            {
                "generation.weight_transfer": "memory",
                "generation.backend": "native",
                "parallel.dp_shard": 2,
            },
            r"weight_transfer=memory .* world size 2",
        ),
        (
            {"generation.weight_transfer": "memory", "generation.backend": "native"},
            r"generation\.weight_delta needs generation\.weight_transfer=files",
        ),
        ({"generation.full_every": 0}, r"generation\.full_every"),
        ({"generation.load_timeout_s": 0}, r"generation\.load_timeout_s: must be > 0, got 0"),
    ],
)
def test_semantic_errors_name_the_key(overrides, message, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = _load("qwen2_5_7b", **overrides)
    errors, _ = validate(cfg)
    assert errors and any(__import__("re").search(message, e) for e in errors), errors


def test_in_memory_weight_transfer_is_valid_with_one_native_rank(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = _load(
        "tiny_cpu", **{"generation.weight_transfer": "memory", "generation.backend": "native"}
    )
    errors, _ = validate(cfg)
    assert errors == []


def test_dry_run_reports_every_error_at_once(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    bad = {
        "rollout.temperature": 0.0,
        "rewards.num_workers": 0,
        "rewards.timeout_s": -1.0,
        "generation.num_workers": 0,
        "generation.tensor_parallel_size": -2,
        "rollout.max_response_tokens": 120,  # + 24 prompt tokens > max_model_len 128
        "loss.tau": 1.5,
        "loss.alpha": -0.1,
        "loss.kl_type": "k9",
    }
    cfg = _load("tiny_cpu", **bad)
    with pytest.raises(ConfigError) as info:
        dry_run(cfg)
    message = str(info.value)
    for needle in (
        "rollout.temperature: must be > 0, got 0.0",
        "loss.temperature=0.0 is out of range",
        "rewards.num_workers: must be >= 1, got 0",
        "rewards.timeout_s: must be > 0, got -1.0",
        "generation.num_workers: must be >= 1, got 0",
        "generation.tensor_parallel_size: must be >= 1, got -2",
        "rollout.max_prompt_tokens + rollout.max_response_tokens = 24 + 120 exceeds "
        "generation.engine_kwargs.max_model_len=128",
        "loss.tau=1.5",
        "loss.alpha=-0.1",
        "loss.kl_type=k9: expected one of [k1, k2, k3]",
    ):
        assert needle in message, (needle, message)
    # negative temperatures too, and eval's response length against the engine
    errors, _ = validate(_load("tiny_cpu", **{"rollout.temperature": -1.0, "eval.max_tokens": 200}))
    assert any("rollout.temperature: must be > 0" in e for e in errors)
    assert any("eval.max_tokens = 24 + 200 exceeds" in e for e in errors), errors


def test_loss_temperature_follows_the_rollout_and_is_never_overwritten():
    cfg = _load("tiny_cpu", **{"rollout.temperature": 0.7})
    assert cfg.loss.temperature == 0.7 and validate(cfg)[0] == []
    assert cfg.loss.max_response_len == cfg.rollout.max_response_tokens == 24  # Dr. GRPO's L
    raw = OmegaConf.load(resolve_config_path("tiny_cpu"))
    OmegaConf.update(raw, "loss.temperature", 0.5)
    errors, _ = validate(check_schema(raw))
    assert any("loss.temperature=0.5 differs from rollout.temperature=1.0" in e for e in errors), (
        errors
    )
    cfg = _load("tiny_cpu", **{"loss.max_response_len": 64})
    assert cfg.loss.max_response_len == 64  # an explicit constant stays


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "psr", "nsr", "w_reinforce", "forking_only"])
def test_every_mode_validates(mode):
    overrides = {"loss.mode": mode, "loss.kl_coef": 0.1, "loss.entropy_coef": 0.001}
    if mode == "dr_grpo":
        errors, _ = validate(_load("tiny_cpu", **overrides))
        assert any("seq_mean_token_sum_norm" in e for e in errors), errors
        overrides["loss.agg"] = "seq_mean_token_sum_norm"
    assert validate(_load("tiny_cpu", **overrides))[0] == []


def test_llama_settings_follow_the_official_scripts():
    cfg = _load("llama3_2_3b")
    # 20 epochs of 8,388 prompts at 1,024 per step, incomplete batches dropped
    assert cfg.max_steps == 20 * (8388 // 1024) == 160
    # the official scripts set no template: verl's default ("qwen") ChatML text applies
    assert cfg.prompt_template == "qwen_boxed"
    assert cfg.loss.entropy_coef == 0.0  # entropy_coeff=0 in both Llama scripts
    assert cfg.loss.kl_coef == 0.0


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
    out = run_process(
        [*TUNE_RUN, "simko_recipe", "--config", "qwen2_5_math_7b", "dry_run=true",
         f"output_dir={tmp_path}/out"],
        cwd=tmp_path, timeout_s=300,
    )  # fmt: skip
    assert "config is valid" in out.stdout and "dp_shard" in out.stdout
    bad = run_process(
        [*TUNE_RUN, "simko_recipe", "--config", "qwen2_5_math_7b", "dry_run=true",
         "rollout.bogus=1"],
        cwd=tmp_path, timeout_s=300, check=False,
    )  # fmt: skip
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


def test_closed_sets_compare_and_print_as_their_values():
    cfg = _load("tiny_cpu", **{"generation.backend": "native", "rewards.mode": "math_verify"})
    assert cfg.generation.backend == "native" and f"{cfg.generation.backend}" == "native"
    assert str(cfg.rewards.mode) == "math_verify"
    assert "backend: native" in OmegaConf.to_yaml(cfg)  # what the metric logger records


def test_weight_transfer_auto_is_the_default_and_follows_backend_and_ranks():
    """``auto`` (the schema's default, and tiny_cpu's): memory for a native generator on one
    trainer rank; files for several ranks, a vLLM worker, or weight deltas (files by nature)."""
    from simko_tune.config import GenerationSection, resolve_weight_transfer

    assert GenerationSection().weight_transfer == "auto"
    assert OmegaConf.load(resolve_config_path("tiny_cpu")).generation.weight_transfer == "auto"
    native = _load("tiny_cpu").generation
    assert native.backend == "native"
    cases = [
        (native, 1, "memory"),
        (native, 2, "files"),
        (_load("tiny_cpu", **{"generation.backend": "vllm"}).generation, 1, "files"),
        (_load("tiny_cpu", **{"generation.weight_delta": True}).generation, 1, "files"),
        (_load("tiny_cpu", **{"generation.weight_transfer": "files"}).generation, 1, "files"),
        (_load("tiny_cpu", **{"generation.weight_transfer": "memory"}).generation, 2, "memory"),
    ]
    for section, world, expected in cases:
        transfer, reason = resolve_weight_transfer(section, world)
        assert (transfer, str(transfer)) == (expected, expected), (section, world)
        assert reason


def test_main_config_validates_on_two_ranks_and_the_plan_says_which_transfer(monkeypatch, capsys):
    """`tune run --nproc_per_node 2 simko_recipe --config tiny_cpu` must not refuse its own
    default: two ranks publish files; one rank hands the weights over in memory."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    errors, plan = validate(_load("tiny_cpu"))
    assert errors == []
    assert plan["weight_transfer"].startswith("files (auto: "), plan["weight_transfer"]
    monkeypatch.delenv("WORLD_SIZE")
    dry_run(_load("tiny_cpu"))
    assert "weight_transfer: memory (auto: " in capsys.readouterr().out


def test_load_timeout_is_a_key_of_both_recipes():
    """generation.load_timeout_s: typed and range-checked in the training and eval schemas."""
    from simko_tune.config import EvalRecipeConfig, GenerationSection

    assert _load("qwen2_5_7b").generation.load_timeout_s == GenerationSection.load_timeout_s > 300
    assert _load("tiny_cpu", **{"generation.load_timeout_s": 77}).generation.load_timeout_s == 77
    with pytest.raises(ConfigError, match=re.escape("generation.load_timeout_s")):
        _load("tiny_cpu", **{"generation.load_timeout_s": "soon"})
    raw = OmegaConf.load(resolve_config_path("eval_tiny_cpu"))
    OmegaConf.update(raw, "model_dir", "/policy")
    OmegaConf.update(raw, "generation.load_timeout_s", -1.0)
    section = check_schema(raw, EvalRecipeConfig).generation
    assert GenerationSection.problems(section) == [
        "generation.load_timeout_s: must be > 0, got -1.0"
    ]


# Configs each wrong in a key of a closed set (an enum in the schema) or near one, and in the
# loss's string choices: every message must show values as YAML has them.
BAD_CONFIGS = [
    {"generation.weight_transfer": "memory", "generation.backend": "vllm"},
    {"generation.weight_transfer": "memory", "parallel.dp_shard": 2},
    {"generation.weight_transfer": "memory", "generation.weight_delta": True},
    {"generation.backend": "sglang"},
    {"generation.weight_transfer": ["files"]},
    {"generation.weight_transfer": True},
    {"rewards.mode": None},
    {"rollout.old_logprobs": 3},
    {"rewards.mode": "boxd"},
    {"loss.mode": "ppo", "loss.kl_type": "k9", "loss.agg": "sum", "loss.psr_nsr_norm": "x"},
    {"loss.mode": "dr_grpo", "loss.tau": 2.0},
    {"rollout.max_staleness": 3, "rollout.top_p": 0.0, "generation.devices": ["0", "1"]},
]


@pytest.mark.parametrize("overrides", BAD_CONFIGS, ids=lambda o: ",".join(o))
def test_config_errors_print_values_as_yaml_writes_them(overrides, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        errors, _ = validate(_load("tiny_cpu", **overrides))
    except ConfigError as e:
        errors = [str(e)]
    assert errors, overrides
    for message in errors:
        assert "<" not in message, message
        for enum in ("GenerationBackend", "WeightTransfer", "OldLogprobs", "RewardMode"):
            assert enum not in message, message


def test_enum_values_appear_as_written():
    errors, _ = validate(
        _load("tiny_cpu", **{"generation.weight_transfer": "memory", "parallel.dp_shard": 2})
    )
    assert any("(got backend native, world size 2)" in e for e in errors), errors
    errors, _ = validate(_load("tiny_cpu", **{"loss.mode": "ppo"}))
    assert any(e.startswith("loss.mode=ppo: expected one of [simko, grpo, ") for e in errors)
    for value, shown in (
        (["files"], "Value ['files'] (ListConfig) is not"),
        (True, "Invalid value true,"),
    ):
        with pytest.raises(ConfigError, match=re.escape(shown)) as info:
            _load("tiny_cpu", **{"generation.weight_transfer": value})
        assert str(info.value).endswith("one of [files, memory, auto]"), info.value
    with pytest.raises(ConfigError, match=re.escape("value null for field of type one of [boxed")):
        _load("tiny_cpu", **{"rewards.mode": None})
    raw = OmegaConf.load(resolve_config_path("tiny_cpu"))
    raw.rollout = 5
    with pytest.raises(
        ConfigError, match=re.escape("'rollout': a section (keys and values), got 5")
    ):
        check_schema(raw)
