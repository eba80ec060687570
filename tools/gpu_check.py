"""GPU check: four independent parts, each in its own process with its own time limit, then
ONE JSON line with every part's figures or error.

    bash tools/gpu_check.sh                  # on the GPU machine: wheels, then this script
    python3 tools/gpu_check.py [--parts a,b,c] [--device cuda] [--out-dir DIR] ...

- (a) ``simko_recipe`` end to end for 3 steps (torchrun, one rank, ``-m simko_recipe``, as
  ``tune run --nproc_per_node 1`` starts it): a small random Qwen2-shaped model written here,
  the native generator, bf16 mixed precision (FSDP2), compiled blocks and loss, one
  checkpoint. Step times are read back from the run's TensorBoard files.
- (b) one training step of a Qwen2.5-1.5B-shaped random model: bf16, FSDP2 on one device,
  activation checkpointing, compiled blocks and loss; tokens/s, peak memory and MFU.
- (c) the chunked policy loss against the plain full-logits formulation
  (``tools/bench_loss.py``'s) at N = 16,384 tokens, V = 151,936: time and peak-memory ratios.
- (d) learning on the device: the CPU default's warm-started Countdown policy (``--d-model-dir``,
  built on a CPU and carried; built here if missing) trained with SimKO for ``--d-steps``
  steps on ``--device`` with the native generator, held-out pass@1 evaluated before and
  after; beside it, at the same time, the same run on the CPU for ``--d-cpu-seeds`` seeds.
  Reported: the reward curve, pass@1 before → after, and the gap between the device's
  reward curve and the CPU seeds' mean against their seed-to-seed spread.

A part that fails, crashes or runs out of time records its error; the others still run.
Small shapes and ``--device cpu`` run every part here (tests/tools/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, installed or not (the GPU machine)
from simko_tune.fs import atomic_write  # noqa: E402
from simko_tune.model_shapes import QWEN2_5_SHAPES  # noqa: E402

PARTS = ("a", "b", "c", "d")
C_SEQ_LEN = 256  # part (c): its tokens come as rows of this many
H200_BF16_DENSE_TFLOPS = 989.0  # H100/H200 SXM bf16 dense peak (NVIDIA's datasheet, no sparsity)
# Qwen2.5-1.5B's shape (torchtune qwen2_5_1_5b_base) and a tiny one for CPU tests.
MODEL_SHAPES = {
    "1.5b": dict(
        vocab_size=151_936, **QWEN2_5_SHAPES["1.5b"], max_seq_len=32_768, norm_eps=1e-6,
        rope_base=1_000_000.0, tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        intermediate_dim=128, max_seq_len=512, norm_eps=1e-6, rope_base=1_000_000.0,
        tie_word_embeddings=True,
    ),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to rehearse on a CPU")
    ap.add_argument("--out-dir", default="outputs/gpu_check", help="logs, runs, part results")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock limit, all parts")
    ap.add_argument("--timeout-a", type=float, default=120.0)
    ap.add_argument("--timeout-b", type=float, default=120.0)
    ap.add_argument("--timeout-c", type=float, default=60.0)
    ap.add_argument("--timeout-d", type=float, default=120.0)
    ap.add_argument("--no-compile", action="store_true", help="eager blocks and loss (debugging)")
    # (a) the recipe end to end
    ap.add_argument("--a-steps", type=int, default=3)
    ap.add_argument("--a-width", type=int, default=256, help="embed dim of the small model")
    # (b) one training step
    ap.add_argument("--b-model", choices=sorted(MODEL_SHAPES), default="1.5b")
    ap.add_argument("--b-batch", type=int, default=8)
    ap.add_argument("--b-seq", type=int, default=4096)
    ap.add_argument("--b-warmup", type=int, default=2, help="untimed steps (compilation)")
    ap.add_argument("--b-steps", type=int, default=3, help="timed steps (mean reported)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    # (c) the loss alone
    ap.add_argument("--c-tokens", type=int, default=16_384)
    ap.add_argument("--c-vocab", type=int, default=151_936)
    ap.add_argument("--c-dim", type=int, default=3584, help="hidden size (Qwen2.5-7B's)")
    ap.add_argument("--c-chunk", type=int, default=2048)
    ap.add_argument("--c-repeats", type=int, default=2)
    # (d) learning
    ap.add_argument(
        "--d-model-dir", default=".gpu_check/tiny_cpu_policy",
        help="the warm-started tiny policy (carried; built here when missing)",
    )  # fmt: skip
    ap.add_argument("--d-steps", type=int, default=40)
    ap.add_argument("--d-prompts", type=int, default=32, help="prompts per step")
    ap.add_argument("--d-eval-problems", type=int, default=None, help="default: the test split")
    ap.add_argument("--d-eval-n", type=int, default=8, help="samples per held-out problem")
    ap.add_argument("--d-cpu-seeds", type=int, default=3, help="CPU runs beside the device's")
    ap.add_argument("--d-cpu-threads", type=int, default=4, help="threads of each CPU run")
    ap.add_argument(
        "--d-expect-learning", action=argparse.BooleanOptionalAction, default=True,
        help="fail part (d) unless reward and pass@1 rise (off for few-step rehearsals)",
    )  # fmt: skip
    ap.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        ap.error(f"--parts: {args.parts!r}; expected a comma-separated subset of a,b,c,d")
    args.parts = parts
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        ap.error(f"--device: {args.device!r}; expected cuda, cuda:N or cpu")
    return args


# ---------------------------------------------------------------------------- the parent
def child_env(out_dir: Path) -> dict[str, str]:
    """The children find this checkout (``simko_tune``, ``simko_recipe``) whether or not it
    is installed, and keep compiler caches in the output folder."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "recipes"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(out_dir / "inductor_cache"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_part(part: str, argv: list[str], out_dir: Path, timeout_s: float) -> dict:
    """Run one part in a fresh process group; its result file, or its error and log tail."""
    result_file = out_dir / f"part_{part}.json"
    log_file = out_dir / f"part_{part}.log"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", part]
    started = time.monotonic()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(out_dir), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a timeout kills the part's whole tree (torchrun ranks)
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    wall = round(time.monotonic() - started, 1)
    if result_file.is_file():
        result = json.loads(result_file.read_text())
    else:
        tail = log_file.read_text(errors="replace")[-2500:]
        reason = f"timed out after {timeout_s:.0f} s" if rc is None else f"exit code {rc}"
        result = {"ok": False, "error": f"{reason}, no result; log tail:\n{tail}"}
    result["wall_s"] = wall
    return result


