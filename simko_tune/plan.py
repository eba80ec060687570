"""``dry_run=true``: validate a whole recipe config and print the plan, without loading weights.

Everything that would otherwise fail minutes (or GPU-hours) into a run is checked here:
the schema (unknown keys, types), the loss settings, batch-size divisibility by ranks, the
mesh against the world size, the model's head counts against TP, and the files the run
reads. Missing files are reported, not fatal, so a 7B config validates on a machine
without its weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config as tt_config

from simko_tune.config import (
    CheckpointSection,
    ConfigError,
    GenerationSection,
    ParallelSection,
    PPOSection,
    RewardSection,
    RolloutSection,
    resolve_weight_transfer,
)
from simko_tune.loss import loss_config_problems
from simko_tune.memory_plan import MemoryPlan, ModelShape, estimate_memory, weight_copies
from simko_tune.models import model_from_hf_config
from simko_tune.parallel.mesh import cpu_threads

_FILE_KEYS = ("path", "merges_file", "special_tokens_path", "checkpoint_dir")


def validate(cfg: DictConfig) -> tuple[list[str], dict[str, Any]]:
    """Return (every problem that makes the config unusable, all of them, and the plan).
    Schema errors (unknown keys, types) were already raised by ``check_schema``."""
    errors: list[str] = []
    plan: dict[str, Any] = {}

    errors += [
        "loss." + line.removeprefix("LossConfig.") for line in loss_config_problems(cfg.loss)
    ]
    r, u, g, p = cfg.rollout, cfg.ppo, cfg.generation, cfg.parallel
    if cfg.loss.temperature != r.temperature:
        errors.append(
            f"loss.temperature={cfg.loss.temperature} differs from rollout.temperature="
            f"{r.temperature}: the loss must use the temperature the rollout sampled at "
            "(leave loss.temperature out to follow the rollout)"
        )
    if cfg.max_steps < 1:
        errors.append(f"max_steps: must be >= 1, got {cfg.max_steps}")
    for section, name in (
        (RolloutSection, "rollout"),
        (GenerationSection, "generation"),
        (RewardSection, "rewards"),
        (PPOSection, "ppo"),
        (ParallelSection, "parallel"),
        (CheckpointSection, "checkpoint"),
    ):
        errors += section.problems(cfg[name])
    lengths = [("rollout.max_response_tokens", r.max_response_tokens)]
    if cfg.eval.sets and (cfg.eval.every_n_steps or cfg.eval.before_training):
        lengths.append(("eval.max_tokens", cfg.eval.max_tokens))
    errors += _native_context_problems(cfg, lengths)
    max_model_len = g.engine_kwargs.get("max_model_len")
    if max_model_len is not None:
        for key, response in lengths:
            if r.max_prompt_tokens + response > max_model_len:
                errors.append(
                    f"rollout.max_prompt_tokens + {key} = {r.max_prompt_tokens} + {response} "
                    f"exceeds generation.engine_kwargs.max_model_len={max_model_len}"
                )
    if (p.dp_shard < 1 and p.dp_shard != -1) or p.tp < 1 or u.mini_batch_prompts < 1:
        return errors, plan  # the arithmetic below needs these

    world = int(os.environ.get("WORLD_SIZE", "0")) or (p.dp_shard if p.dp_shard > 0 else 1) * p.tp
    dp = p.dp_shard if p.dp_shard > 0 else world // p.tp
    if dp * p.tp != world:
        errors.append(
            f"parallel.dp_shard={p.dp_shard} x parallel.tp={p.tp} does not match the world size {world}"
        )
    if r.prompts_per_step % u.mini_batch_prompts:
        errors.append(
            f"rollout.prompts_per_step={r.prompts_per_step} is not a multiple of "
            f"ppo.mini_batch_prompts={u.mini_batch_prompts}"
        )
    rows = u.mini_batch_prompts * r.samples_per_prompt
    if rows % max(dp, 1):
        errors.append(
            f"ppo.mini_batch_prompts x rollout.samples_per_prompt = {rows} rows do not split "
            f"evenly over {dp} data-parallel ranks"
        )
    transfer, why = resolve_weight_transfer(g, world)
    if transfer == "memory" and (g.backend != "native" or world != 1):
        errors.append(
            "generation.weight_transfer=memory hands the weights to a generator in the "
            "trainer's process: it needs generation.backend=native and one trainer rank "
            f"(got backend {g.backend}, world size {world}); set "
            "generation.weight_transfer=auto (or files) to publish safetensors files instead"
        )
    if g.devices and not g.addresses and str(cfg.device).startswith("cuda"):
        from simko_tune.generation.client import check_device_overlap, trainer_cuda_devices

        try:
            check_device_overlap(list(g.devices), trainer_cuda_devices())
        except ValueError as e:
            errors.append(str(e))

    missing = _missing_files(cfg)
    model = _meta_model(cfg.model)
    params = (
        "unknown (model_dir missing)"
        if model is None
        else sum(x.numel() for x in model.parameters())
    )
    if model is not None:
        attn = model.layers[0].attn
        for key, heads in (
            ("num_attention_heads", attn.num_heads),
            ("num_key_value_heads", attn.num_kv_heads),
        ):
            if heads % p.tp:
                errors.append(f"parallel.tp={p.tp} does not divide the model's {key}={heads}")

    per_rank = rows // max(dp, 1)
    plan.update(
        {
            "world_size": world,
            "mesh": {"dp_shard": dp, "tp": p.tp},
            "parameters": params,
            "steps": cfg.max_steps,
            "rollout": f"{r.prompts_per_step} prompts x {r.samples_per_prompt} samples = "
            f"{r.prompts_per_step * r.samples_per_prompt} completions per step",
            "updates_per_step": (r.prompts_per_step // u.mini_batch_prompts) * u.epochs,
            "rows_per_update": rows,
            "rows_per_rank_per_update": per_rank,
            "micro_batches_per_rank_per_update": -(-per_rank // u.micro_batch_size),
            "generation": (
                f"remote workers {list(g.addresses)}"
                if g.addresses
                else f"{g.num_workers} x {g.backend} worker(s), tp={g.tensor_parallel_size}, "
                f"devices={list(g.devices) if g.devices else 'default'}"
            ),
            "weight_transfer": f"{transfer} ({why})",
            "loss": OmegaConf.to_container(cfg.loss),
            "missing_files": missing,
        }
    )
    return errors, plan


def dry_run(cfg: DictConfig) -> dict[str, Any]:
    errors, plan = validate(cfg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    print("dry run: config is valid")
    for key, value in plan.items():
        print(f"  {key}: {value}")
    if plan["missing_files"]:
        print("  note: the files above are missing here; a real run needs them")
    if cfg.device == "cpu":
        threads, source = cpu_threads()
        plan["trainer_threads"] = threads
        print(f"  trainer threads: {threads} ({source})")
        if cfg.parallel.cpu_keep_freed_memory:
            print("  trainer heap: freed memory kept for the next step (glibc mallopt)")
        g = cfg.generation
        if cfg.rollout.max_staleness and g.backend == "vllm" and not (g.devices or g.addresses):
            print(
                "  one-step-off on CPU: the trainer keeps the first half of these cores, the "
                "vLLM workers the rest (generation.devices turns the split off)"
            )
    memory = _memory_plan(cfg, plan)
    if memory is not None:
        plan["memory"] = memory.to_dict()
        _print_block(
            "memory per trainer rank (estimate; simko_tune/memory_plan.py)",
            memory.report(),
            memory.warnings(),
        )
        copies = weight_copies(cfg, memory.publication, plan["world_size"])
        plan["weight_copies"] = copies.to_dict()
        _print_block(
            "weight copies on rank 0's node (estimate; the start checks the space)",
            copies.report(),
            [f"on this machine, {shortfall}" for shortfall in copies.shortfalls()],
        )
    return plan


def _print_block(title: str, lines: list[str], warnings: list[str]) -> None:
    print(f"  {title}:")
    for line in lines:
        print(f"    {line}")
    for warning in warnings:
        print(f"  WARNING: {warning}")


def _memory_plan(cfg: DictConfig, plan: dict[str, Any]) -> MemoryPlan | None:
    """The memory estimate for the mesh the plan resolved; None without the model's shape."""
    model = _meta_model(cfg.model)
    if model is None:
        print("  memory: unknown (the model's config.json is missing)")
        return None
    mesh = plan["mesh"]
    return estimate_memory(ModelShape.from_model(model), cfg, dp=mesh["dp_shard"], tp=mesh["tp"])


