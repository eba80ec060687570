"""The recipe end to end through the real CLI (`tune run simko_recipe ...`), from a temporary
directory: TensorBoard scalars, checkpoints with HF exports, kill -9 and resume, and the
same result on 1 and 2 torchrun ranks (FSDP2, TP)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from harness import TUNE_RUN, child_env, run_process, run_torchrun
from safetensors.torch import load_file

from simko_tune.metrics.tensorboard import read_scalars

pytestmark = pytest.mark.slow

SCALARS = {
    "loss", "gate_threshold_mean", "gated_frac", "sampled_top1_frac", "logprob_sampled_mean",
    *(f"policy/{name}_{kind}" for kind in ("all", "gated") for name in (
        "entropy", "logprob_rank1", "logprob_rank2", "logprob_rank3", "mass_rank2_to_k")),
    "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "approx_kl", "grad_norm_mean",
    "lr", "weight_version", "reward/timeouts_total",
    "reward/mean", "reward/identical_group_frac", "response/len_mean", "response/len_max",
    "response/truncated_frac", "time/generate", "time/score", "time/old_logprobs", "time/update",
    "time/publish", "throughput/response_tokens_per_s", "memory/peak_gib",
    "logprob_mismatch/mean_abs", "updates_skipped_nonfinite",
    "reward/identical_group_token_frac", "throughput/generated_tokens_per_s",
    "throughput/trained_tokens_per_s", "perf/update_tflops_per_s", "eta_s",
    "time_share/wait_rollout", "time_share/old_logprobs", "time_share/update",
    "time_share/publish",
}  # fmt: skip


def _assert_same_step(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Weights after the same AdamW step from one process and from several ranks. Its first
    step moves a weight by lr * g / (|g| + eps): where a gradient entry nearly cancels
    (|g| ~ eps = 1e-8), the other summation order changes that weight's step by anything up
    to lr, as the machine's kernels round. So: all but a handful of entries equal to 1e-6,
    which any wrong gradient (it moves most entries) would break."""
    if name.endswith("k_proj.bias"):
        # Its gradient is zero in exact arithmetic (a bias on the keys shifts every score of
        # a query alike, which the softmax ignores): AdamW steps it by rounding noise alone.
        return
    diff = (a - b).abs()
    assert int((diff > 1e-6 + 1e-5 * b.abs()).sum()) <= max(2, diff.numel() // 1000), name


# Timings, speeds and memory differ run to run; everything else must not.
VOLATILE = ("time/", "time_share/", "throughput/", "perf/", "eta_s", "memory/")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """A quickly warm-started Countdown policy (few SFT steps: rewards low but not all zero)."""
    from simko_tune.demo.warm_start import WarmStartConfig, build_tiny_policy

    out = tmp_path_factory.mktemp("policy") / "tiny_policy"
    return build_tiny_policy(
        out, WarmStartConfig(max_steps=60, target_success=None, sft_problems=300, eval_problems=16)
    )


def _args(out: Path, policy: Path, *extra: str) -> list[str]:
    return [
        "--config", "tiny_cpu", f"output_dir={out}", f"model_dir={policy}", "prepare_model=null",
        "rollout.prompts_per_step=4", "ppo.mini_batch_prompts=2", "ppo.micro_batch_size=8",
        "dataset.n=64", "log.samples_every_n_steps=1", "eval.every_n_steps=0",
        "eval.before_training=false",
        "generation.weight_transfer=files", f"generation.sync_dir={out}/sync", *extra,
    ]  # fmt: skip


VLLM = "generation.backend=vllm"  # tiny_cpu generates in-process by default


def _tune_run(cwd: Path, args: list[str], nproc: int = 1, timeout: int = 600):
    """``tune run simko_recipe args``: one process, or ``nproc`` torchrun ranks."""
    if nproc == 1:
        return run_process([*TUNE_RUN, "simko_recipe", *args], cwd=cwd, timeout_s=timeout)
    return run_torchrun(nproc, "simko_recipe", args, launcher=TUNE_RUN, cwd=cwd, timeout_s=timeout)


def _load_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    shards = sorted(hf_dir.glob("*.safetensors"))
    assert shards and (hf_dir / "model.safetensors.index.json").is_file(), list(hf_dir.iterdir())
    return {k: v for f in shards for k, v in load_file(f).items()}


def _final_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return _load_hf_weights(out / "checkpoints" / f"step_{step:08d}" / "hf")


def test_tiny_cpu_two_steps_with_vllm_logs_everything(tmp_path, policy_dir):
    out = tmp_path / "out"
    _tune_run(
        tmp_path,
        _args(out, policy_dir, VLLM, "max_steps=2", "checkpoint.every_n_steps=2", "eval.every_n_steps=2",
              "eval.before_training=true", "eval.sets.countdown_test.n=8"),
    )  # fmt: skip
    scalars = read_scalars(out / "tb")
    missing = SCALARS - set(scalars)
    assert not missing, f"missing TensorBoard scalars: {sorted(missing)}"
    assert set(scalars["loss"]) == {1, 2}
    assert scalars["weight_version"] == {1: 1.0, 2: 2.0}
    assert set(scalars["time/publish_reload"]) == {1, 2}  # synchronous: delivered at once
    assert set(scalars["eval/countdown_test/pass@8"]) == {0, 2}  # before training, at step 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = next(p for p in (out / "tb").iterdir() if p.is_dir())
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    samples = [
        ev for tag in acc.Tags()["tensors"] if tag.startswith("samples") for ev in acc.Tensors(tag)
    ]
    assert {ev.step for ev in samples} == {1, 2}  # sample completions as text, every step here
    assert b"**gold**" in samples[0].tensor_proto.string_val[0]
    for kind in ("all", "gated"):
        ranks = [scalars[f"policy/logprob_rank{n}_{kind}"] for n in (1, 2, 3)]
        assert all(v <= 0 for rank in ranks for v in rank.values())
        assert ranks[0][1] >= ranks[1][1] >= ranks[2][1]
        assert 0 < scalars[f"policy/mass_rank2_to_k_{kind}"][1] < 1
    # the gate picks the high-entropy tokens: their entropy is above the all-token mean
    assert scalars["policy/entropy_gated"][1] > scalars["policy/entropy_all"][1]
    # the checkpoint carries an HF export that transformers loads, equal to the trainer's weights
    from transformers import AutoModelForCausalLM

    hf_dir = out / "checkpoints" / "step_00000002" / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    exported = _load_hf_weights(hf_dir)
    initial = load_file(policy_dir / "model.safetensors")
    assert any(not torch.equal(exported[k], initial[k]) for k in initial), "weights never changed"
    for name, param in model.state_dict().items():
        if name in exported:
            assert torch.equal(param, exported[name])


def test_one_step_off_with_vllm_delivers_weights_from_the_rollout_thread(tmp_path, policy_dir):
    """Staleness 1 through the CLI with a real vLLM worker. The trainer only writes each
    version; the rollout thread has the worker reload it just before it samples with it
    (its reload is logged with the step that trains on that rollout); an evaluation
    delivers the trainer's own weights first; the last step, with nothing prefetching,
    delivers at once."""
    out = tmp_path / "out"
    _tune_run(
        tmp_path,
        _args(out, policy_dir, VLLM, "max_steps=3", "rollout.max_staleness=1", "eval.every_n_steps=2",
              "eval.sets.countdown_test.n=4", "eval.n=2", "checkpoint.every_n_steps=3"),
    )  # fmt: skip
    scalars = read_scalars(out / "tb")
    assert scalars["weight_version"] == {1: 1.0, 2: 2.0, 3: 3.0}
    assert scalars["rollout/staleness_max"] == {1: 0.0, 2: 1.0, 3: 1.0}
    assert set(scalars["eval/countdown_test/pass@2"]) == {2}  # checked against version 2
    # step 1: v1 written, not delivered (step 2's rollout, sampled with v0, in flight);
    # step 2: its rollout needed no delivery, and v2 is only written; step 3: its rollout's
    # delivery of v1, then v3 at once
    assert set(scalars["time/publish_write"]) == {1, 2, 3}
    assert set(scalars["time/publish_reload"]) == {3}


def _comparable(scalars: dict[str, dict[int, float]], steps) -> dict[str, list[float]]:
    return {
        tag: [vals[s] for s in steps]
        for tag, vals in scalars.items()
        if not tag.startswith(VOLATILE) and all(s in vals for s in steps)
    }


def test_kill_and_resume_gives_identical_metrics_and_weights(tmp_path, policy_dir):
    native = ("generation.backend=native", "max_steps=4", "checkpoint.every_n_steps=2")
    full = tmp_path / "full"
    _tune_run(tmp_path, _args(full, policy_dir, *native))

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(
        [*TUNE_RUN, "simko_recipe", *_args(resumed, policy_dir, *native)],
        cwd=tmp_path, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    marker = resumed / "checkpoints" / "step_00000002" / "hf" / "model.safetensors.index.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the first checkpoint never appeared"
    os.killpg(proc.pid, signal.SIGKILL)  # mid step 3
    proc.wait(timeout=60)
    assert not (resumed / "checkpoints" / "step_00000004").exists()

    tb_before = {p.name for p in (resumed / "tb").iterdir()}
    _tune_run(tmp_path, _args(resumed, policy_dir, *native, "resume=auto"))
    new_runs = [p for p in (resumed / "tb").iterdir() if p.name not in tb_before]
    assert len(new_runs) == 1

    ref = _comparable(read_scalars(full / "tb"), [3, 4])
    tb = resumed / "tb_resumed_only"
    tb.mkdir()
    (tb / new_runs[0].name).symlink_to(new_runs[0])
    got = _comparable(read_scalars(tb), [3, 4])
    assert set(ref) == set(got) and "reward/mean" in got and "loss" in got
    for tag in ref:
        assert got[tag] == pytest.approx(ref[tag], rel=1e-6, abs=1e-7), tag
    a, b = _final_weights(full, 4), _final_weights(resumed, 4)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("nproc", "layout"),
    [
        (2, ("parallel.dp_shard=2",)),  # FSDP2
        (2, ("parallel.tp=2", "parallel.dp_shard=1")),  # tensor parallel
        (4, ("parallel.tp=2", "parallel.dp_shard=2")),  # the 2-D mesh
    ],
    ids=["fsdp2", "tp2", "fsdp2xtp2"],
)
def test_torchrun_ranks_match_one_process(tmp_path, policy_dir, nproc, layout):
    """The parallel run also takes the efficient update (micro-batches by a small token
    budget, one gradient sync per mini-batch), the single process the plain one (fixed rows,
    sync every micro-batch): same loss and weights."""
    common = ("generation.backend=native", "max_steps=1", "checkpoint.every_n_steps=1")
    plain = ("ppo.max_tokens_per_micro_batch=null", "ppo.defer_grad_sync=false")
    efficient = ("ppo.max_tokens_per_micro_batch=100", "ppo.defer_grad_sync=true")
    single, multi = tmp_path / "single", tmp_path / "multi"
    _tune_run(tmp_path, _args(single, policy_dir, *common, *plain))
    _tune_run(tmp_path, _args(multi, policy_dir, *common, *layout, *efficient), nproc=nproc)
    a, b = read_scalars(single / "tb"), read_scalars(multi / "tb")
    for tag in ("loss", "reward/mean", "policy/logprob_rank1_all", "policy/entropy_gated",
                "grad_norm_mean"):  # fmt: skip
        assert b[tag][1] == pytest.approx(a[tag][1], rel=1e-4, abs=1e-6), tag
    wa, wb = _final_weights(single, 1), _final_weights(multi, 1)
    assert wa.keys() == wb.keys()
    for k in wa:
        _assert_same_step(wb[k], wa[k], k)


def test_two_node_launch_matches_one_process(tmp_path, policy_dir):
    """Two torchrun agents (`--nnodes 2 --nproc_per_node 1`) meeting through c10d rendezvous on
    127.0.0.1, as on two machines, train a step with the one-process result."""
    common = ("generation.backend=native", "max_steps=1", "checkpoint.every_n_steps=1")
    single, multi = tmp_path / "single", tmp_path / "multi"
    _tune_run(tmp_path, _args(single, policy_dir, *common))
    args = _args(multi, policy_dir, *common, "parallel.dp_shard=2")
    run_torchrun(1, "simko_recipe", args, nnodes=2, launcher=TUNE_RUN, cwd=tmp_path)
    wa, wb = _final_weights(single, 1), _final_weights(multi, 1)
    for k in wa:
        _assert_same_step(wb[k], wa[k], k)


def test_llama3_2_config_trains_on_two_fsdp2_ranks(tmp_path, shared_data):
    """The shipped llama3_2_3b config, shrunk to a tiny Llama 3.2 with Meta's real tokenizer:
    the official runs' ChatML prompt as Llama text, the LLAMA3_2 checkpointer, FSDP2 on two
    ranks, publication and reload (the generator's log-probs equal the trainer's after an
    update), HF export."""
    from transformers import AutoModelForCausalLM

    from simko_tune.demo.tiny import build_tiny_llama3

    tiktoken_file = shared_data / "tokenizers" / "llama3" / "tokenizer.model"
    # weights large enough that the logits are far from uniform: a wrong publication shows
    model_dir = build_tiny_llama3(tmp_path / "llama", tiktoken_file, init_std=0.3)
    out = tmp_path / "out"
    _tune_run(
        tmp_path,
        ["--config", "llama3_2_3b", f"output_dir={out}", f"model_dir={model_dir}", "device=cpu",
         "model._component_=simko_tune.models.model_from_hf_config", f"model.model_dir={model_dir}",
         "checkpointer.checkpoint_files=[model.safetensors]", f"generation.sync_dir={out}/sync",
         "generation.backend=native", "generation.num_workers=1", "generation.devices=null",
         "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
         "rollout.max_response_tokens=8",
         "ppo.mini_batch_prompts=1", "ppo.micro_batch_size=4",
         "loss.compile=false", "loss.entropy_coef=0.01", "optimizer.lr=1e-3",
         "parallel.dp_shard=2", "parallel.compile_model=false", "parallel.mixed_precision=null",
         "rewards.num_workers=1", "max_steps=2", "checkpoint.every_n_steps=2",
         "eval.every_n_steps=0", "eval.before_training=false"],
        nproc=2,
    )  # fmt: skip
    scalars = read_scalars(out / "tb")
    assert scalars["weight_version"] == {1: 1.0, 2: 2.0}
    # step 2 samples from the published step-1 updates: same weights as the trainer's (two
    # mini-batches per step, so the old-log-prob pass that measures this runs)
    assert scalars["logprob_mismatch/mean_abs"][2] < 1e-4

    hf_dir = out / "checkpoints" / "step_00000002" / "hf"
    exported = _load_hf_weights(hf_dir)
    assert "lm_head.weight" not in exported  # tied, as in Llama 3.2
    initial = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(exported[k], initial[k]) for k in initial), "weights never changed"
    assert (hf_dir / "original" / "tokenizer.model").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    for name, param in model.state_dict().items():
        if name in exported:
            assert torch.equal(param, exported[name])


