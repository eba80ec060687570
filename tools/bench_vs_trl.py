"""Step time side by side: simko-tune's recipe against Hugging Face TRL 1.16's GRPOTrainer.

Both trainers get the same Hugging Face model directory, the same Countdown prompts (the
``plain`` template; token ids checked equal), the same reward function, and the same batch:
4 prompts x 8 samples, at most 32 new tokens, temperature 1, top-p 1, GRPO (ratio clip 0.2,
each response's token mean, then the mean over responses), no KL, fp32, AdamW (lr 1e-3,
weight decay 0.01, constant), gradient clipping at 1.0, one optimizer step per rollout.
Both run as a user starts them, in this tool's environment with no thread variable added:
torch's own default for TRL, the recipe's rule for ours (every core of the affinity mask;
a vLLM worker is bound to the same cores at staleness 0, and at staleness 1, when both run
at once, the recipe gives each half of them).

What one step contains:
- TRL (``pip install -e .[trl]``): ``model.generate`` of 32 completions (transformers, no
  vLLM), the reward, one forward + backward over the 32 completions (its old log-probs are
  the current ones, detached: ``num_iterations=1``; no reference model: ``beta=0``) and one
  AdamW step. Its defaults that would skew a CPU timing are set explicitly: ``bf16=False``,
  ``gradient_checkpointing=False``, ``loss_type="grpo"`` (not ``dapo``), a constant lr (not
  linear decay); ``optim`` both ``adamw_torch`` (TRL's default: on CPU a per-tensor loop of
  element-wise ops) and ``adamw_torch_fused`` (the fused kernel ours uses).
- simko-tune as users get it (``native``: ``tune run simko_recipe --config tiny_cpu`` with
  the overrides below, nothing else): generate in the trainer's process with torchtune's KV
  cache (tiny_cpu's ``generation.backend=native``), score in the verifier process pool,
  forward + backward + fused AdamW (tiny_cpu's ``optimizer.fused``; no old-log-prob pass:
  with one optimizer step per rollout the old, and at staleness 1 the proximal, log-probs
  are the update's own forward, detached), then hand the weights to the generator as an
  in-memory copy (``generation.weight_transfer=memory``): no worker process, no files; what
  TRL's ``model.generate`` does, too. With ``rollout.max_staleness=1`` a thread generates
  and scores the next step's rollout while this one updates.
- simko-tune with a vLLM worker (``vllm``: ``generation.backend=vllm
  generation.weight_transfer=files``, as every real-model config runs): the same, but
  generating in a vLLM worker process, and the weights published as safetensors files
  that the worker reloads before the next generation. At staleness 1 the next step's
  delivery (the worker's reload), generation and scoring run while this one updates; the
  step then only writes the weights.
Per-step times are the recipe's ``time/step`` scalars (TensorBoard).

Runs alternate (TRL with its default optimizer and with the fused one, ours native at
staleness 0 and 1, with the vLLM worker at 0 and 1, then again per round), so load on the
shared machine hits all alike. Every step's time of every run is printed. Reported, at
steady state: the median of the second half of each run's steps (pooled over rounds), and
the ratios TRL / ours (> 1: ours is faster), against both TRL optimizers. Models: ``tiny``
is tiny_cpu's warm-started Countdown policy (2 layers, 0.4M parameters; built once under
~/.cache/simko_tune); ``0.5b`` is the Qwen2.5-0.5B shape (24
layers, d 896, 14 heads, 2 KV heads, MLP 4864) with random weights and a 1,000-token
vocabulary, so its completions run to the 32-token limit.

    python tools/bench_vs_trl.py                 # both models, both generators
    python tools/bench_vs_trl.py --models tiny   # only the tiny one
    python tools/bench_vs_trl.py --backends vllm # only the vLLM worker beside TRL

Prints the figures, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from simko_tune.metrics.tensorboard import read_scalars
from simko_tune.paths import work_dir

BATCH = {"prompts": 4, "samples": 8, "max_new_tokens": 32, "lr": 1e-3, "weight_decay": 0.01}
NUM_PROBLEMS = 64  # the prompt pool both trainers draw from
TRL_OPTIMS = {"trl": "adamw_torch", "trl_fused": "adamw_torch_fused"}  # TRL's default first


# ----------------------------------------------------------------------------- models


def tiny_policy() -> Path:
    from simko_tune.demo.warm_start import ensure_tiny_policy

    return ensure_tiny_policy(Path.home() / ".cache" / "simko_tune" / "tiny_cpu_policy")


def qwen2_5_0_5b_shape(root: Path, layers: int = 24) -> Path:
    """Qwen2.5-0.5B's shape (``layers`` of its 24 blocks), random weights, a 1,000-token
    byte-level BPE vocabulary trained on the Countdown prompts (Qwen2's pre-tokenizer, like
    tiny_cpu's)."""
    from simko_tune.demo.countdown import load_countdown
    from simko_tune.demo.tiny import TinyQwen2Dims, build_tiny_qwen2, train_tokenizer
    from simko_tune.model_shapes import QWEN2_5_SHAPES

    model = root / ("qwen2_5_0_5b_shape" + ("" if layers == 24 else f"_{layers}_layers"))
    if (model / "config.json").is_file():
        return model
    tok = root / "tokenizer_1000"
    if not (tok / "tokenizer.json").is_file():
        corpus = [f"{p.problem} {p.answer}" for p in load_countdown("train", seed=0)]
        tok = train_tokenizer(corpus, tok, vocab_size=1000)
    shape = {**QWEN2_5_SHAPES["0.5b"], "num_layers": layers}
    dims = TinyQwen2Dims(**shape, max_seq_len=512)
    return build_tiny_qwen2(tok, model, dims, seed=0)


def problems():
    from simko_tune.demo.countdown import load_countdown

    return load_countdown("train", n=NUM_PROBLEMS, seed=0)


# ----------------------------------------------------------------------------- TRL side


def trl_worker(model_dir: str, steps: int, out: str, optim: str) -> None:
    """One TRL run in this (fresh) process; prints ``{"step_s": [...]}`` as its last line."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from simko_tune.data import render_prompt
    from simko_tune.demo.countdown import countdown_reward

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    rows = [{"prompt": render_prompt("plain", p.problem), "gold": p.answer} for p in problems()]

    def reward(completions, gold, **_):
        return [countdown_reward(c, g) for c, g in zip(completions, gold)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.step_s = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.t0)

    config = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=BATCH["prompts"] * BATCH["samples"],  # counts completions
        num_generations=BATCH["samples"],
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=BATCH["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"eos_token_id": stop_ids},
        loss_type="grpo",
        beta=0.0,
        epsilon=0.2,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        learning_rate=BATCH["lr"],
        weight_decay=BATCH["weight_decay"],
        lr_scheduler_type="constant",
        optim=optim,
        max_grad_norm=1.0,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    print(json.dumps({"step_s": timer.step_s}))


def run_trl(model_dir: Path, steps: int, work: Path, optim: str) -> dict:
    cmd = [sys.executable, __file__, "--trl-worker", str(model_dir), str(steps), str(work), optim]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run failed:\n{proc.stderr[-4000:]}")
    return {"step_s": json.loads(proc.stdout.strip().splitlines()[-1])["step_s"]}


# ----------------------------------------------------------------------------- our side


def our_overrides(model_dir: Path, out: Path, steps: int, staleness: int) -> list[str]:
    return [
        f"output_dir={out}",
        f"model_dir={model_dir}",
        "prepare_model=null",
        f"max_steps={steps}",
        f"dataset.n={NUM_PROBLEMS}",
        f"rollout.prompts_per_step={BATCH['prompts']}",
        f"rollout.samples_per_prompt={BATCH['samples']}",
        f"rollout.max_response_tokens={BATCH['max_new_tokens']}",
        "rollout.max_prompt_tokens=64",
        f"rollout.max_staleness={staleness}",
        f"ppo.mini_batch_prompts={BATCH['prompts']}",
        f"ppo.micro_batch_size={BATCH['prompts'] * BATCH['samples']}",
        "loss.mode=grpo",
        "loss.agg=seq_mean_token_mean",  # TRL's loss_type="grpo"
        f"optimizer.lr={BATCH['lr']}",
        f"optimizer.weight_decay={BATCH['weight_decay']}",
        "lr_scheduler=null",  # constant
        "eval.every_n_steps=0",
        "eval.before_training=false",
        f"checkpoint.every_n_steps={steps + 1}",  # only the final save, after the last step
        "log.samples_every_n_steps=0",
    ]


# How each of our generators is selected: tiny_cpu's own setting (the in-process generator,
# weights handed over in memory) needs no override; the vLLM worker reads published files.
BACKENDS = {
    "native": [],
    "vllm": ["generation.backend=vllm", "generation.weight_transfer=files"],
}


def run_ours(model_dir: Path, steps: int, staleness: int, work: Path, backend: str) -> dict:
    out = work / f"{backend}_s{staleness}_{time.monotonic_ns()}"
    cmd = ["tune", "run", "simko_recipe", "--config", "tiny_cpu"]
    cmd += our_overrides(model_dir, out, steps, staleness) + BACKENDS[backend]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"simko-tune run failed:\n{proc.stderr[-4000:]}")
    scalars = read_scalars(out / "tb")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # 6.7 GB per 0.5B run, unread
    steps_seen = sorted(scalars["time/step"])
    phases = (
        "wait_rollout", "generate", "score", "old_logprobs", "update", "publish",
        "publish_write", "publish_ack", "publish_verify", "publish_reload",
    )  # fmt: skip
    return {
        "step_s": [scalars["time/step"][s] for s in steps_seen],
        "phases": {
            p: [scalars[f"time/{p}"][s] for s in steps_seen if s in scalars.get(f"time/{p}", {})]
            for p in phases
        },
    }


# ----------------------------------------------------------------------------- main


def check_same_prompts(model_dir: Path) -> None:
    """Both trainers must see the same token ids for every prompt."""
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer
    from transformers import AutoTokenizer

    from simko_tune.data import render_prompt, tokenize_prompt

    ours = qwen2_5_tokenizer(
        str(model_dir / "vocab.json"),
        str(model_dir / "merges.txt"),
        special_tokens_path=str(model_dir / "tokenizer.json"),
    )
    theirs = AutoTokenizer.from_pretrained(model_dir)
    for p in problems():
        a = tokenize_prompt(ours, "plain", p.problem)
        b = theirs(render_prompt("plain", p.problem), add_special_tokens=False)["input_ids"]
        if a != b:
            raise RuntimeError(f"prompt {p.id!r}: simko-tune ids {a} != TRL ids {b}")


def steady(step_s: list[float]) -> list[float]:
    """The second half of a run's steps: warm-up (compilation, allocator growth, the first
    reloads) is over by then."""
    return step_s[len(step_s) // 2 :]


def median_steady(runs: list[dict]) -> float:
    return statistics.median(t for r in runs for t in steady(r["step_s"]))


def bench_model(
    name: str, model_dir: Path, steps: int, rounds: int, work: Path, backends: list[str]
) -> dict:
    """``trl*``: TRL with each optimizer; ``native_s*``: tiny_cpu as users get it (the
    in-process generator); ``vllm_s*``: the vLLM worker (``BACKENDS``)."""
    check_same_prompts(model_dir)
    keys = [*TRL_OPTIMS, *(f"{b}_s{s}" for b in backends for s in (0, 1))]
    runs: dict[str, list[dict]] = {k: [] for k in keys}
    for r in range(rounds):
        for key in runs:
            t0 = time.perf_counter()
            if key in TRL_OPTIMS:
                runs[key].append(run_trl(model_dir, steps, work / f"{key}_{r}", TRL_OPTIMS[key]))
            else:
                backend, staleness = key.rsplit("_s", 1)
                runs[key].append(run_ours(model_dir, steps, int(staleness), work, backend))
            print(
                f"[{name}] round {r + 1}/{rounds} {key}: steps "
                + " ".join(f"{t:.3f}" for t in runs[key][-1]["step_s"])
                + f" s ({time.perf_counter() - t0:.0f} s with start-up)",
                flush=True,
            )
    med = {k: median_steady(v) for k, v in runs.items()}
    result: dict = {"steps_per_run": steps, "rounds": rounds}
    result.update({f"{k}_step_s": med[k] for k in TRL_OPTIMS})
    result["step_s_per_run"] = {k: [r["step_s"] for r in v] for k, v in runs.items()}
    ours = [k for k in keys if k not in TRL_OPTIMS]
    for key in ours:
        result[f"{key}_step_s"] = med[key]
        for trl in TRL_OPTIMS:
            result[f"speedup_{key}_vs_{trl}"] = med[trl] / med[key]
    print(
        f"[{name}] median s/step (second half of each run): TRL {med['trl']:.3f}, TRL fused "
        f"{med['trl_fused']:.3f}; simko-tune "
        + ", ".join(
            f"{k.rsplit('_s', 1)[0]} staleness {k[-1]} {med[k]:.3f} "
            f"({med['trl'] / med[k]:.2f}x TRL, {med['trl_fused'] / med[k]:.2f}x TRL fused)"
            for k in ours
        )
    )
    for key in ours:
        result[f"{key}_phases_s"] = {
            p: statistics.median(v for run in runs[key] for v in steady(run["phases"][p]))
            for p in runs[key][0]["phases"]
            if any(steady(run["phases"][p]) for run in runs[key])
        }
        phases = ", ".join(f"{p} {v:.3f}" for p, v in result[f"{key}_phases_s"].items())
        print(f"[{name}]   {key} phases (median s): {phases}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,0.5b", help="comma list of tiny, 0.5b")
    parser.add_argument("--steps-tiny", type=int, default=40)
    parser.add_argument("--steps-0-5b", type=int, default=8)
    # runs per side, their steady-state steps pooled: a tiny step (~0.06 s) is at the mercy
    # of the machine's noise, so it gets three runs of 40; a 0.5B step (~30 s) one of 8
    parser.add_argument("--rounds-tiny", type=int, default=3)
    parser.add_argument("--rounds-0-5b", type=int, default=1)
    parser.add_argument(
        "--tiny-model-dir", default=None, help="another tiny policy (default: tiny_cpu's)"
    )
    parser.add_argument(
        "--work-dir", default=None, help="kept afterwards (default: a temp dir, removed)"
    )
    parser.add_argument(
        "--backends",
        default="native,vllm",
        help="our generators to run (comma list of native: tiny_cpu's default, vllm)",
    )
    parser.add_argument("--trl-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        model_dir, steps, out, optim = args.trl_worker
        trl_worker(model_dir, int(steps), out, optim)
        return

    unknown = {m.strip() for m in args.models.split(",") if m.strip()} - {"tiny", "0.5b"}
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)} (known: tiny, 0.5b)")
    unknown = {b.strip() for b in args.backends.split(",") if b.strip()} - set(BACKENDS)
    if unknown:
        parser.error(f"--backends: unknown {sorted(unknown)} (known: {', '.join(BACKENDS)})")
    with work_dir(args.work_dir, "bench_vs_trl_") as work:
        run(args, work)


def run(args: argparse.Namespace, work: Path) -> None:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    threads = os.environ.get("OMP_NUM_THREADS")
    print(
        f"work dir {work}; batch {BATCH}; "
        + (f"OMP_NUM_THREADS={threads} (yours)" if threads else "no thread variable set"),
        flush=True,
    )
    results = {}
    for name in models:
        if name == "tiny":
            model_dir = Path(args.tiny_model_dir) if args.tiny_model_dir else tiny_policy()
            results[name] = bench_model(
                name, model_dir, args.steps_tiny, args.rounds_tiny, work, backends
            )
        else:
            model_dir = qwen2_5_0_5b_shape(work)
            results[name] = bench_model(
                name, model_dir, args.steps_0_5b, args.rounds_0_5b, work, backends
            )
    print(
        json.dumps(
            {
                "bench": "vs_trl",
                "omp_num_threads": threads,
                **BATCH,
                "trl_optims": TRL_OPTIMS,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
