"""Config loading for the recipes: bare config names and schema checks on top of torchtune's.

``tune run simko_recipe --config qwen2_5_7b`` passes ``qwen2_5_7b`` through untouched
(it is not one of torchtune's built-in configs), so the recipe maps bare names to the YAML
files packaged as ``simko_tune.configs`` before torchtune's ``config.parse`` reads them.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torchtune import config as tt_config

from simko_tune.generation.types import LOAD_TIMEOUT_S
from simko_tune.loss import LossConfig


def packaged_configs() -> list[str]:
    """Names of the YAML configs shipped with the package."""
    root = importlib.resources.files("simko_tune.configs")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """An existing file path is taken as is; otherwise a bare name (``qwen2_5_7b`` or
    ``qwen2_5_7b.yaml``) is looked up among the packaged configs."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    candidate = Path(str(importlib.resources.files("simko_tune.configs") / f"{name}.yaml"))
    if path.parent == Path(".") and candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"--config {name_or_path!r}: no such file, and not a packaged config "
        f"(available: {', '.join(packaged_configs())})"
    )


def _rewrite_config_arg(argv: list[str]) -> list[str]:
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = str(resolve_config_path(argv[i + 1]))
        elif arg.startswith("--config="):
            argv[i] = "--config=" + str(resolve_config_path(arg.split("=", 1)[1]))
    return argv


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """``torchtune.config.parse`` that also accepts bare packaged config names."""

    @functools.wraps(recipe_main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sys.argv = _rewrite_config_arg(sys.argv)
        return tt_config.parse(recipe_main)(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------
# The recipe's schema. Sections built by ``_component_`` (model, tokenizer, dataset,
# optimizer, ...) stay free-form; everything the recipe itself reads is typed, so unknown
# keys, wrong types and values outside a closed set fail at load time with the key's full
# name. Each section's own range checks sit beside it (``problems``); the arithmetic across
# sections (ranks, batch sizes, lengths) is ``simko_tune.plan.validate``'s.
# ----------------------------------------------------------------------------------------


class Choice(str, Enum):
    """A closed set of string values: the schema rejects any other, naming the key and the
    allowed values, and a member compares equal to (and prints as) its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class OldLogprobs(Choice):
    trainer = "trainer"  # recomputed by the policy before the update
    workers = "workers"  # the generator's


class GenerationBackend(Choice):
    vllm = "vllm"  # vLLM worker processes
    native = "native"  # torchtune's KV-cache decoding in the trainer's process


class WeightTransfer(Choice):
    files = "files"  # publications in the sync dir
    memory = "memory"  # in-memory snapshots for a native generator in the trainer's process
    auto = "auto"  # memory where it can work, files otherwise: resolve_weight_transfer


class RewardMode(Choice):
    boxed = "boxed"  # the paper's last-box rule
    math_verify = "math_verify"  # Math-Verify's extraction


def _at_least(section: Any, prefix: str, minimum: float, *keys: str) -> list[str]:
    return [
        f"{prefix}.{k}: must be >= {minimum}, got {section[k]}"
        for k in keys
        if section[k] < minimum
    ]


def _positive(section: Any, prefix: str, *keys: str) -> list[str]:
    return [f"{prefix}.{k}: must be > 0, got {section[k]}" for k in keys if not section[k] > 0]


@dataclass
class RolloutSection:
    prompts_per_step: int = 1024
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 3072
    # Old log-probs for the PPO ratio: "trainer" recomputes them with the policy before the
    # update (exact; the first mini-batch's are its own forward's, before any step) and logs
    # the trainer-vs-worker mismatch; "workers" takes the generator's (no mismatch to log).
    old_logprobs: OldLogprobs = OldLogprobs.trainer
    # 0: synchronous (generate with the current weights, then update). 1: one-step-off: the
    # workers sample step t+1's rollout with weights v_t while the trainer updates on step t's,
    # corrected by truncated importance weights min(exp(proximal - behaviour), is_cap).
    max_staleness: int = 0
    is_cap: float = 2.0
    # Drop the groups whose rewards are all equal (zero advantage: no gradient) before the
    # update; with max_oversample > 0, draw and sample more prompts (at most that many extra
    # rounds) until prompts_per_step groups with a signal are found (DAPO's dynamic
    # sampling). The extra prompts are drawn from the data order, so they count as used.
    filter_zero_variance: bool = False
    max_oversample: int = 0

    @staticmethod
    def problems(r: Any) -> list[str]:
        out = _at_least(
            r, "rollout", 1, "prompts_per_step", "samples_per_prompt", "max_prompt_tokens",
            "max_response_tokens",
        )  # fmt: skip
        out += _positive(r, "rollout", "temperature")
        if not 0 < r.top_p <= 1:
            out.append(f"rollout.top_p: must be in (0, 1], got {r.top_p}")
        if r.max_staleness not in (0, 1):
            out.append(f"rollout.max_staleness: {r.max_staleness} is not 0 or 1 (one-step-off)")
        if r.is_cap < 1.0:
            out.append(f"rollout.is_cap: {r.is_cap} must be >= 1")
        out += _at_least(r, "rollout", 0, "max_oversample")
        if r.max_oversample > 0 and not r.filter_zero_variance:
            out.append("rollout.max_oversample > 0 needs rollout.filter_zero_variance=true")
        if r.max_oversample > 0 and r.max_staleness:
            out.append(
                "rollout.max_oversample > 0 needs rollout.max_staleness=0 (one-step-off "
                "sampling runs ahead of the data order, extra rounds cannot)"
            )
        return out


@dataclass
class GenerationSection:
    backend: GenerationBackend = GenerationBackend.vllm
    num_workers: int = 1
    devices: list[str] | None = None  # one entry per worker, e.g. ["4", "5,6"] (CUDA ids)
    addresses: list[str] | None = None  # remote workers (tcp://host:port); overrides local start
    tensor_parallel_size: int = 1
    sync_dir: str | None = None  # default: /dev/shm/simko_tune-<uid>/<run name> (0700)
    # "files": publications in sync_dir | "memory": snapshots handed to a native generator
    # in the trainer's process (backend native, one rank): no files, no reload | "auto":
    # memory where that works, files otherwise (resolve_weight_transfer), so adding ranks
    # to a run needs no other change; the run's first lines say which it took
    weight_transfer: WeightTransfer = WeightTransfer.auto
    # dtype of the published weights; default: the engine's dtype (native backend: float32)
    weight_dtype: str | None = None
    # publish each version as the bytes that changed since the previous one, zstd-compressed
    # (a shard whose delta is not under half its size goes whole), a full one every full_every
    weight_delta: bool = False
    full_every: int = 20
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    request_timeout_s: float = 600.0  # one generate call (a whole batch of samples)
    # Seconds a worker may take to load weights before it counts as failed (and, if local, is
    # restarted): its start (the engine reads model_dir) and each new version (verify,
    # reload, until every worker acknowledges). Apart from request_timeout_s: a load's time
    # grows with the model and the storage (a 7B model over NFS), not with the batch.
    load_timeout_s: float = LOAD_TIMEOUT_S
    restart_on_failure: bool = True
    # Remote workers (addresses off this machine) require CURVE: the workers' public key
    # file (NAME.key) and this trainer's secret key file (NAME.key_secret), authorised on
    # the workers. Make keys with `python -m simko_tune.generation.protocol DIR NAME`.
    curve_server_key: str | None = None
    curve_client_key: str | None = None

    @staticmethod
    def problems(g: Any) -> list[str]:
        out = _at_least(g, "generation", 1, "num_workers", "tensor_parallel_size", "full_every")
        if g.weight_delta and g.weight_transfer == "memory":
            out.append("generation.weight_delta needs generation.weight_transfer=files")
        out += _positive(g, "generation", "request_timeout_s", "load_timeout_s")
        if g.devices is not None and len(g.devices) != g.num_workers:
            out.append(
                f"generation.devices has {len(g.devices)} entries for num_workers={g.num_workers}"
            )
        return out


def resolve_weight_transfer(g: Any, world_size: int) -> tuple[WeightTransfer, str]:
    """``generation.weight_transfer`` as a run of ``world_size`` trainer ranks uses it, and
    why. ``auto`` takes memory only where it works and copies least: a native generator in
    the trainer's process on one rank (no files, no reload). Several ranks each hold a
    shard, a vLLM worker is another process, and weight deltas are files: files."""
    chosen = WeightTransfer(g.get("weight_transfer", WeightTransfer.auto))
    if chosen != WeightTransfer.auto:
        return chosen, "generation.weight_transfer"
    backend = GenerationBackend(g.get("backend", GenerationBackend.vllm))
    if backend != GenerationBackend.native:
        return WeightTransfer.files, f"auto: backend {backend} reads files"
    if world_size != 1:
        return WeightTransfer.files, f"auto: {world_size} trainer ranks each hold a shard"
    if g.get("weight_delta", False):
        return WeightTransfer.files, "auto: generation.weight_delta publishes files"
    return WeightTransfer.memory, "auto: native generator in the trainer's process, one rank"


@dataclass
class RewardSection:
    mode: RewardMode = RewardMode.boxed
    fn: str | None = None  # dotted path of a custom reward(response, gold) -> float; replaces mode
    num_workers: int = 4
    timeout_s: float = 5.0

    @staticmethod
    def problems(r: Any) -> list[str]:
        return _at_least(r, "rewards", 1, "num_workers") + _positive(r, "rewards", "timeout_s")


@dataclass
class PPOSection:
    mini_batch_prompts: int = 256  # prompts per optimizer step (x samples_per_prompt rows)
    micro_batch_size: int = 8  # rows per forward/backward on each data-parallel rank
    epochs: int = 1
    max_grad_norm: float = 1.0
    # Micro-batches by token budget (prompt + response positions, padding included), rows
    # grouped by length; null: micro_batch_size rows per micro-batch.
    max_tokens_per_micro_batch: int | None = None
    # The forward-only old-log-prob pass keeps no activations: a larger budget (null: the above).
    logprob_max_tokens_per_micro_batch: int | None = None
    # Reduce gradients over data-parallel ranks once per mini-batch (its last micro-batch),
    # not per micro-batch, and keep the gathered parameters between its micro-batches; costs
    # one unsharded gradient copy (fp32) and one parameter copy (compute dtype) per rank.
    defer_grad_sync: bool = True

    @staticmethod
    def problems(u: Any) -> list[str]:
        return _at_least(u, "ppo", 1, "mini_batch_prompts", "micro_batch_size", "epochs")


@dataclass
class ParallelSection:
    dp_shard: int = -1  # -1: world_size // tp
    tp: int = 1
    activation_checkpointing: bool = False
    compile_model: bool = False
    mixed_precision: str | None = None  # "bf16" on GPU
    reshard_after_forward: bool = True
    collective_timeout_s: float = 1800.0  # the main (NCCL) group: real collectives only
    # Barriers and broadcasts that wait for rank-0-only work (worker start, generation,
    # scoring, evaluation) run on a CPU gloo group with this timeout instead.
    wait_timeout_s: float = 14400.0
    # A CPU trainer rank's malloc keeps what it frees for the next step instead of faulting
    # it back in every step (parallel/mesh.py's keep_freed_memory); false: glibc's default.
    cpu_keep_freed_memory: bool = True

    @staticmethod
    def problems(p: Any) -> list[str]:
        out = _at_least(p, "parallel", 1, "tp")
        if p.dp_shard < 1 and p.dp_shard != -1:
            out.append(f"parallel.dp_shard: must be >= 1 or -1, got {p.dp_shard}")
        return out


@dataclass
class CheckpointSection:
    every_n_steps: int = 50  # 0: only the final save
    keep_last: int = 2
    # Signals that stop the run at the next point every rank agrees on (between steps, or
    # after a step's rollout, before its update), with a checkpoint; the run then exits
    # with simko_tune.preemption.EXIT_CODE (75) and resume=auto continues from there.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # The time a stop may take (one step's generation or update, then the checkpoint); a
    # longer one is logged. Keep the scheduler's grace and torchrun's --shutdown-timeout above it.
    preempt_grace_s: float = 60.0

    @staticmethod
    def problems(c: Any) -> list[str]:
        from simko_tune.preemption import PreemptionWatch

        out = _at_least(c, "checkpoint", 0, "every_n_steps") + _at_least(
            c, "checkpoint", 1, "keep_last"
        )
        out += _positive(c, "checkpoint", "preempt_grace_s")
        return out + PreemptionWatch.check_names(list(c.preempt_signals))


@dataclass
class EvalSection:
    every_n_steps: int = 0  # 0: never during training
    before_training: bool = False  # also at step 0 of a fresh run: the curve's starting point
    n: int = 8
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 4096
    sets: dict[str, Any] = field(default_factory=dict)  # name -> _component_ returning problems


@dataclass
class LogSection:
    every_n_steps: int = 1
    samples_every_n_steps: int = 10
    num_samples: int = 2


@dataclass
class RecipeConfig:
    output_dir: str = MISSING
    max_steps: int = MISSING
    seed: int = 0
    resume: Any = "auto"  # "auto" | path | false
    dry_run: bool = False
    device: str = "cpu"
    # Memory of one trainer device for dry_run's memory plan; None: the CUDA device's own.
    device_memory_gib: float | None = None
    model_dir: str = MISSING  # Hugging Face directory: config.json, safetensors, tokenizer
    prepare_model: Any = None  # optional _component_ that builds model_dir if it is missing
    model: Any = MISSING
    checkpointer: Any = MISSING
    tokenizer: Any = MISSING
    dataset: Any = MISSING
    prompt_template: str = "qwen_boxed"
    rollout: RolloutSection = field(default_factory=RolloutSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    rewards: RewardSection = field(default_factory=RewardSection)
    loss: LossConfig = field(default_factory=LossConfig)  # range checks in plan.validate
    ppo: PPOSection = field(default_factory=PPOSection)
    optimizer: Any = MISSING
    lr_scheduler: Any = None
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    metric_logger: Any = MISSING
    log: LogSection = field(default_factory=LogSection)


@dataclass
class EvalRecipeSection:
    """The eval recipe's sampling: the keys of the training recipe's ``eval`` section (``n``,
    ``temperature``, ``top_p``, ``max_tokens``), plus what only a pass@K run needs."""

    n: int = 256  # samples per problem
    n_per_benchmark: dict[str, int] = field(default_factory=dict)  # n where it differs
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 4096
    seed: int | None = None  # None: fresh randomness; an int makes each batch reproducible
    ks: list[int] | None = None  # None: K = 1, 2, 4, ... up to each benchmark's n
    problems_per_call: int = 8  # problems per generate() call (x n sequences each)


@dataclass
class EvalRecipeConfig:
    """The eval recipe's schema (``recipes/simko_eval.py``). ``generation`` and ``rewards``
    are the training recipe's sections, so one block of YAML configures both recipes."""

    model_dir: str = MISSING
    output_dir: str = MISSING
    data_dir: str | None = None  # None: $SIMKO_DATA_DIR or ../shared/data, else the hub
    device: str = "cpu"  # the native generator's device
    benchmarks: list[str] = MISSING
    limit: int | None = None  # only the first `limit` problems of each benchmark
    prompt_template: str = "qwen_boxed"
    tokenizer: Any = MISSING
    eval: EvalRecipeSection = field(default_factory=EvalRecipeSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    rewards: RewardSection = field(default_factory=RewardSection)
    metric_logger: Any = MISSING


class ConfigError(ValueError):
    """A config problem, naming the key."""


def check_schema(cfg: DictConfig, schema_class: type = RecipeConfig) -> DictConfig:
    """Merge ``cfg`` onto the typed schema (the training recipe's unless another is given):
    unknown keys, wrong types and missing required keys raise ConfigError naming the full key.

    In the training schema two loss fields follow the rollout unless given:
    ``loss.temperature`` (the sampling temperature the old log-probs were drawn at) and
    ``loss.max_response_len`` (Dr. GRPO's constant). A given ``loss.temperature`` that
    differs is an error in ``plan.validate``, never overwritten.
    """
    schema = OmegaConf.structured(schema_class)
    if schema_class is RecipeConfig:
        cfg = _fill_loss_from_rollout(cfg)
    try:
        merged = OmegaConf.merge(schema, cfg)
        missing = sorted(OmegaConf.missing_keys(merged))
    except OmegaConfBaseException as e:
        key, message = getattr(e, "full_key", None) or "?", str(e).splitlines()[0]
        # a section given a scalar: OmegaConf names neither the key nor what it wants
        sections = {f.type: f.name for f in fields(schema_class)}  # "RolloutSection": "rollout"
        scalar = re.match(r"Merge error: \w+ is not a subclass of (\w+)\. value: (.*)", message)
        if key == "?" and scalar and scalar.group(1) in sections:
            key = sections[scalar.group(1)]
            message = f"a section (keys and values), got {scalar.group(2)}"
        raise ConfigError(f"config key {key!r}: {_as_written(message)}") from None
    if missing:
        raise ConfigError(f"config keys required but missing: {', '.join(missing)}")
    return merged


def _as_written(message: str) -> str:
    """OmegaConf's message as YAML writes values: a closed set's class (``<enum
    'WeightTransfer'>``, ``'RewardMode'``) becomes the values a config may give it, and
    Python's ``'None'``, ``'True'``, ``'False'`` become ``null``, ``true``, ``false``."""
    choices = {c.__name__: c for c in Choice.__subclasses__()}

    def allowed(name: str) -> str:
        return f"one of [{', '.join(c.value for c in choices[name])}]"

    message = re.sub(
        r"is not a valid input for <enum '(\w+)'>",
        lambda m: f"is not {allowed(m.group(1))}" if m.group(1) in choices else m.group(0),
        message,
    )
    message = re.sub(
        r"<enum '(\w+)'>|'(\w+)'",
        lambda m: (
            allowed(m.group(1) or m.group(2))
            if (m.group(1) or m.group(2)) in choices
            else m.group(0)
        ),
        message,
    )
    for python, yaml in (("'None'", "null"), ("'True'", "true"), ("'False'", "false")):
        message = message.replace(python, yaml)
    return message


def _fill_loss_from_rollout(cfg: DictConfig) -> DictConfig:
    loss = cfg.get("loss")
    if loss is not None and not isinstance(loss, DictConfig):
        return cfg  # the schema merge reports the wrong type
    rollout = cfg.get("rollout")
    if not isinstance(rollout, DictConfig):
        rollout = {}  # missing, or of a wrong type the schema merge reports
    defaults = {
        "temperature": rollout.get("temperature", RolloutSection.temperature),
        "max_response_len": rollout.get("max_response_tokens", RolloutSection.max_response_tokens),
    }
    missing = {k: v for k, v in defaults.items() if loss is None or loss.get(k) is None}
    if not missing:
        return cfg
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for key, value in missing.items():
        OmegaConf.update(cfg, f"loss.{key}", value, force_add=True)
    return cfg