def environment(device: str) -> dict:
    import importlib.metadata

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("torchtune", "torchao", "omegaconf", "datasets"):
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = None
    env["datasets_stub"] = os.environ.get("GPU_CHECK_DATASETS_STUB") == "1"
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(device=props.name, device_memory_gib=round(props.total_memory / 2**30, 1))
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = device if device == "cpu" else f"{device} (not available)"
    return env


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return run_worker(args, out_dir)

    started = time.monotonic()
    report: dict = {"check": "gpu_check", "parts": {}}
    try:
        report["env"] = environment(args.device)
    except Exception as e:  # torch itself broken: the parts will say more
        report["env"] = {"error": repr(e)}
    for part in args.parts:
        left = args.budget_s - (time.monotonic() - started)
        timeout = min(getattr(args, f"timeout_{part}"), left)
        if timeout < 1:
            report["parts"][part] = {"ok": False, "error": "skipped: the time budget is spent"}
            continue
        print(f"gpu_check: part {part} (limit {timeout:.0f} s) ...", file=sys.stderr, flush=True)
        report["parts"][part] = run_part(part, argv, out_dir, timeout)
        status = "ok" if report["parts"][part].get("ok") else "FAILED"
        print(f"gpu_check: part {part} {status}", file=sys.stderr, flush=True)
    report["ok"] = all(r.get("ok") for r in report["parts"].values())
    report["wall_s"] = round(time.monotonic() - started, 1)
    line = json.dumps(report)
    atomic_write(out_dir / "gpu_check.json", line + "\n", fsync=False)
    print(line)
    return report


