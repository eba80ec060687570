"""One-step-off rollouts against the synchronous loop on the CPU default (``tiny_cpu``).

Runs ``tune run simko_recipe --config tiny_cpu`` for ``--steps`` steps at
``rollout.max_staleness`` 0 and 1, same seed, evaluation off, only the final checkpoint,
each in its own output dir, alternating per seed (staleness 0 first). Reported per run: the
process wall time (start-up included), the summed and median ``time/step`` (the training
loop alone), and the mean of ``reward/mean`` over the last ``--last`` steps with its
standard error across those steps (steps are correlated, so the error is a lower bound).
Then the speed ratio staleness 1 / staleness 0 of the summed step times (> 1: one-step-off
is faster) and the reward difference in units of the two standard errors combined.

    python tools/bench_staleness.py                    # 120 steps, seed 0
    python tools/bench_staleness.py --seeds 0,1 --steps 60

Prints the figures, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import time
from pathlib import Path

from simko_tune.metrics.tensorboard import read_scalars
from simko_tune.paths import work_dir


def overrides(out: Path, steps: int, staleness: int, seed: int) -> list[str]:
    return [
        f"output_dir={out}",
        f"max_steps={steps}",
        f"seed={seed}",
        f"rollout.max_staleness={staleness}",
        "eval.every_n_steps=0",
        "eval.before_training=false",
        "checkpoint.every_n_steps=0",  # only the final save
        "log.samples_every_n_steps=0",
    ]


def run(out: Path, steps: int, staleness: int, seed: int, last: int) -> dict:
    cmd = ["tune", "run", "simko_recipe", "--config", "tiny_cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(  # the user's environment: the recipe picks its threads itself
        cmd + overrides(out, steps, staleness, seed),
        capture_output=True,
        text=True,
        timeout=7200,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run failed (staleness {staleness}):\n{proc.stderr[-4000:]}")
    scalars = read_scalars(out / "tb")
    step_s = [scalars["time/step"][s] for s in sorted(scalars["time/step"])]
    rewards = [scalars["reward/mean"][s] for s in sorted(scalars["reward/mean"])]
    if len(step_s) != steps or len(rewards) != steps:
        raise RuntimeError(f"{out}: {len(step_s)} step times, {len(rewards)} rewards, not {steps}")
    tail = rewards[-last:]
    return {
        "staleness": staleness,
        "seed": seed,
        "wall_s": wall,
        "steps_sum_s": sum(step_s),
        "step_median_s": statistics.median(step_s),
        "reward_last_mean": statistics.fmean(tail),
        "reward_last_sem": statistics.stdev(tail) / math.sqrt(len(tail)),
        "output_dir": str(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--last", type=int, default=40, help="steps the reward is averaged over")
    parser.add_argument("--seeds", default="0", help="comma list")
    parser.add_argument("--staleness", default="0,1", help="comma list of 0, 1 (default both)")
    parser.add_argument(
        "--work-dir", default=None, help="kept afterwards (default: a temp dir, removed)"
    )
    args = parser.parse_args()
    if not 2 <= args.last <= args.steps:
        parser.error("--last must be between 2 and --steps")
    seeds = [int(s) for s in args.seeds.split(",")]
    levels = [int(s) for s in args.staleness.split(",")]
    if not set(levels) <= {0, 1}:
        parser.error("--staleness: 0 and/or 1")
    runs = []
    with work_dir(args.work_dir, "bench_staleness_") as work:
        print(f"work dir {work}; {args.steps} steps, seeds {seeds}", flush=True)
        for seed in seeds:
            for staleness in levels:
                r = run(work / f"s{staleness}_seed{seed}", args.steps, staleness, seed, args.last)
                runs.append(r)
                print(
                    f"staleness {staleness} seed {seed}: wall {r['wall_s']:.1f} s, steps "
                    f"{r['steps_sum_s']:.1f} s (median {r['step_median_s']:.3f} s/step), "
                    f"reward last {args.last} {r['reward_last_mean']:.4f} ± "
                    f"{r['reward_last_sem']:.4f}",
                    flush=True,
                )

    summary: dict = {"bench": "staleness", "steps": args.steps, "last": args.last, "seeds": seeds}
    if len(levels) >= 2:  # the comparison; one level alone reports its runs only

        def pooled(staleness: int, key: str) -> float:
            return statistics.fmean(r[key] for r in runs if r["staleness"] == staleness)

        speedup = pooled(0, "steps_sum_s") / pooled(1, "steps_sum_s")
        diff = pooled(1, "reward_last_mean") - pooled(0, "reward_last_mean")
        sem = math.hypot(
            *(
                math.sqrt(sum(r["reward_last_sem"] ** 2 for r in runs if r["staleness"] == s))
                / len(seeds)
                for s in (0, 1)
            )
        )
        print(
            f"staleness 1 vs 0: {speedup:.2f}x the speed (summed step time); reward last "
            f"{args.last}: {diff:+.4f} = {diff / sem:+.2f} standard errors"
        )
        summary.update(
            speedup_s1_vs_s0=speedup, reward_diff_s1_minus_s0=diff, reward_diff_in_sem=diff / sem
        )
    print(json.dumps({**summary, "runs": runs}))


if __name__ == "__main__":
    main()
