"""Benchmark the fused chunked SimKO loss against the plain full-logits formulation.

Same inputs, same process settings, reported as ratios (CPU, fp32, Qwen2.5-0.5B shapes by
default: V = 151,936, D = 896, N = B·T tokens, every token valid):

- ``full``: ``simko_tune.loss_reference`` (what the tests check against): fp32 logits for all tokens,
  log-softmax, gathers, per-response ``torch.quantile`` gate, SimKO by autograd.
- ``simko`` / ``grpo``: ``simko_tune.loss.policy_loss`` in those modes (compiled).

Each (implementation, N) runs in a fresh subprocess: build inputs, one warm-up
forward+backward (compilation, first touch), then the peak-memory run, then ``--repeats``
timed runs (median reported). Peak memory is the kernel's resident-set high-water mark
(``VmHWM``) reset just before the run through ``/proc/self/clear_refs``, minus the resident
set at that moment: the extra memory one forward+backward needs, weight gradient included.
``MALLOC_MMAP_THRESHOLD_`` is pinned so freed buffers go back to the kernel and cannot hide
behind malloc's cache. Linux only.

Prints a table and ends with ONE JSON line of ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

IMPLS = ("full", "simko", "grpo")
SEQ_LEN = 256


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def worker(impl: str, n: int, vocab: int, dim: int, chunk_size: int, repeats: int) -> dict:
    import torch

    from simko_tune.loss import LossConfig, group_advantages, policy_loss, token_logprobs
    from simko_tune.loss_reference import reference_policy_loss

    torch.manual_seed(0)
    batch = n // SEQ_LEN
    hidden = torch.randn(batch, SEQ_LEN, dim).requires_grad_()
    weight = (torch.randn(vocab, dim) * 0.05).requires_grad_()
    targets = torch.randint(0, vocab, (batch, SEQ_LEN))
    old = token_logprobs(hidden, weight, targets) + 0.05 * torch.randn(batch, SEQ_LEN)
    rewards = (torch.arange(batch) % 2).float()
    adv = group_advantages(rewards, min(4, batch))
    mask = torch.ones(batch, SEQ_LEN, dtype=torch.bool)
    correct = rewards == 1
    mode = "simko" if impl == "full" else impl
    cfg = LossConfig(mode=mode, chunk_size=chunk_size)

    def step() -> None:
        if impl == "full":
            loss = reference_policy_loss(hidden, weight, targets, old, adv, mask, correct, cfg)
        else:
            loss, _ = policy_loss(hidden, weight, targets, old, adv, mask, correct, cfg)
        loss.backward()
        hidden.grad = weight.grad = None

    step()  # warm-up: compilation, first touch
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base_kb = _status_kb("VmRSS")
    step()
    peak_mb = (_status_kb("VmHWM") - base_kb) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"impl": impl, "n": n, "time_s": statistics.median(times), "peak_mb": peak_mb}


def run_worker(args, impl: str, n: int) -> dict:
    from simko_tune.paths import cache_dir

    env = {
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir() / "inductor"),
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "1048576",
        "OMP_NUM_THREADS": str(args.threads),
    }
    cmd = [sys.executable, __file__, "--worker", impl, "--sizes", str(n)]
    cmd += ["--vocab", str(args.vocab), "--dim", str(args.dim), "--repeats", str(args.repeats)]
    cmd += ["--chunk-size", str(args.chunk_size), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1024,4096", help="comma-separated N = B*T")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="V=32768, D=256, N=512,1024")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.dim, args.sizes = 32_768, 256, "512,1024"
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(n % SEQ_LEN for n in sizes):
        parser.error(f"--sizes must be multiples of T={SEQ_LEN}")

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        out = worker(args.worker, sizes[0], args.vocab, args.dim, args.chunk_size, args.repeats)
        print(json.dumps(out))
        return

    print(
        f"V={args.vocab} D={args.dim} T={SEQ_LEN} chunk={args.chunk_size} "
        f"threads={args.threads} repeats={args.repeats} (CPU, fp32)"
    )
    print(f"{'N':>6} {'impl':>6} {'fwd+bwd s':>10} {'peak MiB':>10}")
    ratios = {}
    for n in sizes:
        res = {impl: run_worker(args, impl, n) for impl in IMPLS}
        for impl in IMPLS:
            print(f"{n:>6} {impl:>6} {res[impl]['time_s']:>10.3f} {res[impl]['peak_mb']:>10.1f}")
        ratios[str(n)] = {
            "time_simko_over_full": res["simko"]["time_s"] / res["full"]["time_s"],
            "peak_simko_over_full": res["simko"]["peak_mb"] / res["full"]["peak_mb"],
            "time_simko_over_grpo": res["simko"]["time_s"] / res["grpo"]["time_s"],
            "peak_mb": {impl: round(res[impl]["peak_mb"], 1) for impl in IMPLS},
            "time_s": {impl: round(res[impl]["time_s"], 3) for impl in IMPLS},
        }
    largest = ratios[str(max(sizes))]
    targets = {
        "peak_le_1/8_full_at_largest_N": largest["peak_simko_over_full"] <= 1 / 8,
        "time_le_full": all(r["time_simko_over_full"] <= 1.0 for r in ratios.values()),
        "simko_le_1.15x_grpo": all(r["time_simko_over_grpo"] <= 1.15 for r in ratios.values()),
    }
    for r in ratios.values():
        for k in ("time_simko_over_full", "peak_simko_over_full", "time_simko_over_grpo"):
            r[k] = round(r[k], 4)
    print(
        json.dumps(
            {
                "bench": "loss",
                "vocab": args.vocab,
                "dim": args.dim,
                "chunk_size": args.chunk_size,
                "ratios": ratios,
                "targets_met": targets,
            }
        )
    )


if __name__ == "__main__":
    main()
