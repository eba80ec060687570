"""pass@K study on the CPU default task: the base policy and every method of the SimKO paper,
several seeds, the same compute for each.

    python tools/passk_study.py                       # the report: test split, seeds 0-4 (~150 min)
    python tools/passk_study.py --split val --first-seed 100 --seeds 3 \\
        --methods grpo,simko --method simko_a0.3=loss.alpha=0.3,loss.lam=2.0 \\
        --docs docs/passk_search.md                   # choosing settings: validation split
    python tools/passk_study.py --steps 2 --seeds 1 --n 4 --out /tmp/study --docs /tmp/study.md

Every run is ``tune run simko_recipe --config tiny_cpu`` with the method's loss overrides,
its own ``output_dir`` and ``seed``, generating with a vLLM worker (as the reports were
measured): the same prompts, rollouts per step and steps for every method. The recipe
evaluates the Countdown split ``--split`` (``val`` to choose settings, ``test`` for the
report, never both) with ``n`` samples per problem, unbiased pass@K for
K = 1, 2, 4 … n: before training in the first method's run of each seed (the base policy)
and after the last step in every run. Seeds pair the runs: seed s of every method starts
from the same policy with the same data order.

A finished run leaves ``result.json`` (its pass@K and its policy-shape curves, read from its
TensorBoard files) and is skipped by a rerun; a killed run resumes from its last checkpoint
(``resume=auto``). At the end the tool writes the report (``--docs``) with two PNG plots
beside it: pass@K curves (mean and min–max band over seeds) and the Λ(n) and rank-2..K mass
curves over the gated tokens and over all tokens. The last line printed is one JSON object
with the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from simko_tune.fs import atomic_write
from simko_tune.metrics.tensorboard import read_scalars

BASE = "base"
# The methods the paper compares, as loss overrides of tiny_cpu (whose SimKO settings are
# the ones the validation search chose; "simko_paper" is the paper's α, λ, τ).
METHODS: dict[str, tuple[str, ...]] = {
    "grpo": ("loss.mode=grpo",),
    "simko": ("loss.mode=simko",),
    "simko_paper": ("loss.mode=simko", "loss.alpha=0.01", "loss.lam=1.1", "loss.tau=0.8"),
    "grpo_entropy": ("loss.mode=grpo", "loss.entropy_coef=0.001"),
    "psr": ("loss.mode=psr",),
    "nsr": ("loss.mode=nsr",),
    "w_reinforce": ("loss.mode=w_reinforce",),
}
SPLITS = {"val": 193, "test": 165}  # Countdown's held-out splits and their sizes
SHOWN_K = (1, 4, 16, 64, 256)
# The policy's shape during training, as the recipe logs it (see simko_tune.loss)
SHAPE_TAGS = tuple(
    f"policy/{name}_{kind}"
    for kind in ("gated", "all")
    for name in ("logprob_rank1", "logprob_rank2", "logprob_rank3", "mass_rank2_to_k")
)
# pass@1 may differ from GRPO's by at most this (a fraction, not percent)
PASS1_MARGIN = 0.02


def parse_method(text: str) -> tuple[str, tuple[str, ...]]:
    """``name=key=value,key=value`` → (name, overrides)."""
    name, sep, rest = text.partition("=")
    overrides = tuple(o for o in rest.split(",") if o)
    if not sep or not name or not overrides or any("=" not in o for o in overrides):
        raise argparse.ArgumentTypeError(
            f"--method {text!r}: expected NAME=key=value[,key=value...]"
        )
    return name, overrides


def plan_methods(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    """The trained methods of this study, in run order (GRPO first: the pairs' reference)."""
    out: dict[str, tuple[str, ...]] = {}
    for name in ["grpo", *(m for m in args.methods if m != "grpo")]:
        if name not in METHODS:
            raise SystemExit(f"--methods: unknown method {name!r} (known: {', '.join(METHODS)})")
        out[name] = METHODS[name]
    for name, overrides in args.method:
        if name in out or name == BASE:
            raise SystemExit(f"--method {name!r}: the name is taken")
        out[name] = overrides
    return out


# ----------------------------------------------------------------------------- runs


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed{seed}"


def eval_overrides(split: str) -> list[str]:
    """Evaluate the one split: the config's test set, or in its place the validation set."""
    if split == "test":
        return []
    return [
        "eval.sets.countdown_test=null",
        "eval.sets.countdown_val._component_=simko_tune.demo.countdown.load_countdown",
        "eval.sets.countdown_val.split=val",
        "eval.sets.countdown_val.n=null",
    ]


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
        # the vLLM worker, as docs/passk_study.md and docs/passk_search.md were measured
        # (tiny_cpu's default, the in-process generator, draws other samples from the same
        # distributions: same method, other noise)
        "generation.backend=vllm",
        "generation.weight_transfer=files",
        f"generation.sync_dir={directory}/sync",
        "log.samples_every_n_steps=0",
        *eval_overrides(args.split),
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


def summarise_run(directory: Path, steps: int, split: str) -> dict[str, Any]:
    """pass@K before (if evaluated) and after training, and the policy-shape curves."""
    scalars = read_scalars(directory / "tb")
    prefix = f"eval/countdown_{split}/pass@"
    passk: dict[int, dict[str, float]] = {}
    for tag, values in scalars.items():
        if tag.startswith(prefix):
            for step, value in values.items():
                passk.setdefault(step, {})[tag[len(prefix) :]] = value
    if steps not in passk:
        raise RuntimeError(f"{directory}: no {prefix}K at step {steps} in its TensorBoard files")
    curves = {tag: scalars.get(tag, {}) for tag in (*SHAPE_TAGS, "reward/mean")}
    return {
        "steps": steps,
        "base_passk": passk.get(0),
        "final_passk": passk[steps],
        "curves": {tag: {str(k): v for k, v in sorted(c.items())} for tag, c in curves.items()},
    }


def ensure_run(directory: Path, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The run's result, training it first unless ``result.json`` says it is done."""
    result_path = directory / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("steps") == args.steps and result.get("overrides") == overrides:
            print(f"[skip] {directory}: finished", flush=True)
            return result
        raise RuntimeError(
            f"{result_path} was made with other settings; remove {directory} to redo it"
        )
    t0 = time.perf_counter()
    print(f"[run ] {directory}", flush=True)
    train(directory, overrides, args.run_timeout_s)
    result = summarise_run(directory, args.steps, args.split)
    result.update(overrides=overrides, seconds=time.perf_counter() - t0)
    atomic_write(result_path, json.dumps(result, indent=1, sort_keys=True))
    return result


# ----------------------------------------------------------------------------- statistics


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
    """method -> K -> pass@K of each seed, in seed order; the base rows come from the
    pre-training evaluations."""
    table: dict[str, dict[int, list[float]]] = {}
    for method, runs in results.items():
        for run in runs:
            if run.get("base_passk"):
                for k, v in run["base_passk"].items():
                    table.setdefault(BASE, {}).setdefault(int(k), []).append(v)
            for k, v in run["final_passk"].items():
                table.setdefault(method, {}).setdefault(int(k), []).append(v)
    return table


def paired_difference(ours: list[float], theirs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the seed-paired differences ``ours - theirs``. Both lists
    are in seed order from the first seed; a method run on fewer seeds (``--seeds-of``) is
    paired with the reference's first seeds."""
    if len(ours) > len(theirs):
        raise ValueError(f"{len(ours)} seeds to pair with {len(theirs)}")
    diffs = [a - b for a, b in zip(ours, theirs[: len(ours)], strict=True)]
    std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), std / math.sqrt(len(diffs))


def judge(
    table: dict[str, dict[int, list[float]]], method: str, reference: str = "grpo"
) -> dict[str, Any]:
    """A reviewer's two questions for ``method`` against ``reference`` (seed-paired): does it
    keep the largest K's pass@K above the reference's by more than two standard errors of
    the paired difference, and does its mean pass@1 stay within ``PASS1_MARGIN``."""
    k_max = max(table[reference])
    top, top_se = paired_difference(table[method][k_max], table[reference][k_max])
    one, one_se = paired_difference(table[method][1], table[reference][1])
    return {
        "k_max": k_max,
        "seeds": len(table[method][k_max]),
        "diff_top": top,
        "se_top": top_se,
        "diff_pass1": one,
        "se_pass1": one_se,
        "keeps_top": bool(top > 2 * top_se),  # False with one seed (no standard error)
        "pass1_within": abs(one) <= PASS1_MARGIN,
    }


def verdict(table: dict[str, dict[int, list[float]]], n: int) -> list[str]:
    """Plain sentences on what came out, from the numbers."""
    lines = []
    if "grpo" not in table:
        return ["- No GRPO runs: nothing to compare against."]
    k_max = max(table["grpo"])
    if BASE in table:
        base_top, grpo_top = _stats(table[BASE][k_max])[0], _stats(table["grpo"][k_max])[0]
        lines.append(
            f"- **GRPO against the base policy**: pass@1 {_percent(table['grpo'][1])} vs "
            f"{_percent(table[BASE][1])}, pass@{k_max} {_percent(table['grpo'][k_max])} vs "
            f"{_percent(table[BASE][k_max])}: "
            + (
                "GRPO shows the concentration signature (pass@K at the largest K falls "
                "below the base policy's)."
                if grpo_top < base_top
                else "no concentration signature at the largest K."
            )
        )
    for method in table:
        if method in (BASE, "grpo"):
            continue
        j = judge(table, method)
        figures = (
            f"pass@{k_max} {_percent(table[method][k_max])} vs {_percent(table['grpo'][k_max])}, "
            f"paired difference {100 * j['diff_top']:+.1f}"
        )
        if j["seeds"] == 1:
            lines.append(
                f"- **{method} vs GRPO** (one seed): {figures}, pass@1 difference "
                f"{100 * j['diff_pass1']:+.1f}. One seed has no spread of its own: an "
                "indication, not a result."
            )
            continue
        lines.append(
            f"- **{method} vs GRPO** ({j['seeds']} seed pairs): {figures} ± "
            f"{100 * j['se_top']:.1f} (standard error); pass@1 difference "
            f"{100 * j['diff_pass1']:+.1f} ± {100 * j['se_pass1']:.1f}. "
            + (
                f"It keeps pass@{k_max} above GRPO's by more than two standard errors"
                if j["keeps_top"]
                else f"It does not keep pass@{k_max} above GRPO's by more than two standard errors"
            )
            + (
                f", and its pass@1 is within {100 * PASS1_MARGIN:.0f} points of GRPO's."
                if j["pass1_within"]
                else f", and its pass@1 is not within {100 * PASS1_MARGIN:.0f} points of GRPO's."
            )
        )
    if n < 256:
        lines.append(
            f"- n = {n} samples per problem: K stops at {k_max}, below the paper's 256; "
            "this is a smoke-test setting, not a result."
        )
    return lines


# ----------------------------------------------------------------------------- report


def difference_rows(table: dict[str, dict[int, list[float]]], ks: list[int]) -> list[str]:
    """Seed-paired difference to GRPO at each K, mean ± standard error, in points."""
    rows = ["| method − GRPO | seeds | " + " | ".join(f"pass@{k}" for k in ks) + " |"]
    rows.append("|---|---|" + "---|" * len(ks))
    for method in table:
        if method in (BASE, "grpo") or "grpo" not in table:
            continue
        cells = []
        for k in ks:
            mean, se = paired_difference(table[method][k], table["grpo"][k])
            cells.append(f"{100 * mean:+.1f}" + ("" if math.isnan(se) else f" ± {100 * se:.1f}"))
        rows.append(f"| {method} | {len(table[method][ks[0]])} | " + " | ".join(cells) + " |")
    return rows


def plot_passk(table: dict[str, dict[int, list[float]]], path: Path, split: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for method, per_k in table.items():
        ks = sorted(per_k)
        stats = [_stats(per_k[k]) for k in ks]
        axes.plot(ks, [100 * s[0] for s in stats], marker="o", markersize=3, label=method)
        axes.fill_between(ks, [100 * s[2] for s in stats], [100 * s[3] for s in stats], alpha=0.15)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("K")
    axes.set_ylabel(f"pass@K on countdown_{split} (%)")
    axes.set_title("mean over seeds, band: min–max")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=80)


def _mean_curve(runs: list[dict[str, Any]], tag: str) -> tuple[list[int], list[float]]:
    steps = sorted({int(s) for run in runs for s in run["curves"].get(tag, {})})
    means = [
        statistics.fmean(
            run["curves"][tag][str(s)] for run in runs if str(s) in run["curves"].get(tag, {})
        )
        for s in steps
    ]
    return steps, means


def plot_shape(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Λ(1..3) and the rank-2..K mass during training: the top row over the gated tokens
    (where SimKO acts), the bottom row over all tokens."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 6))
    FigureCanvasAgg(figure)
    titles = ("Λ(1)", "Λ(2)", "Λ(3)", "rank-2..K mass")
    for i, tag in enumerate(SHAPE_TAGS):
        axes = figure.add_subplot(2, 4, i + 1)
        for method, runs in results.items():
            steps, means = _mean_curve(runs, tag)
            axes.plot(steps, means, label=method)
        kind = "gated tokens" if tag.endswith("_gated") else "all tokens"
        axes.set_title(f"{titles[i % 4]}, {kind}", fontsize="small")
        axes.set_xlabel("step", fontsize="small")
        axes.grid(True, alpha=0.3)
    axes.legend(fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=80)


def shape_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """First → last step of each shape curve, averaged over seeds."""
    rows = ["| method | " + " | ".join(f"`{t.removeprefix('policy/')}`" for t in SHAPE_TAGS) + " |"]
    rows.append("|---|" + "---|" * len(SHAPE_TAGS))
    for method, runs in results.items():
        cells = []
        for tag in SHAPE_TAGS:
            _, means = _mean_curve(runs, tag)
            digits = 3 if "mass" in tag else 2
            cells.append(f"{means[0]:.{digits}f} → {means[-1]:.{digits}f}" if means else "–")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return rows


def write_report(
    results: dict[str, list[dict[str, Any]]],
    plan: dict[str, tuple[str, ...]],
    args: argparse.Namespace,
    docs: Path,
) -> dict[str, Any]:
    docs.parent.mkdir(parents=True, exist_ok=True)
    table = collect(results)
    passk_png = docs.with_name(docs.stem + "_passk.png")
    shape_png = docs.with_name(docs.stem + "_shape.png")
    plot_passk(table, passk_png, args.split)
    plot_shape(results, shape_png)
    ks = sorted(next(iter(table.values())))
    shown = [k for k in ks if k in SHOWN_K or k == ks[-1]]
    rows = ["| method | seeds | " + " | ".join(f"pass@{k}" for k in shown) + " |"]
    rows.append("|---|---|" + "---|" * len(shown))
    for method, per_k in table.items():
        cells = [_percent(per_k[k]) for k in shown]
        rows.append(f"| {method} | {len(per_k[ks[0]])} | " + " | ".join(cells) + " |")
    command = " ".join(["python tools/passk_study.py", *sys.argv[1:]])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    run_minutes = sum(run.get("seconds", 0.0) for runs in results.values() for run in runs) / 60
    seeds = (
        f"{args.first_seed}–{args.first_seed + args.seeds - 1}"
        if args.seeds > 1
        else str(args.first_seed)
    )
    methods = "\n".join(f"- `{name}`: `{' '.join(overrides)}`" for name, overrides in plan.items())
    text = "\n".join(
        [
            f"# pass@K on Countdown's {args.split} split (CPU default task, tiny Qwen2 policy)",
            "",
            f"Generated by `{command}` at commit `{commit or 'unknown'}`. Every run is `tune run "
            f"simko_recipe --config tiny_cpu` plus the method's overrides: {args.steps} RL steps "
            f"from the warm-started policy, seeds {seeds} (seed s of every method starts from "
            f"the same policy with the same data order), split `{args.split}` "
            f"({SPLITS[args.split]} problems, never trained on), n = {args.n} samples per "
            "problem, unbiased pass@K. `base` is the policy before RL. Values are percentages, "
            f"mean ± sample std over seeds. The runs took {run_minutes:.0f} min in all."
            + "".join(
                f" `{m}` ran on its first {c} seeds only and is paired with GRPO's first {c}."
                for m, c in args.seeds_of.items()
            ),
            "",
            "Methods (overrides of `tiny_cpu`):",
            "",
            methods,
            "",
            *rows,
            "",
            "Seed-paired difference to GRPO, in points, mean ± standard error:",
            "",
            *difference_rows(table, shown),
            "",
            "## What came out",
            "",
            *verdict(table, args.n),
            "",
            f"![pass@K curves]({passk_png.name})",
            "",
            "## The policy's shape during training (first → last step, mean over seeds)",
            "",
            "Λ(n) is the mean log-prob of the rank-n candidate, the rank-2..K mass the "
            "probability the ranks 2..K hold; `_gated` over the entropy-gated tokens, where "
            "SimKO acts, `_all` over every response token. Under GRPO the paper sees Λ(1) "
            "climb towards 0 while Λ(2) and Λ(3) fall: the policy concentrates on its top-1.",
            "",
            *shape_lines(results),
            "",
            f"![policy shape]({shape_png.name})",
            "",
        ]
    )
    atomic_write(docs, text)
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
    parser.add_argument("--split", choices=sorted(SPLITS), default="test")
    parser.add_argument("--steps", type=int, default=None, help="RL steps (default: tiny_cpu's)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per method")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=256, help="samples per problem in evaluation")
    parser.add_argument(
        "--methods",
        type=lambda s: [m for m in s.split(",") if m],
        default=[m for m in METHODS if m != "simko_paper"],
        help=f"comma-separated, of {', '.join(METHODS)} (default: all but simko_paper)",
    )
    parser.add_argument(
        "--method",
        type=parse_method,
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE[,KEY=VALUE]",
        help="a method of your own: a name and its overrides",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to every run (e.g. model_dir=..., generation.backend=native)",
    )
    parser.add_argument(
        "--seeds-of",
        type=parse_seeds_of,
        action="append",
        default=[],
        metavar="METHOD=N",
        help="run METHOD on its first N seeds only (e.g. a method that collapses on every seed)",
    )
    parser.add_argument("--run-timeout-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    args.seeds_of = dict(args.seeds_of)
    for method, count in args.seeds_of.items():
        if method == "grpo" or not 1 <= count <= args.seeds:
            parser.error(
                f"--seeds-of {method}={count}: needs a method other than grpo, 1 <= N <= --seeds"
            )
    if args.steps is None:
        args.steps = _config_max_steps()
    for name in ("steps", "seeds", "n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if "grpo" not in args.methods:
        parser.error("--methods must include grpo: every method is compared with it")
    return args


def parse_seeds_of(text: str) -> tuple[str, int]:
    method, sep, count = text.partition("=")
    if not sep or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD=N")
    return method, int(count)


def _config_max_steps() -> int:
    from omegaconf import OmegaConf

    from simko_tune.config import resolve_config_path

    return int(OmegaConf.load(resolve_config_path("tiny_cpu")).max_steps)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    plan = plan_methods(args)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in plan}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for i, (method, overrides) in enumerate(plan.items()):
            if seed - args.first_seed >= args.seeds_of.get(method, args.seeds):
                continue
            directory = run_dir(args.out, method, seed)
            results[method].append(
                ensure_run(
                    directory, run_overrides(directory, overrides, seed, args, first=i == 0), args
                )
            )
    summary = write_report(results, plan, args, args.docs)
    line = {
        "tool": "passk_study",
        "split": args.split,
        "steps": args.steps,
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
        "n": args.n,
        "methods": [BASE, *plan],
        "mean": summary,
        "simko_vs_grpo": judge(collect(results), "simko") if "simko" in plan else None,
        "report": str(args.docs),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
