"""dry_run's memory plan against arithmetic written out by hand, for the shipped 7B config
(whose comment states the same numbers) and for settings that cannot fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from simko_tune.config import check_schema
from simko_tune.memory_plan import ModelShape
from simko_tune.plan import dry_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Qwen2.5-7B, from its config.json: vocabulary, width, layers, KV width (4 heads x 128), MLP.
V, D, L, KV, FF = 152_064, 3584, 28, 512, 18_944
BLOCK = (
    (D * D + D)  # q_proj with bias
    + 2 * (D * KV + KV)  # k_proj, v_proj with biases
    + D * D  # o_proj
    + 3 * D * FF  # w1, w2, w3
    + 2 * D  # two RMSNorm scales
)
N_7B = 2 * V * D + L * BLOCK + D  # untied embedding and output, blocks, final norm
GB = 1e9


def _cfg(name: str, *overrides: str):
    cfg = OmegaConf.merge(
        OmegaConf.load(CONFIGS / f"{name}.yaml"), OmegaConf.from_dotlist(overrides)
    )
    return check_schema(cfg)


@pytest.fixture(scope="module", params=["qwen2_5_7b", "qwen2_5_math_7b"])
def plan_7b(request):
    return dry_run(_cfg(request.param))["memory"]


def test_7b_plan_matches_hand_arithmetic(plan_7b):
    assert N_7B == 7_615_616_512
    ranks = 4  # dp_shard=4, tp=1
    assert plan_7b["parameters"] == N_7B * 4 // ranks  # fp32 master weights
    assert plan_7b["gradients"] == N_7B * 4 // ranks
    assert plan_7b["optimizer_state"] == 2 * N_7B * 4 // ranks  # AdamW m and v, fp32
    # the comment's "16 B/param = 122 GB / 4 ranks = 30.5 GB"
    sharded = plan_7b["parameters"] + plan_7b["gradients"] + plan_7b["optimizer_state"]
    assert sharded == pytest.approx(30.5 * GB, rel=0.01)
    # bf16 copies of the FSDP root (embedding + output + final norm) and two gathered blocks
    assert plan_7b["compute_copies"] == (2 * V * D + D + 2 * BLOCK) * 2
    tokens = 2 * (1024 + 3072)  # micro-batch 2 rows of prompt + response
    per_token_block = 4 * D + 2 * D + 2 * KV + 4 * FF
    saved = tokens * D * L * 2  # each block's bf16 input: the comment's 1.6 GB
    assert saved == pytest.approx(1.6 * GB, rel=0.03)
    assert plan_7b["activations_checkpointed"] == saved + tokens * per_token_block * 2
    assert plan_7b["activations_full"] == tokens * L * per_token_block * 2
    # responses of 3072 tokens exceed chunk_size 2048: one response is one chunk
    assert plan_7b["loss_chunk"] == 2 * 3072 * V * 4 + V * D * 4
    assert plan_7b["publication"] == N_7B * 2  # bf16 engines: 15.2 GB
    assert plan_7b["activation_checkpointing"] is True
    assert plan_7b["deferred_gradients"] == plan_7b["deferred_parameters"] == 0
    assert plan_7b["reference"] == 0  # loss.kl_coef: 0.0, no reference policy is built
    total = sharded + plan_7b["compute_copies"] + plan_7b["activations_checkpointed"]
    assert plan_7b["total"] == total + plan_7b["loss_chunk"]
    assert plan_7b["total"] == pytest.approx(43 * GB, rel=0.02)  # "About 43 GB ... of 80"
    assert plan_7b["device_memory"] == 79 * 2**30
    assert plan_7b["warnings"] == []


def test_tensor_parallel_divides_what_it_shards():
    base = dry_run(_cfg("qwen2_5_7b"))["memory"]
    tp = dry_run(_cfg("qwen2_5_7b", "parallel.tp=2", "parallel.dp_shard=2"))["memory"]
    assert tp["parameters"] == base["parameters"]  # still 4 ranks in all
    assert tp["compute_copies"] == base["compute_copies"] // 2
    tokens = 2 * 4096
    assert tp["activations_full"] == tokens * L * (4 * D + (2 * D + 2 * KV + 4 * FF) // 2) * 2


def test_too_big_setting_warns(capsys):
    plan = dry_run(
        _cfg(
            "qwen2_5_7b",
            "ppo.micro_batch_size=8",
            "ppo.max_tokens_per_micro_batch=32768",  # the config's budget is 2 rows' worth
            "parallel.activation_checkpointing=false",
        )
    )["memory"]
    out = capsys.readouterr().out
    assert plan["total"] > 79 * 2**30
    assert len(plan["warnings"]) == 1 and "exceeds the device's 79.0 GiB" in plan["warnings"][0]
    assert "activation_checkpointing=true would need" in plan["warnings"][0]
    assert "WARNING: memory plan" in out
    assert "activations, no AC" in out and "total per rank" in out


def test_smaller_device_warns_for_the_shipped_setting():
    plan = dry_run(_cfg("qwen2_5_7b", "device_memory_gib=24"))["memory"]
    assert plan["device_memory"] == 24 * 2**30
    assert plan["warnings"] and "24.0 GiB" in plan["warnings"][0]


def test_device_memory_unknown_on_cpu_without_config(capsys):
    plan = dry_run(_cfg("qwen2_5_7b", "device_memory_gib=null", "device=cpu"))["memory"]
    assert plan["device_memory"] is None and plan["warnings"] == []
    assert "set device_memory_gib" in capsys.readouterr().out


def test_engine_dtype_sets_publication_size_and_bad_dtype_names_key():
    fp32 = dry_run(_cfg("qwen2_5_7b", "generation.engine_kwargs.dtype=float32"))["memory"]
    assert fp32["publication"] == N_7B * 4
    native = dry_run(_cfg("qwen2_5_7b", "generation.backend=native"))["memory"]
    assert native["publication"] == N_7B * 4  # the native generator computes in fp32
    with pytest.raises(ValueError, match="generation.engine_kwargs.dtype"):
        dry_run(_cfg("qwen2_5_7b", "generation.engine_kwargs.dtype=int3"))


def test_weight_deltas_hold_one_publication_in_host_ram(capsys):
    """generation.weight_delta (on in the 7B configs): the writers keep the last version's
    bytes for the next delta, 15.2 GB in bf16; off, nothing; never counted on the device."""
    on = dry_run(_cfg("qwen2_5_7b"))["memory"]
    assert on["delta_base"] == on["publication"] == N_7B * 2
    assert "delta base (host RAM)" in capsys.readouterr().out
    off = dry_run(_cfg("qwen2_5_7b", "generation.weight_delta=false"))["memory"]
    assert off["delta_base"] == 0 and off["total"] == on["total"]


def test_missing_model_config_leaves_memory_unknown(tmp_path, capsys):
    plan = dry_run(_cfg("tiny_cpu", f"model_dir={tmp_path}/absent"))
    assert "memory" not in plan
    assert "memory: unknown" in capsys.readouterr().out


def test_model_shape_of_a_tied_tiny_qwen2():
    from torchtune.models.qwen2 import qwen2

    with torch.device("meta"):
        model = qwen2(
            vocab_size=100, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=64,
            intermediate_dim=96, max_seq_len=32, tie_word_embeddings=True,
        )  # fmt: skip
    shape = ModelShape.from_model(model)
    kv = 2 * 16
    block = (64 * 64 + 64) + 2 * (64 * kv + kv) + 64 * 64 + 3 * 64 * 96 + 2 * 64
    assert shape.block_params == block
    assert shape.root_params == 100 * 64 + 64  # one tied table + final norm
    assert shape.num_params == 3 * block + 100 * 64 + 64
    assert (shape.kv_dim, shape.intermediate_dim, shape.vocab_size) == (kv, 96, 100)


def test_token_budget_and_deferred_gradient_sync():
    """ppo.max_tokens_per_micro_batch sets the activations' tokens; ppo.defer_grad_sync adds
    one unsharded fp32 gradient copy per rank (keys read when the schema has them)."""
    from torchtune.models.qwen2_5 import qwen2_5_7b_base

    from simko_tune.memory_plan import estimate_memory

    with torch.device("meta"):
        shape = ModelShape.from_model(qwen2_5_7b_base())
    raw = OmegaConf.load(CONFIGS / "qwen2_5_7b.yaml")
    raw.ppo.max_tokens_per_micro_batch = 16384
    raw.ppo.defer_grad_sync = True
    plan = estimate_memory(shape, raw, dp=4, tp=1)
    per_token_block = 6 * D + 2 * KV + 4 * FF
    assert plan.activations_checkpointed == 16384 * D * L * 2 + 16384 * per_token_block * 2
    assert plan.deferred_gradients == N_7B * 4  # the comment's "+30 GB" per rank
    # the blocks' bf16 copies stay gathered between micro-batches; 2 are in compute_copies
    assert plan.deferred_parameters == (L - 2) * BLOCK * 2
    assert plan.total == (
        plan.parameters + plan.gradients + plan.optimizer_state + plan.compute_copies
        + N_7B * 4 + (L - 2) * BLOCK * 2 + plan.activations_checkpointed + plan.loss_chunk
    )  # fmt: skip
    assert plan.loss_chunk == 2 * 3072 * V * 4 + V * D * 4
    single = estimate_memory(shape, raw, dp=1, tp=1)
    assert single.deferred_gradients == single.deferred_parameters == 0  # one rank: no sync


def test_kl_reference_adds_its_sharded_fp32_parameters(capsys):
    """loss.kl_coef > 0 builds a frozen copy of the policy, sharded like it: fp32 parameters
    over the 4 ranks, no gradients, no optimizer state, no kept compute copies."""
    base = dry_run(_cfg("qwen2_5_7b"))["memory"]
    capsys.readouterr()
    kl = dry_run(_cfg("qwen2_5_7b", "loss.kl_coef=0.05"))["memory"]
    assert kl["reference"] == N_7B * 4 // 4  # 7.6 GB
    assert kl["total"] == base["total"] + N_7B * 4 // 4
    for key in ("parameters", "gradients", "optimizer_state", "compute_copies"):
        assert kl[key] == base[key]
    assert kl["notes"]["reference"] == "loss.kl_coef > 0: fp32 parameters over 4 ranks"
    assert "reference model" in capsys.readouterr().out
    tp = dry_run(_cfg("qwen2_5_7b", "loss.kl_coef=0.05", "parallel.tp=2", "parallel.dp_shard=2"))
    assert tp["memory"]["reference"] == N_7B * 4 // 4  # TP x FSDP: still 4 shards


@pytest.mark.parametrize(
    "name", ["qwen2_5_7b", "qwen2_5_math_7b", "llama3_2_3b", "qwen2_5_1_5b", "qwen2_5_0_5b"]
)
def test_config_comment_states_the_plans_total(name, capsys):
    """Each GPU config's header says "About N GB (X GiB) of 80": the plan's total, with the
    config's own settings (ppo.defer_grad_sync included where it is on)."""
    import re

    lines = (CONFIGS / f"{name}.yaml").read_text().splitlines()
    header = " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))
    stated = re.search(r"About \d+ GB \(([\d.]+) GiB\) of 80", header)
    assert stated, f"{name}.yaml states no total"
    plan = dry_run(_cfg(name))["memory"]
    capsys.readouterr()
    assert f"{plan['total'] / 2**30:.1f}" == stated.group(1)


