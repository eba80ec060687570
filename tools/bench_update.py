"""One PPO update (old log-probs + the update) on 2 gloo ranks with FSDP2: the plain path
against the efficient one, in the same run, through the recipe's own code.

    python tools/bench_update.py                     # a few minutes on 2 CPU cores
    python tools/bench_update.py --layers 24 --vocab 151936   # the real 0.5B shape (slow)

The model is Qwen2.5-0.5B-shaped (hidden 896, 14 heads / 2 KV heads, MLP 4864, tied
embeddings) with fewer layers and a reduced vocabulary so that it runs on a CPU; response
lengths are spread as in math RL (uniform over 20..400 tokens).

- before: ``ppo.micro_batch_size`` rows per micro-batch (also for the old log-probs), and a
  gradient reduce-scatter after every micro-batch (``max_tokens_per_micro_batch=null``,
  ``defer_grad_sync=false``);
- after: micro-batches by token budget with rows grouped by length, a larger budget for the
  forward-only old-log-prob pass, one gradient sync per mini-batch (the parameters
  gathered in between stay gathered: no all-gather in the next micro-batch's forward), and
  no old-log-prob pass over the first mini-batch's rows (before the first optimizer step
  the current policy is the old one: the loss takes those log-probs from its own forward).

Both start from the same weights and a fresh optimizer. Metrics stay on the device in both
(the old path's per-micro-batch host syncs cost nothing on CPU and are not kept). Prints the
figures, then one JSON line: ``speedup`` is the wall-time ratio; ``cpu_ratio`` that of rank
0's CPU time, the work itself, which a machine shared with other jobs distorts less (it
leaves out the time spent waiting for a CPU, and for the other rank in collectives).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build_model_dir(out: Path, layers: int, vocab: int) -> Path:
    """A random Qwen2.5-0.5B-shaped Hugging Face directory, made by ``simko_tune.demo.tiny``'s
    builder. Its tokenizer is trained on random words to exactly ``vocab`` ids: the
    benchmark needs the vocabulary's size, not its words."""
    from simko_tune.demo.tiny import (
        SPECIAL_TOKENS,
        TinyQwen2Dims,
        build_tiny_qwen2,
        train_tokenizer,
    )
    from simko_tune.model_shapes import QWEN2_5_SHAPES
    from simko_tune.models import read_hf_config

    rng = random.Random(0)
    words = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
        for _ in range(3 * vocab)
    ]
    texts = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(vocab // 4)]
    tok_dir = train_tokenizer(texts, out / "tokenizer", vocab_size=vocab - len(SPECIAL_TOKENS))
    shape = {**QWEN2_5_SHAPES["0.5b"], "num_layers": layers}
    dims = TinyQwen2Dims(**shape, max_seq_len=1024, tie_word_embeddings=True)
    model_dir = build_tiny_qwen2(tok_dir, out / "model", dims, seed=0)
    built = read_hf_config(model_dir)["vocab_size"]
    if built != vocab:
        raise RuntimeError(f"the tokenizer reached {built} ids, not {vocab}: more words needed")
    return model_dir


def synthetic_rollout(args):
    """``prompts × samples`` rows: prompts of 60..140 tokens, responses of 20..400."""
    from simko_tune.rollout import build_rollout_batch

    gen = torch.Generator().manual_seed(0)
    rows = args.prompts * args.samples
    prompts, responses = [], []
    for _ in range(args.prompts):
        n = int(torch.randint(60, 141, (1,), generator=gen))
        prompt = torch.randint(0, args.vocab - 2, (n,), generator=gen).tolist()
        for _ in range(args.samples):
            m = int(torch.randint(20, 401, (1,), generator=gen))
            prompts.append(prompt)
            responses.append(torch.randint(0, args.vocab - 2, (m,), generator=gen).tolist())
    rewards = (torch.rand(rows, generator=gen) < 0.5).float().tolist()
    return build_rollout_batch(
        prompts=prompts,
        responses=responses,
        worker_logprobs=[[-1.0] * len(r) for r in responses],
        rewards=rewards,
        truncated=[False] * rows,
        pad_id=args.vocab - 2,
    )


def worker(args) -> None:
    """One torchrun rank: the recipe's model, optimizer, old log-probs and update."""
    import simko_recipe
    from omegaconf import OmegaConf

    from simko_tune.config import check_schema, resolve_config_path
    from simko_tune.models import read_hf_config

    cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
    max_len = 140 + 400
    for key, value in {
        "output_dir": args.out_dir,
        "model_dir": args.model_dir,
        "prepare_model": None,
        "model._component_": "simko_tune.models.model_from_hf_config",
        "checkpointer.output_dir": args.out_dir,
        "rollout.samples_per_prompt": args.samples,
        "rollout.prompts_per_step": args.prompts,
        "loss.chunk_size": 2048,
        "ppo.mini_batch_prompts": args.mini_batch_prompts,
        "parallel.dp_shard": 2,
        "lr_scheduler": None,
    }.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    recipe = simko_recipe.SimKORecipe(check_schema(cfg))
    recipe.setup_parallel()
    recipe.hf_config = read_hf_config(args.model_dir)
    recipe.model = recipe.build_model()
    initial = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    rollout = synthetic_rollout(args)
    settings = {
        "before": dict(
            micro_batch_size=args.micro_batch_size,
            max_tokens_per_micro_batch=None,
            logprob_max_tokens_per_micro_batch=None,
            defer_grad_sync=False,
        ),
        "after": dict(
            micro_batch_size=args.micro_batch_size,
            max_tokens_per_micro_batch=args.micro_batch_size * max_len,
            logprob_max_tokens_per_micro_batch=2 * args.micro_batch_size * max_len,
            defer_grad_sync=True,
        ),
    }
    recipe.setup_update()
    # warm-up (FSDP2's lazy init, first allocations) so that neither timed run pays for it
    recipe.ppo.old_logprobs(rollout.select(torch.arange(2)))
    recipe.model.reshard()  # a forward without backward leaves FSDP2's root unsharded
    results = {}
    for name in args.order.split(","):
        with torch.no_grad():
            for n, p in recipe.model.named_parameters():
                p.copy_(initial[n])
        for k, v in settings[name].items():
            recipe.cfg.ppo[k] = v
        recipe.setup_update()
        torch.distributed.barrier()
        t0, cpu0 = time.perf_counter(), time.process_time()
        rows = recipe.ppo.old_logprob_rows(rollout) if name == "after" else None  # None: all
        old, _ = recipe.ppo.old_logprobs(rollout, policy_rows=rows)
        t1 = time.perf_counter()
        stats = recipe.ppo.update(rollout, old)
        t2, cpu2 = time.perf_counter(), time.process_time()
        results[name] = {
            "old_logprobs_s": t1 - t0,
            "update_s": t2 - t1,
            "cpu_s": cpu2 - cpu0,  # rank 0's CPU time: the work, without the waits for CPUs
            "loss": stats["loss"],
        }
    if recipe.is_rank_zero:
        Path(args.result).write_text(json.dumps(results))
    recipe.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2, help="0.5B has 24 (reduced for CPU)")
    p.add_argument("--vocab", type=int, default=8192, help="0.5B has 151,936")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--mini-batch-prompts", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=2, help="rows, as the 7B configs")
    p.add_argument("--order", default="before,after")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from simko_tune.paths import free_port

    with tempfile.TemporaryDirectory(prefix="bench_update_") as tmp:
        tmp = Path(tmp)
        model_dir = build_model_dir(tmp / "build", args.layers, args.vocab)
        result = tmp / "result.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__,
            "--worker", "--model-dir", str(model_dir), "--out-dir", str(tmp / "out"),
            "--result", str(result), "--layers", str(args.layers), "--vocab", str(args.vocab),
            "--prompts", str(args.prompts), "--samples", str(args.samples),
            "--mini-batch-prompts", str(args.mini_batch_prompts),
            "--micro-batch-size", str(args.micro_batch_size), "--order", args.order,
        ]  # fmt: skip
        # as users launch it: torchrun gives each of its 2 ranks OMP_NUM_THREADS=1
        subprocess.run(cmd, check=True, cwd=ROOT)
        res = json.loads(result.read_text())

    total = {k: v["old_logprobs_s"] + v["update_s"] for k, v in res.items()}
    rows = args.prompts * args.samples
    print(
        f"Qwen2.5-0.5B shape, {args.layers} layers, vocab {args.vocab}, 2 gloo ranks (FSDP2), "
        f"{rows} rows, {rows // (args.mini_batch_prompts * args.samples)} optimizer steps"
    )
    for name, r in res.items():
        print(
            f"  {name:>6}: old log-probs {r['old_logprobs_s']:7.2f} s  update "
            f"{r['update_s']:7.2f} s  total {total[name]:7.2f} s  (rank 0 CPU {r['cpu_s']:7.2f} s)"
            f"  loss {r['loss']:+.6f}"
        )
    speedup = total["before"] / total["after"]
    cpu_ratio = res["before"]["cpu_s"] / res["after"]["cpu_s"]
    print(f"  speed-up {speedup:.2f}x (target >= 1.5x); rank 0 CPU time {cpu_ratio:.2f}x")
    print(
        json.dumps(
            {
                "bench": "update",
                "layers": args.layers,
                "vocab": args.vocab,
                "rows": rows,
                "before_s": round(total["before"], 3),
                "after_s": round(total["after"], 3),
                "before_update_s": round(res["before"]["update_s"], 3),
                "after_update_s": round(res["after"]["update_s"], 3),
                "before_old_logprobs_s": round(res["before"]["old_logprobs_s"], 3),
                "after_old_logprobs_s": round(res["after"]["old_logprobs_s"], 3),
                "loss_abs_diff": abs(res["before"]["loss"] - res["after"]["loss"]),
                "before_cpu_s": round(res["before"]["cpu_s"], 3),
                "after_cpu_s": round(res["after"]["cpu_s"], 3),
                "cpu_ratio": round(cpu_ratio, 3),
                "speedup": round(speedup, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
