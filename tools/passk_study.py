"""pass@K study on the CPU default task: base policy vs GRPO vs SimKO, several seeds.

    python tools/passk_study.py                                  # the full study (~90 min, 2 cores)
    python tools/passk_study.py --psr-nsr --sweep                # also PSR, NSR and an α/λ sweep
    python tools/passk_study.py --steps 2 --seeds 1 --n 4 --out /tmp/study --docs /tmp/study.md

Every run is ``tune run simko_recipe --config tiny_cpu`` with the method's loss overrides,
its own ``output_dir`` and ``seed``. The recipe evaluates the held-out Countdown split
(``eval.sets.countdown_test``, 165 problems) with ``n`` samples per problem, unbiased
pass@K for K = 1, 2, 4 … n: before training in the first method's run of each seed (the
base policy, no RL) and after the last step in every run. The recipe's own evaluation is
used rather than ``simko_eval``, whose benchmarks are the math sets (it has no Countdown
split); the numbers come from the same generator, verifier and pass@K code.

A finished run leaves ``result.json`` (its pass@K and Λ(1..3) curves, read from its
TensorBoard files) and is skipped by a rerun; a killed run resumes from its last checkpoint
(``resume=auto``). At the end the tool writes the report (``--docs``) with two PNG plots
beside it: pass@K curves (mean, min–max band over seeds) and Λ(1..3) training curves.
The last line printed is one JSON object with the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from simko_tune.metrics.tensorboard import read_scalars

BASE = "base"
# method name -> the loss overrides of its runs
METHODS: dict[str, tuple[str, ...]] = {
    "grpo": ("loss.mode=grpo",),
    "simko": ("loss.mode=simko",),
}
PSR_NSR: dict[str, tuple[str, ...]] = {"psr": ("loss.mode=psr",), "nsr": ("loss.mode=nsr",)}
SWEEP_ALPHAS = (0.01, 0.05, 0.1)
SWEEP_LAMBDAS = (1.1, 1.5)
EVAL_SET = "countdown_test"
# Λ(1), Λ(2), Λ(3) of the paper, as the recipe logs them
LAMBDA_TAGS = ("logprob_top1_mean", "logprob_top2_mean", "logprob_top3_mean")


def methods(psr_nsr: bool, sweep: bool) -> dict[str, tuple[str, ...]]:
    """The trained methods of this study, in run order."""
    out = dict(METHODS)
    if psr_nsr:
        out.update(PSR_NSR)
    if sweep:
        for alpha in SWEEP_ALPHAS:
            for lam in SWEEP_LAMBDAS:
                if (alpha, lam) != (0.01, 1.1):  # the paper's setting is "simko" itself
                    out[f"simko_a{alpha}_l{lam}"] = (
                        "loss.mode=simko",
                        f"loss.alpha={alpha}",
                        f"loss.lam={lam}",
                    )
    return out


# ----------------------------------------------------------------------------- runs


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed{seed}"


def run_overrides(
    directory: Path,
    method_overrides: tuple[str, ...],
    seed: int,
    args: argparse.Namespace,
    first: bool,
) -> list[str]:
    """``key=value`` overrides of one run: its own output and seed, evaluation with ``n``
    samples after the last step (and before the first one when ``first``)."""
    return [
        f"output_dir={directory}",
        f"seed={seed}",
        f"max_steps={args.steps}",
        f"checkpoint.every_n_steps={args.steps}",
        f"eval.every_n_steps={args.steps}",
        f"eval.before_training={str(first).lower()}",
        f"eval.n={args.n}",
        f"generation.sync_dir={directory}/sync",
        *method_overrides,
        *args.override,
    ]


def train(directory: Path, overrides: list[str], timeout_s: float) -> None:
    """One ``tune run`` (resumes by itself from the run's checkpoints); its log goes to
    ``train.log`` in the run directory."""
    directory.mkdir(parents=True, exist_ok=True)
    command = ["tune", "run", "simko_recipe", "--config", "tiny_cpu", *overrides]
    with open(directory / "train.log", "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{directory}: tune run failed ({proc.returncode}); see train.log")


def summarise_run(directory: Path, steps: int) -> dict[str, Any]:
    """pass@K before (if evaluated) and after training, and the Λ / reward curves."""
    scalars = read_scalars(directory / "tb")
    prefix = f"eval/{EVAL_SET}/pass@"
    passk: dict[int, dict[int, float]] = {}
    for tag, values in scalars.items():
        if tag.startswith(prefix):
            for step, value in values.items():
                passk.setdefault(step, {})[int(tag[len(prefix) :])] = value
    if steps not in passk:
        raise RuntimeError(f"{directory}: no {prefix}K at step {steps} in its TensorBoard files")
    curves = {tag: scalars.get(tag, {}) for tag in (*LAMBDA_TAGS, "reward/mean")}
    return {
        "steps": steps,
        "base_passk": passk.get(0),
        "final_passk": passk[steps],
        "curves": {tag: {str(k): v for k, v in sorted(c.items())} for tag, c in curves.items()},
    }


def write_json_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def ensure_run(
    directory: Path, overrides: list[str], steps: int, timeout_s: float
) -> dict[str, Any]:
    """The run's result, training it first unless ``result.json`` says it is done."""
    result_path = directory / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("steps") == steps and result.get("overrides") == overrides:
            print(f"[skip] {directory}: finished", flush=True)
            return result
        raise RuntimeError(
            f"{result_path} was made with other settings; remove {directory} to redo it"
        )
    t0 = time.perf_counter()
    print(f"[run ] {directory}", flush=True)
    train(directory, overrides, timeout_s)
    result = summarise_run(directory, steps)
    result.update(overrides=overrides, seconds=time.perf_counter() - t0)
    write_json_atomically(result_path, result)
    return result


# ----------------------------------------------------------------------------- report


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    """mean, sample std (0 for one value), min, max."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, min(values), max(values)


def _percent(values: list[float], signed: bool = False) -> str:
    """Mean ± sample std over seeds, in percent; one seed has no spread to show."""
    mean, std, _, _ = _stats(values)
    text = f"{100 * mean:+.1f}" if signed else f"{100 * mean:.1f}"
    return text + (f" ± {100 * std:.1f}" if len(values) > 1 else "")


def collect(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[int, list[float]]]:
    """method -> K -> pass@K of each seed; the base rows come from the pre-training
    evaluations."""
    table: dict[str, dict[int, list[float]]] = {}
    for method, runs in results.items():
        for run in runs:
            if run.get("base_passk"):
                for k, v in run["base_passk"].items():
                    table.setdefault(BASE, {}).setdefault(int(k), []).append(v)
            for k, v in run["final_passk"].items():
                table.setdefault(method, {}).setdefault(int(k), []).append(v)
    return table


def plot_passk(table: dict[str, dict[int, list[float]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for method, per_k in table.items():
        ks = sorted(per_k)
        stats = [_stats(per_k[k]) for k in ks]
        axes.plot(ks, [100 * s[0] for s in stats], marker="o", markersize=3, label=method)
        axes.fill_between(ks, [100 * s[2] for s in stats], [100 * s[3] for s in stats], alpha=0.2)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("K")
    axes.set_ylabel(f"pass@K on {EVAL_SET} (%)")
    axes.set_title("mean over seeds, band: min–max")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=80)


def plot_lambdas(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.2))
    FigureCanvasAgg(figure)
    for i, tag in enumerate(LAMBDA_TAGS):
        axes = figure.add_subplot(1, len(LAMBDA_TAGS), i + 1)
        for method, runs in results.items():
            steps = sorted({int(s) for run in runs for s in run["curves"][tag]})
            means = [
                statistics.fmean(
                    run["curves"][tag][str(s)] for run in runs if str(s) in run["curves"][tag]
                )
                for s in steps
            ]
            axes.plot(steps, means, label=method)
        axes.set_title(f"Λ({i + 1}): mean log-prob of the rank-{i + 1} token")
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        axes.title.set_fontsize("small")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=80)


def verdict(table: dict[str, dict[int, list[float]]], n: int) -> list[str]:
    """Plain sentences on what came out, from the numbers (mean ± std over seeds)."""
    lines = []
    k_max, k_min = max(table.get("grpo", {1: []})), 1

    for method in [m for m in table if m != BASE]:
        if "grpo" not in table or method == "grpo":
            continue
        # paired by seed: a method with fewer seeds (the sweep) meets GRPO's runs of those seeds
        seeds = len(table[method][k_max])
        ours = {k: table[method][k] for k in (k_min, k_max)}
        grpo = {k: table["grpo"][k][:seeds] for k in (k_min, k_max)}
        diff_top = [a - b for a, b in zip(ours[k_max], grpo[k_max])]
        diff_one = [a - b for a, b in zip(ours[k_min], grpo[k_min])]
        mean_top, std_top, _, _ = _stats(diff_top)
        mean_one, std_one, _, _ = _stats(diff_one)
        figures = (
            f"pass@{k_max} {_percent(ours[k_max])} vs {_percent(grpo[k_max])} (difference "
            f"{_percent(diff_top, signed=True)}); pass@1 {_percent(ours[k_min])} vs "
            f"{_percent(grpo[k_min])} (difference {_percent(diff_one, signed=True)}). "
        )
        if seeds == 1:
            same_seed = ""
            if "simko" in table and method != "simko":  # GRPO's seed 0 may itself be low or high
                paper = table["simko"][k_max][0] - table["grpo"][k_max][0]
                same_seed = f" (SimKO at the paper's α, λ on this seed: {100 * paper:+.1f})"
            lines.append(
                f"- **{method} vs GRPO** (seed 0 only): {figures}One seed has no spread of its "
                f"own: an indication, to be read against GRPO's seed-to-seed spread at "
                f"pass@{k_max} ({_percent(table['grpo'][k_max])}) and the same seed's other "
                f"settings{same_seed}, not a result."
            )
            continue
        # "within noise": the seed-paired difference is within two standard errors of 0
        se_one, se_top = std_one / math.sqrt(seeds), std_top / math.sqrt(seeds)
        lines.append(
            f"- **{method} vs GRPO** ({seeds} seed-paired runs): {figures}"
            + (
                f"{method} keeps pass@{k_max} above GRPO's beyond two standard errors"
                if mean_top > 2 * se_top
                else f"{method} does not keep pass@{k_max} above GRPO's beyond two standard errors"
            )
            + (
                "; pass@1 is within noise."
                if abs(mean_one) <= 2 * se_one
                else "; pass@1 differs beyond noise."
            )
        )
    if BASE in table and "grpo" in table:
        lines.append(
            f"- **GRPO vs base**: pass@1 {_percent(table['grpo'][1])} vs "
            f"{_percent(table[BASE][1])}, pass@{k_max} {_percent(table['grpo'][k_max])} vs "
            f"{_percent(table[BASE][k_max])}."
        )
    if n < 256:
        lines.append(
            f"- n = {n} samples per problem: K stops at {k_max}, below the paper's 256; "
            "this is a smoke-test setting, not a result."
        )
    return lines


def lambda_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = []
    for method, runs in results.items():
        parts = []
        for n, tag in enumerate(LAMBDA_TAGS, start=1):
            first = [run["curves"][tag][min(run["curves"][tag], key=int)] for run in runs]
            last = [run["curves"][tag][max(run["curves"][tag], key=int)] for run in runs]
            parts.append(f"Λ({n}) {_stats(first)[0]:.2f} → {_stats(last)[0]:.2f}")
        lines.append(f"- {method}: " + ", ".join(parts))
    return lines


def write_report(
    results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, docs: Path
) -> dict[str, Any]:
    docs.parent.mkdir(parents=True, exist_ok=True)
    table = collect(results)
    passk_png = docs.with_name(docs.stem + "_passk.png")
    lambda_png = docs.with_name(docs.stem + "_lambda.png")
    plot_passk(table, passk_png)
    plot_lambdas(results, lambda_png)
    ks = sorted(next(iter(table.values())))
    shown = [k for k in ks if k in (1, 4, 16, 64, 256) or k == ks[-1]]
    rows = ["| method | seeds | " + " | ".join(f"pass@{k}" for k in shown) + " |"]
    rows.append("|---|---|" + "---|" * len(shown))
    for method, per_k in table.items():
        cells = []
        for k in shown:
            cells.append(_percent(per_k[k]))
        rows.append(f"| {method} | {len(per_k[ks[0]])} | " + " | ".join(cells) + " |")
    command = " ".join(["python tools/passk_study.py", *sys.argv[1:]])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    run_minutes = sum(run.get("seconds", 0.0) for runs in results.values() for run in runs) / 60
    text = "\n".join(
        [
            "# pass@K study on the CPU default task (Countdown, tiny Qwen2 policy)",
            "",
            f"Generated by `{command}`: {args.seeds} seed(s) per method"
            + (f" ({args.sweep_seeds} per α/λ sweep setting)" if args.sweep else "")
            + f", {args.steps} RL steps "
            f"from the warm-started policy (`tune run simko_recipe --config tiny_cpu`), held-out "
            f"split `{EVAL_SET}` (165 problems), n = {args.n} samples per problem, unbiased "
            "pass@K. `base` is the policy before RL (each seed's evaluation before step 1). "
            "Values are percentages, mean ± sample std over seeds. "
            f"Code at commit `{commit or 'unknown'}`; the runs took {run_minutes:.0f} min in all "
            "(training and evaluation, summed over runs).",
            "",
            *rows,
            "",
            "## What came out",
            "",
            *verdict(table, args.n),
            "",
            f"![pass@K curves]({passk_png.name})",
            "",
            "## Λ(n): mean log-prob of the rank-n candidate during training (first → last step)",
            "",
            "Under GRPO the paper sees Λ(1) climb towards 0 while Λ(2) and Λ(3) fall: the "
            "policy concentrates on its top-1 token.",
            "",
            *lambda_lines(results),
            "",
            f"![Λ curves]({lambda_png.name})",
            "",
        ]
    )
    tmp = docs.with_name(docs.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, docs)
    return {
        method: {f"pass@{k}": _stats(per_k[k])[0] for k in (1, ks[-1])}
        for method, per_k in table.items()
    }


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/passk_study"))
    parser.add_argument("--docs", type=Path, default=Path("docs/passk_study.md"))
    parser.add_argument("--steps", type=int, default=120, help="RL steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (0, 1, ...)")
    parser.add_argument("--n", type=int, default=256, help="samples per problem in evaluation")
    parser.add_argument("--psr-nsr", action="store_true", help="also PSR and NSR")
    parser.add_argument("--sweep", action="store_true", help="also SimKO at α x λ settings")
    parser.add_argument(
        "--sweep-seeds",
        type=int,
        default=None,
        help="seeds of the sweep's settings (0, 1, ...; default: --seeds); the sweep costs "
        "5 runs per seed",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to every run (e.g. model_dir=..., generation.backend=native)",
    )
    parser.add_argument("--run-timeout-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if args.sweep_seeds is None:
        args.sweep_seeds = args.seeds
    for name in ("steps", "seeds", "n", "sweep_seeds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    plan = methods(args.psr_nsr, args.sweep)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in plan}
    sweep_only = set(plan) - set(methods(args.psr_nsr, sweep=False))
    for seed in range(max(args.seeds, args.sweep_seeds)):
        for i, (method, overrides) in enumerate(plan.items()):
            if seed >= (args.sweep_seeds if method in sweep_only else args.seeds):
                continue
            directory = run_dir(args.out, method, seed)
            results[method].append(
                ensure_run(
                    directory,
                    run_overrides(directory, overrides, seed, args, first=i == 0),
                    args.steps,
                    args.run_timeout_s,
                )
            )
    summary = write_report(results, args, args.docs)
    line = {
        "tool": "passk_study",
        "steps": args.steps,
        "seeds": args.seeds,
        "n": args.n,
        "methods": [BASE, *plan],
        "mean": summary,
        "report": str(args.docs),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