def _native_context_problems(cfg: DictConfig, lengths: list[tuple[str, int]]) -> list[str]:
    """The native generator decodes with the model of ``model_dir``'s config.json, whose
    positions (``max_position_embeddings``) bound prompt plus response whatever
    ``engine_kwargs`` say. Without that config.json (built at the start by prepare_model,
    or listed as missing) there is nothing to check against."""
    if cfg.generation.backend != "native":
        return []
    try:
        with torch.device("meta"):
            context = model_from_hf_config(cfg.model_dir).max_seq_len
    except FileNotFoundError:
        return []
    prompt = cfg.rollout.max_prompt_tokens
    return [
        f"rollout.max_prompt_tokens + {key} = {prompt} + {response} exceeds the model's "
        f"context of {context} positions (max_position_embeddings in {cfg.model_dir}/"
        "config.json), which generation.backend=native decodes within"
        for key, response in lengths
        if prompt + response > context
    ]


def _missing_files(cfg: DictConfig) -> list[str]:
    paths = (
        []
        if cfg.prepare_model and cfg.prepare_model.get("_component_")
        else [Path(cfg.model_dir) / "config.json"]
    )
    for section in ("tokenizer", "checkpointer"):
        node = cfg.get(section)
        for key in _FILE_KEYS:
            if node is not None and node.get(key):
                paths.append(Path(node[key]))
    return [str(p) for p in paths if not p.exists()]


def _meta_model(model_cfg: DictConfig) -> torch.nn.Module | None:
    """Build the model on the meta device: shapes only, no memory, no weights. None when
    its builder needs a config.json that is not here."""
    try:
        with torch.device("meta"):
            return tt_config.instantiate(model_cfg)
    except FileNotFoundError:
        return None