# ---------------------------------------------------------------- weight copies per node
PUB_7B = N_7B * 2  # one bf16 publication of the 7B model


def _in_ram(path) -> bool:
    from simko_tune.memory_plan import Filesystem

    return Filesystem.of(path).in_ram


def test_weight_copies_are_counted_per_node(capsys):
    """qwen2_5_7b: 4 local vLLM workers, weight deltas, the sync dir under /dev/shm. The sync
    dir keeps the served publication, the spare (the next full one is written over it) and
    the deltas since the newest full one (counted as one); each worker keeps two rebuilt
    copies (the version it serves, the one it rebuilds into) under private_root."""
    from simko_tune.generation.sync_dir import private_root

    copies = dry_run(_cfg("qwen2_5_7b"))["weight_copies"]
    sync_dir = 3 * PUB_7B
    rebuilt = 4 * 2 * PUB_7B
    assert copies["sync_dir_bytes"] == sync_dir and copies["rebuilt_bytes"] == rebuilt
    assert [fs["need"] for fs in copies["filesystems"]] == [sync_dir + rebuilt]  # one: /dev/shm
    files_in_ram = sync_dir + rebuilt if _in_ram(private_root()) else 0
    assert copies["host_ram"] == files_in_ram + PUB_7B  # + the trainer's delta base
    out = capsys.readouterr().out
    assert f"{(sync_dir + rebuilt) / 2**30:8.2f} GiB" in out  # 156.04: the node's total
    assert f"{(files_in_ram + PUB_7B) / 2**30:8.2f} GiB" in out and "node, host RAM" in out


