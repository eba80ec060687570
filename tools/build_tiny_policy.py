"""Build the CPU default's policy: a tiny Qwen2 warm-started on Countdown.

    python tools/build_tiny_policy.py --out DIR [--seed S] [--max-steps N] [--target-success P]

Prints the sampled success rate (temperature 1) on training and held-out problems; the same
figures, the settings and the model dims are written to DIR/warm_start.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from simko_tune.demo.warm_start import WarmStartConfig, build_tiny_policy


def main() -> None:
    defaults = WarmStartConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="Hugging Face directory to write (replaced)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument(
        "--target-success",
        type=float,
        default=defaults.target_success,
        help="stop supervised training once sampled success on training problems reaches "
        "this (negative: always run --max-steps)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = WarmStartConfig(
        seed=args.seed,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        target_success=None if args.target_success < 0 else args.target_success,
    )
    start = time.monotonic()
    out = build_tiny_policy(args.out, cfg)
    record = json.loads((out / "warm_start.json").read_text())
    print(
        f"{out}: {record['steps']} supervised steps, sampled success (temperature 1) "
        f"train {record['train_success']:.3f}, held-out {record['test_success']:.3f}, "
        f"{time.monotonic() - start:.0f} s"
    )
    keys = ("steps", "train_success", "test_success", "build_seconds", "dims")
    print(json.dumps({k: record[k] for k in keys}))


if __name__ == "__main__":
    main()