def run_worker(args: argparse.Namespace, out_dir: Path) -> dict:
    """One part in this process: its figures (or error) to ``part_<x>.json``, written by
    rename so that the parent never reads half a file."""
    fn = {"a": part_a_recipe, "b": part_b_train_step, "c": part_c_loss, "d": part_d_learning}[
        args.worker
    ]
    try:
        result = {"ok": True, **fn(args, out_dir / f"part_{args.worker}")}
    except Exception as e:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"[-2500:]}
    atomic_write(out_dir / f"part_{args.worker}.json", json.dumps(result), fsync=False)
    return result


# ---------------------------------------------------------------------------- shared pieces
def materialize(model, device) -> None:
    """Allocate a meta-built (possibly sharded) model on ``device`` with random weights.

    ``to_empty`` leaves buffers uninitialised, so the RoPE caches are rebuilt, and under
    ``torch.device(device)``: ``rope_init`` creates its tensors on the default device, which
    would put them on the CPU next to parameters on the GPU."""
    import torch

    device = torch.device(device)
    model.to_empty(device=device)
    with torch.no_grad(), device:
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()


def resolve_device(name: str):
    """``torch.device(name)`` with an index for CUDA: ``torch.cuda.set_device`` rejects a
    bare ``cuda``."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    return device


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _init_single_rank(device) -> None:
    """A one-rank process group (FSDP2 needs one) without torchrun."""
    from simko_tune.paths import free_port

    local_rank = str(device.index or 0)  # init_distributed selects the CUDA device by it
    os.environ.update(RANK="0", LOCAL_RANK=local_rank, WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from simko_tune.parallel import init_distributed

    init_distributed("nccl" if device.type == "cuda" else "gloo")


# ---------------------------------------------------------------------------- (a) the recipe
def build_small_model(out: Path, width: int) -> Path:
    """A random Qwen2-shaped model with a Countdown tokenizer, as an HF directory."""
    from simko_tune.demo.countdown import STOP_TOKEN, make_countdown_problems
    from simko_tune.demo.tiny import TinyQwen2Dims, build_tiny_qwen2, train_tokenizer

    corpus = [p.problem + p.answer + STOP_TOKEN for p in make_countdown_problems(300, 0, "train")]
    tok_dir = train_tokenizer(corpus, out / "tokenizer", vocab_size=320)
    dims = TinyQwen2Dims(
        num_layers=2, num_heads=width // 64, num_kv_heads=max(width // 128, 1), embed_dim=width,
        intermediate_dim=2 * width, max_seq_len=128,
    )  # fmt: skip
    return build_tiny_qwen2(tok_dir, out / "model", dims)


def torchrun_recipe(overrides: list[str]) -> list[str]:
    """``torchrun -m simko_recipe`` on one rank (what ``tune run --nproc_per_node 1
    simko_recipe`` runs, without the ``tune`` CLI, whose module imports need kagglehub) on
    the CPU default's config with ``overrides``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "simko_recipe", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), *overrides,
    ]  # fmt: skip


def recipe_command(args: argparse.Namespace, model_dir: Path, run_dir: Path) -> list[str]:
    """``torchrun -m simko_recipe`` (what ``tune run --nproc_per_node 1 simko_recipe`` runs,
    without the ``tune`` CLI, whose module imports need kagglehub) on the CPU default's
    config with the GPU settings."""
    compile_ = "false" if args.no_compile else "true"
    overrides = [
        f"device={args.device}", f"output_dir={run_dir}", f"model_dir={model_dir}",
        "prepare_model=null", f"max_steps={args.a_steps}",
        f"checkpoint.every_n_steps={args.a_steps}", "checkpoint.keep_last=1",
        "eval.every_n_steps=0", "eval.before_training=false", "generation.backend=native",
        "generation.weight_transfer=files", f"generation.sync_dir={run_dir}/sync",
        "parallel.mixed_precision=bf16",
        f"parallel.compile_model={compile_}", "parallel.activation_checkpointing=true",
        f"loss.compile={compile_}", "rollout.prompts_per_step=4", "ppo.mini_batch_prompts=2",
        "ppo.micro_batch_size=8", "dataset.n=64", "rewards.num_workers=1",
        "log.samples_every_n_steps=0",
    ]  # fmt: skip
    return torchrun_recipe(overrides)