@pytest.mark.parametrize(
    ("overrides", "kept", "rebuilders", "host_ram_held"),
    [
        (["generation.weight_delta=false"], 2, 0, 0),  # served + spare, no delta base
        (["rollout.max_staleness=1"], 4, 4, 1),  # + the next version, one-step-off
        (["generation.addresses=[tcp://gen:5555]"], 3, 0, 1),  # workers on another node
        (["generation.backend=native", "device=cpu"], 3, 1, 1 + 1),  # + its fp32 model
        (["generation.backend=native", "generation.weight_delta=false", "device=cpu"], 2, 0, 1),
    ],
)
def test_weight_copies_follow_the_settings(overrides, kept, rebuilders, host_ram_held, tmp_path):
    """With the sync dir on disk (tmp_path): host RAM holds what processes keep (delta base,
    generators on CPU) and the rebuilt copies, if private_root is in RAM."""
    from simko_tune.generation.sync_dir import private_root
    from simko_tune.memory_plan import weight_copies

    cfg = _cfg("qwen2_5_7b", f"generation.sync_dir={tmp_path}", *overrides)
    pub = N_7B * (4 if "generation.backend=native" in overrides else 2)
    copies = weight_copies(cfg, pub, world_size=4)
    assert (copies.kept, copies.rebuilders) == (kept, rebuilders)
    assert copies.sync_dir_bytes == kept * pub and copies.rebuilt_bytes == rebuilders * 2 * pub
    rebuilt_in_ram = rebuilders * 2 * pub if _in_ram(private_root()) else 0
    sync_in_ram = kept * pub if _in_ram(tmp_path) else 0
    assert copies.host_ram == sync_in_ram + rebuilt_in_ram + host_ram_held * pub