KL_RUN = ("optimizer.lr=1e-2", "lr_scheduler=null")  # a step that moves the policy visibly
MODE_RUNS = {
    "simko_kl_k3": ("loss.kl_coef=0.1", "loss.kl_type=k3", *KL_RUN),
    "grpo_entropy_kl_k2": (
        "loss.mode=grpo", "loss.entropy_coef=0.01", "loss.kl_coef=0.1", "loss.kl_type=k2",
        *KL_RUN,
    ),
    "dr_grpo": ("loss.mode=dr_grpo", "loss.agg=seq_mean_token_sum_norm"),
    "psr": ("loss.mode=psr",),
    "nsr": ("loss.mode=nsr",),
    "w_reinforce_kl_k1": (
        "loss.mode=w_reinforce", "loss.positive_weight=0.5", "loss.kl_coef=0.05",
        "loss.kl_type=k1", *KL_RUN,
    ),
    "forking_only": ("loss.mode=forking_only",),
}  # fmt: skip


@pytest.mark.parametrize("name", MODE_RUNS)
def test_every_mode_trains_through_tune_run(tmp_path, policy_dir, name):
    """Each mode the paper compares, through the real CLI for two steps: the weights move,
    the KL to the frozen reference is 0 before the first update and positive after it,
    and PSR / NSR train on their kept responses only."""
    out = tmp_path / "out"
    # one update per step: step 1's KL is measured before any update
    steps = (
        "generation.backend=native", "max_steps=2", "checkpoint.every_n_steps=2",
        "ppo.mini_batch_prompts=4",
    )  # fmt: skip
    _tune_run(tmp_path, _args(out, policy_dir, *steps, *MODE_RUNS[name]))
    scalars = read_scalars(out / "tb")
    assert set(scalars["loss"]) == {1, 2}
    assert all(math.isfinite(v) for v in scalars["loss"].values())
    rows = 4 * 8  # rollout.prompts_per_step x samples_per_prompt
    if "kl" in name:
        assert abs(scalars["kl_ref"][1]) < 1e-7  # the reference is the initial policy
        # and stays there while the policy moves (k2, k3 are second order in the log-ratio:
        # small but positive; k1's sample mean may have either sign)
        assert abs(scalars["kl_ref"][2]) > 1e-8
        assert "k1" in name or scalars["kl_ref"][2] > 0
    else:
        assert "kl_ref" not in scalars  # no reference model built
    for step in (1, 2):
        correct = round(scalars["reward/mean"][step] * rows)
        kept = {"psr": correct, "nsr": rows - correct}.get(name, rows)
        assert scalars["kept_responses"][step] == (kept or rows)
    initial = load_file(policy_dir / "model.safetensors")
    final = _final_weights(out, 2)
    assert any(not torch.equal(final[k], initial[k]) for k in initial), "weights never changed"