def read_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard folder: {tag: {step: value}} (v2 tensor summaries too)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    out: dict[str, dict[int, float]] = {}
    for run in sorted(p for p in tb_dir.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            for ev in acc.Tensors(tag):
                value = tensor_util.make_ndarray(ev.tensor_proto)
                if value.dtype.kind in "fiu" and value.size == 1:
                    out.setdefault(tag, {})[ev.step] = float(value)
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                out.setdefault(tag, {})[ev.step] = ev.value
    return out


def part_a_recipe(args: argparse.Namespace, work: Path) -> dict:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    model_dir = build_small_model(work, args.a_width)
    run_dir = work / "run"
    cmd = recipe_command(args, model_dir, run_dir)
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
    print(proc.stdout[-20000:], proc.stderr[-20000:], sep="\n", flush=True)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if re.search(r"Error|error:", ln)]
        raise RuntimeError(
            f"the recipe exited with {proc.returncode}: "
            + (errors[-1] if errors else proc.stderr[-1500:])
        )
    scalars = read_scalars(run_dir / "tb")
    steps = sorted(scalars.get("time/step", {}))
    checkpoint = run_dir / "checkpoints" / f"step_{args.a_steps:08d}"
    if steps != list(range(1, args.a_steps + 1)):
        raise RuntimeError(f"TensorBoard has steps {steps}, expected 1..{args.a_steps}")
    if not (checkpoint / "hf").is_dir():
        raise RuntimeError(f"no checkpoint with an HF export at {checkpoint}")

    def per_step(tag: str) -> list[float]:
        return [round(scalars[tag][s], 4) for s in steps]

    return {
        "steps": len(steps),
        "step_s": per_step("time/step"),
        "update_s": per_step("time/update"),
        "generate_s": per_step("time/generate"),
        "loss": per_step("loss"),
        "peak_mem_gib": max(per_step("memory/peak_gib")),
        "checkpoint": checkpoint.name,
        "settings": "native generator, bf16 FSDP2 (1 rank), compiled blocks + loss, AC"
        + (" (compile off)" if args.no_compile else ""),
    }


# ---------------------------------------------------------------------------- (b) train step
def flops_per_token(shape: dict, matmul_params: int, seq: int) -> int:
    """6·N + 12·L·d·s per token of a row of ``seq`` tokens: the recipe's own count
    (``simko_tune.metrics.throughput.training_flops``), d = heads × head_dim."""
    import torch

    from simko_tune.metrics.throughput import training_flops

    flops = training_flops(
        torch.tensor([seq]), matmul_params, shape["num_layers"], shape["embed_dim"]
    )
    return round(flops / seq)


def planned_memory(model, args: argparse.Namespace, device):
    """``dry_run``'s memory plan for part (b)'s setting: one rank, bf16 FSDP2, AC, AdamW,
    one micro-batch of ``b_batch`` rows of ``b_seq`` tokens, each row one loss chunk."""
    from omegaconf import OmegaConf

    from simko_tune.memory_plan import ModelShape, estimate_memory

    cfg = OmegaConf.create(
        {
            "device": str(device),
            "device_memory_gib": None,
            "parallel": {"mixed_precision": "bf16", "activation_checkpointing": True},
            "rollout": {"max_prompt_tokens": 0, "max_response_tokens": args.b_seq},
            "ppo": {"micro_batch_size": args.b_batch},
            "loss": {"chunk_size": 2048},
            "generation": {"backend": "vllm", "engine_kwargs": {"dtype": "bfloat16"}},
            "optimizer": {"_component_": "torch.optim.AdamW"},
        }
    )
    return estimate_memory(ModelShape.from_model(model), cfg, dp=1, tp=1)