def test_in_memory_transfer_has_no_files_and_holds_its_snapshots():
    """tiny_cpu on one rank: weight_transfer auto picks memory; the copies are the snapshot
    (two one-step-off) and the native generator's own model, in host RAM."""
    from simko_tune.memory_plan import weight_copies

    for staleness, snapshots in ((0, 1), (1, 2)):
        cfg = _cfg("tiny_cpu", f"rollout.max_staleness={staleness}")
        copies = weight_copies(cfg, 1000, world_size=1)
        assert copies.transfer == "memory" and copies.filesystems == []
        assert copies.host_ram == (snapshots + 1) * 1000


def test_start_refuses_when_the_sync_dirs_filesystem_is_too_small(tmp_path, monkeypatch):
    """The start's check: the node's copies against the free space of the filesystems they
    fill; the error names the settings that need less there."""
    import shutil

    from simko_tune import memory_plan
    from simko_tune.config import ConfigError
    from simko_tune.memory_plan import check_weight_space

    (tmp_path / "shm").mkdir()
    (tmp_path / "sync").mkdir()
    monkeypatch.setattr(memory_plan, "private_root", lambda: tmp_path / "shm")  # one filesystem
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        memory_plan.shutil, "disk_usage", lambda p: usage._replace(free=10 * PUB_7B)
    )
    cfg = _cfg("qwen2_5_7b")
    with pytest.raises(ConfigError) as info:  # 3 + 4 x 2 = 11 publications > 10
        check_weight_space(cfg, PUB_7B, world_size=4, sync_dir=tmp_path / "sync")
    message = str(info.value)
    assert f"{10 * PUB_7B / 2**30:.2f} GiB free" in message
    assert f"need {11 * PUB_7B / 2**30:.2f} GiB there" in message
    assert "set generation.weight_delta=false" in message
    assert "point generation.sync_dir at a larger filesystem" in message
    # each remedy fits: deltas off keeps 2 publications; a sync dir elsewhere 3 of the 11
    no_deltas = _cfg("qwen2_5_7b", "generation.weight_delta=false")
    check_weight_space(no_deltas, PUB_7B, world_size=4, sync_dir=tmp_path / "sync")
    monkeypatch.setattr(
        memory_plan.shutil, "disk_usage", lambda p: usage._replace(free=11 * PUB_7B)
    )
    check_weight_space(cfg, PUB_7B, world_size=4, sync_dir=tmp_path / "sync")