def part_b_train_step(args: argparse.Namespace, work: Path) -> dict:
    import torch
    import torch.distributed as dist
    from torchtune.models.qwen2 import qwen2

    from simko_tune.loss import LossConfig, policy_loss
    from simko_tune.parallel import (
        ParallelDims,
        clip_grad_norm_,
        full_output_weight,
        hidden_states,
        parallelize_model,
    )

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_single_rank(device)
    mesh = ParallelDims().build_mesh(device.type)
    shape = MODEL_SHAPES[args.b_model]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = qwen2(**shape)
    n_params = sum(p.numel() for p in model.parameters())
    plan = planned_memory(model, args, device)
    # the embedding lookup is no matmul; a tied table does one, as the output projection
    table = shape["vocab_size"] * shape["embed_dim"]
    matmul_params = n_params if shape["tie_word_embeddings"] else n_params - table
    model = parallelize_model(
        model, mesh, model_family="qwen2", activation_checkpointing=True,
        compile_blocks=not args.no_compile, mixed_precision="bf16",
    )  # fmt: skip
    materialize(model, device)
    # fused, as the GPU configs: on the CPU too, so that the rehearsal takes the same path
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, fused=True)
    cfg = LossConfig(mode="simko", chunk_size=2048, compile=not args.no_compile)

    b, s, vocab = args.b_batch, args.b_seq, shape["vocab_size"]
    tokens = torch.randint(0, vocab, (b, s), device=device)
    targets = torch.roll(tokens, -1, 1)
    mask = torch.ones(b, s, dtype=torch.bool, device=device)  # every token a loss token
    old = torch.full((b, s), -2.0, device=device)
    rewards = (torch.arange(b, device=device) % 2).float()
    adv, correct = rewards - rewards.mean(), rewards > 0

    def step() -> float:
        hidden = hidden_states(model, tokens)
        loss, _ = policy_loss(
            hidden, full_output_weight(model), targets, old, adv, mask, correct, cfg,
            normalizer=float(b * s),
        )  # fmt: skip
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(args.b_warmup):
        step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.b_steps):
        t0 = time.perf_counter()
        losses.append(step())  # float(loss) waits for the device
        _synchronize(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.mean(times)
    tok_s = b * s / step_s
    fpt = flops_per_token(shape, matmul_params, s)
    peak = args.peak_tflops * 1e12
    out = {
        "model": f"qwen2.5-{args.b_model}-shape (random weights)",
        "params": n_params,
        "matmul_params": matmul_params,
        "batch": b,
        "seq": s,
        "tokens_per_step": b * s,
        "step_s": round(step_s, 6),  # tokens_per_s is derived from it: keep 6 places
        "tokens_per_s": round(tok_s, 1),
        "flops_per_token": fpt,
        "flops_formula": "6*N + 12*L*d*s per token; N = matmul_params (tied table counted "
        "once, as the output projection), L layers, d = heads*head_dim, s = seq; model "
        "FLOPs only: activation-checkpoint recompute and the loss's extra top-k work not "
        "counted; every token is a loss token",
        "peak_tflops": args.peak_tflops,
        "peak_source": "bf16 dense, H100/H200 SXM datasheet",
        "mfu": round(fpt * tok_s / peak, 4),
        "hfu_with_recompute": round((fpt + 2 * matmul_params) * tok_s / peak, 4),
        "loss": losses[-1],
        "settings": "bf16 FSDP2 (1 rank), activation checkpointing, "
        + ("eager" if args.no_compile else "compiled blocks + loss"),
    }
    out["memory_plan_gib"] = round(plan.total / 2**30, 3)  # dry_run's estimate, same setting
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        out["peak_over_plan"] = round(out["peak_mem_gib"] / out["memory_plan_gib"], 3)
    dist.destroy_process_group()
    return out


# ---------------------------------------------------------------------------- (c) the loss
def part_c_loss(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from simko_tune.loss import LossConfig, group_advantages, policy_loss, token_logprobs
    from simko_tune.loss_reference import reference_policy_loss

    if args.c_tokens % C_SEQ_LEN:
        raise ValueError(f"--c-tokens must be a multiple of {C_SEQ_LEN}")
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    batch, n, vocab, dim = args.c_tokens // C_SEQ_LEN, args.c_tokens, args.c_vocab, args.c_dim
    hidden = torch.randn(batch, C_SEQ_LEN, dim, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device, dtype=dtype) * 0.05).requires_grad_()
    targets = torch.randint(0, vocab, (batch, C_SEQ_LEN), device=device)
    old = token_logprobs(hidden, weight, targets) + 0.05 * torch.randn(
        batch, C_SEQ_LEN, device=device
    )
    rewards = (torch.arange(batch, device=device) % 2).float()
    adv = group_advantages(rewards, min(4, batch))
    mask = torch.ones(batch, C_SEQ_LEN, dtype=torch.bool, device=device)
    correct = rewards == 1
    cfg = LossConfig(mode="simko", chunk_size=args.c_chunk, compile=not args.no_compile)

    def step(impl: str) -> None:
        if impl == "full":
            loss = reference_policy_loss(hidden, weight, targets, old, adv, mask, correct, cfg)
        else:
            loss, _ = policy_loss(hidden, weight, targets, old, adv, mask, correct, cfg)
        loss.backward()
        hidden.grad = weight.grad = None

    def measure(impl: str) -> dict:
        step(impl)  # warm-up: compilation, allocator
        _synchronize(device)
        peak = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(impl)
            _synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        times = []
        for _ in range(args.c_repeats):
            t0 = time.perf_counter()
            step(impl)
            _synchronize(device)
            times.append(time.perf_counter() - t0)
        return {"time_s": round(statistics.median(times), 4), "peak_mib": peak and round(peak, 1)}

    res = {impl: measure(impl) for impl in ("chunked", "full")}
    ratio_peak = None
    if res["full"]["peak_mib"]:
        ratio_peak = round(res["chunked"]["peak_mib"] / res["full"]["peak_mib"], 4)
    return {
        "tokens": n,
        "vocab": vocab,
        "dim": dim,
        "dtype": str(dtype).removeprefix("torch."),
        "chunk_size": args.c_chunk,
        "chunked": res["chunked"],
        "full_logits": res["full"],
        "time_chunked_over_full": round(res["chunked"]["time_s"] / res["full"]["time_s"], 4),
        "peak_chunked_over_full": ratio_peak,
        "peak_measure": "torch.cuda.max_memory_allocated during one forward+backward, above "
        "the inputs' allocation"
        if device.type == "cuda"
        else "CUDA only",
    }


# ---------------------------------------------------------------------------- (d) learning
def learning_command(
    args: argparse.Namespace, model_dir: Path, run_dir: Path, device: str, seed: int
) -> list[str]:
    """The CPU default's SimKO run on ``device``: the native generator with in-memory
    weights, fp32 as on the CPU, held-out pass@1 before the first step and after the last."""
    eval_n = "null" if args.d_eval_problems is None else str(args.d_eval_problems)
    overrides = [
        f"device={device}", f"output_dir={run_dir}", f"model_dir={model_dir}",
        "prepare_model=null", f"seed={seed}", f"max_steps={args.d_steps}",
        f"rollout.prompts_per_step={args.d_prompts}",
        f"ppo.mini_batch_prompts={max(args.d_prompts // 2, 1)}",
        "checkpoint.every_n_steps=0", f"eval.every_n_steps={args.d_steps}",
        "eval.before_training=true", f"eval.n={args.d_eval_n}",
        f"eval.sets.countdown_test.n={eval_n}", "generation.backend=native",
        "generation.weight_transfer=memory", "rewards.num_workers=1",
        "log.samples_every_n_steps=0",
    ]  # fmt: skip
    return torchrun_recipe(overrides)


def _window_means(values: list[float], windows: int) -> list[float]:
    size = max(len(values) // windows, 1)
    return [statistics.fmean(values[i : i + size]) for i in range(0, size * windows, size)]


def compare_curves(device_curve: list[float], cpu_curves: list[list[float]], windows: int = 4):
    """The device's reward curve against the CPU seeds', in ``windows`` consecutive windows
    of steps (a step's reward is noisy: window means are what can agree): the gap between
    the device's window mean and the CPU seeds' mean, against the CPU seeds' sample std."""
    dev = _window_means(device_curve, windows)
    cpu = [_window_means(c, windows) for c in cpu_curves]
    mean = [statistics.fmean(col) for col in zip(*cpu)]
    spread = [statistics.stdev(col) if len(col) > 1 else float("nan") for col in zip(*cpu)]
    gaps = [abs(d - m) for d, m in zip(dev, mean)]
    return {
        "device_window_means": [round(v, 4) for v in dev],
        "cpu_window_means": [round(v, 4) for v in mean],
        "cpu_window_std": [round(v, 4) for v in spread],
        "gap": [round(v, 4) for v in gaps],
        "gap_over_cpu_std": [round(g / s, 2) if s > 0 else None for g, s in zip(gaps, spread)],
        "within_2_cpu_std": all(g <= 2 * s for g, s in zip(gaps, spread) if s == s),
    }


def part_d_learning(args: argparse.Namespace, work: Path) -> dict:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = Path(args.d_model_dir)
    model_dir = model_dir if model_dir.is_absolute() else ROOT / model_dir
    built_here = not (model_dir / "warm_start.json").is_file()
    if built_here:
        from simko_tune.demo.warm_start import ensure_tiny_policy

        model_dir = ensure_tiny_policy(work / "tiny_cpu_policy")
    runs = {"device": (args.device, 0)}
    runs.update({f"cpu_seed{s}": ("cpu", s) for s in range(args.d_cpu_seeds)})
    procs = {}
    for name, (device, seed) in runs.items():
        env = child_env(work)
        if device == "cpu":
            env["OMP_NUM_THREADS"] = str(args.d_cpu_threads)
        log = open(work / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        cmd = learning_command(args, model_dir, work / name, device, seed)
        procs[name] = (subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=log), log)
    failed = []
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            failed.append(name)
        log.close()
    if failed:
        tail = (work / f"{failed[0]}.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"runs {failed} failed; {failed[0]}'s log tail:\n{tail}")

    def curves(name: str) -> tuple[list[float], dict[int, float]]:
        scalars = read_scalars(work / name / "tb")
        reward = [scalars["reward/mean"][s] for s in sorted(scalars["reward/mean"])]
        if len(reward) != args.d_steps:
            raise RuntimeError(f"{name}: {len(reward)} steps logged, not {args.d_steps}")
        return reward, scalars["eval/countdown_test/pass@1"]

    device_reward, device_pass1 = curves("device")
    cpu = [curves(n) for n in runs if n != "device"]
    quarter = max(args.d_steps // 4, 1)
    early, late = (
        statistics.fmean(device_reward[:quarter]),
        statistics.fmean(device_reward[-quarter:]),
    )
    before, after = device_pass1[0], device_pass1[args.d_steps]
    cpu_after = [p[args.d_steps] for _, p in cpu]
    result = {
        "policy": "tiny_cpu's warm-started Countdown policy"
        + (" (built here)" if built_here else " (carried)"),
        "steps": args.d_steps,
        "reward": [round(r, 4) for r in device_reward],
        "reward_first_quarter": round(early, 4),
        "reward_last_quarter": round(late, 4),
        "pass1_before": round(before, 4),
        "pass1_after": round(after, 4),
        "reward_rises": late > early,
        "pass1_rises": after > before,
        "cpu_seeds": args.d_cpu_seeds,
        "cpu_pass1_after": [round(p, 4) for p in cpu_after],
        "settings": f"SimKO (tiny_cpu's loss), {args.d_prompts} prompts x 8 samples, fp32, "
        f"native generator; pass@1 over {args.d_eval_n} samples per held-out problem",
    }
    if cpu:
        result["vs_cpu"] = compare_curves(device_reward, [r for r, _ in cpu])
    if args.d_expect_learning and not (result["reward_rises"] and result["pass1_rises"]):
        raise RuntimeError(f"no learning on {args.device}: {json.dumps(result)}")
    return result


if __name__ == "__main__":
    main()
