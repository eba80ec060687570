"""pass@K report over scored samples of one or more runs: Markdown table, CSV, PNG curves.

Input: JSONL files with one scored sample per line,
``{"benchmark", "problem_id", "sample_index", "reward" (0 or 1), "answer" (str or null)}``.
Each problem uses all of its own samples (the unbiased estimator needs only k <= n_i), so
K goes up to n = the fewest samples any problem of the benchmark has; problems with fewer
samples than the benchmark's most are listed in the report rather than silently mixed in.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simko_tune.data.problems import DataError
from simko_tune.fs import atomic_write
from simko_tune.metrics.passk import maj_at_n, mean_at_n, pass_at_k, powers_of_two_up_to

AVERAGE = "average"


@dataclass(frozen=True)
class Sample:
    index: int
    reward: float
    answer: str | None


@dataclass(frozen=True)
class BenchmarkScores:
    """Scores of one run on one benchmark (or the macro-average over its benchmarks)."""

    run: str
    benchmark: str
    num_problems: int
    n: int
    pass_at_k: dict[int, float]
    mean_at_n: float
    maj_at_n: float
    short_problems: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class PassKReport:
    scores: list[BenchmarkScores]
    markdown: Path
    csv: Path
    plot: Path


def passk_report(
    samples_paths: list[Path] | dict[str, Path],
    out_dir: Path,
    ks: Iterable[int] | None = None,
) -> PassKReport:
    """Score every run (a dict's keys label runs; a list's file stems do), write
    ``passk.md``, ``passk.csv`` and ``passk.png`` into ``out_dir``, and return the scores.

    ``ks`` defaults to 1, 2, 4, ... up to each benchmark's n; given, each benchmark keeps the
    ks it has enough samples for. The "average" row of a run is the plain mean over its
    benchmarks, at the ks every benchmark has.
    """
    runs = _label_runs(samples_paths)
    scores: list[BenchmarkScores] = []
    for run, path in runs.items():
        per_benchmark = [
            score_benchmark(run, benchmark, problems, ks)
            for benchmark, problems in samples_by_problem(path).items()
        ]
        scores.extend(per_benchmark)
        scores.append(average_scores(run, per_benchmark))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PassKReport(
        scores=scores,
        markdown=out_dir / "passk.md",
        csv=out_dir / "passk.csv",
        plot=out_dir / "passk.png",
    )
    atomic_write(report.markdown, render_markdown(scores).encode())
    atomic_write(report.csv, render_csv(scores).encode())
    atomic_write(report.plot, render_plot(scores))
    return report


SAMPLE_KEYS = ("benchmark", "problem_id", "sample_index", "reward")


@dataclass(frozen=True)
class SampleRows:
    """The rows of a samples JSONL, with each row's line number (for error messages)."""

    rows: list[dict[str, Any]]
    lines: list[int]
    torn: bool  # the last line was cut by a kill; only complete rows are in ``rows``


def read_samples(path: Path) -> SampleRows:
    """The one reader of samples files (the eval recipe appends them, the report reads
    them). A missing file has no rows. A last line without its newline was torn by a kill
    and is left out (``torn``); a bad line anywhere else is corruption, not a kill:
    :class:`DataError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return SampleRows([], [], False)
    lines = path.read_bytes().split(b"\n")
    # A complete file ends with "\n", so the last piece is empty; anything else was torn.
    torn = lines.pop() != b""
    rows, numbers = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object")
        missing = [key for key in SAMPLE_KEYS if key not in row]
        if missing:
            raise DataError(f"{path}:{number}: missing key {missing[0]!r}")
        rows.append(row)
        numbers.append(number)
    return SampleRows(rows, numbers, torn)


def samples_by_problem(path: Path) -> dict[str, dict[str, list[Sample]]]:
    """benchmark -> problem id -> samples in sample_index order. Malformed lines, a torn
    last line and a repeated (benchmark, problem_id, sample_index) raise
    :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such samples file")
    found = read_samples(path)
    if found.torn:
        raise DataError(
            f"{path}: the last line is incomplete (an eval killed while writing); rerun the "
            "eval on the same output_dir to repair the file"
        )
    benchmarks: dict[str, dict[str, dict[int, Sample]]] = {}
    for line_number, record in zip(found.lines, found.rows):
        where = f"{path}:{line_number}"
        benchmark, problem_id, sample = _parse_record(record, where)
        problem = benchmarks.setdefault(benchmark, {}).setdefault(problem_id, {})
        if sample.index in problem:
            raise DataError(
                f"{where}: sample {sample.index} of {benchmark}/{problem_id} appears twice"
            )
        problem[sample.index] = sample
    if not benchmarks:
        raise DataError(f"{path}: no samples")
    return {
        benchmark: {pid: [s[i] for i in sorted(s)] for pid, s in problems.items()}
        for benchmark, problems in benchmarks.items()
    }


def score_benchmark(
    run: str,
    benchmark: str,
    problems: dict[str, list[Sample]],
    ks: Iterable[int] | None = None,
) -> BenchmarkScores:
    """pass@k (mean over problems of the unbiased estimate), mean@n and maj@n."""
    counts = {pid: len(samples) for pid, samples in problems.items()}
    n = min(counts.values())
    most = max(counts.values())
    k_values = powers_of_two_up_to(n) if ks is None else sorted({k for k in ks if k <= n})
    correct = {pid: sum(1 for s in samples if s.reward == 1) for pid, samples in problems.items()}
    return BenchmarkScores(
        run=run,
        benchmark=benchmark,
        num_problems=len(problems),
        n=n,
        pass_at_k={
            k: math.fsum(pass_at_k(counts[pid], correct[pid], k) for pid in problems)
            / len(problems)
            for k in k_values
        },
        mean_at_n=_mean(mean_at_n([s.reward for s in samples]) for samples in problems.values()),
        maj_at_n=_mean(
            maj_at_n([s.answer for s in samples], [s.reward for s in samples])
            for samples in problems.values()
        ),
        short_problems=tuple(pid for pid, count in counts.items() if count < most),
    )


def average_scores(run: str, scores: list[BenchmarkScores]) -> BenchmarkScores:
    """Unweighted mean over benchmarks (how the paper averages), at the shared ks."""
    shared_ks = sorted(set.intersection(*(set(s.pass_at_k) for s in scores)))
    return BenchmarkScores(
        run=run,
        benchmark=AVERAGE,
        num_problems=sum(s.num_problems for s in scores),
        n=min(s.n for s in scores),
        pass_at_k={k: _mean(s.pass_at_k[k] for s in scores) for k in shared_ks},
        mean_at_n=_mean(s.mean_at_n for s in scores),
        maj_at_n=_mean(s.maj_at_n for s in scores),
    )


def render_markdown(scores: list[BenchmarkScores]) -> str:
    """One table, values in percent; a note per benchmark with unevenly sampled problems."""
    ks = _all_ks(scores)
    header = ["run", "benchmark", "problems", "n", *[f"pass@{k}" for k in ks], "mean@n", "maj@n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in scores:
        cells = [s.run, s.benchmark, str(s.num_problems), str(s.n)]
        cells += [f"{100 * s.pass_at_k[k]:.1f}" if k in s.pass_at_k else "" for k in ks]
        cells += [f"{100 * s.mean_at_n:.1f}", f"{100 * s.maj_at_n:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for s in scores:
        if s.short_problems:
            shown = ", ".join(s.short_problems[:10])
            more = f" and {len(s.short_problems) - 10} more" if len(s.short_problems) > 10 else ""
            lines.append(
                f"\n{s.run} / {s.benchmark}: {len(s.short_problems)} problems have fewer "
                f"samples than the others (n = {s.n} is the fewest): {shown}{more}"
            )
    return "\n".join(lines) + "\n"


def render_csv(scores: list[BenchmarkScores]) -> str:
    """Same rows as the Markdown table, as fractions at full precision."""
    ks = _all_ks(scores)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["run", "benchmark", "problems", "n", *[f"pass@{k}" for k in ks], "mean@n", "maj@n"]
    )
    for s in scores:
        writer.writerow(
            [s.run, s.benchmark, s.num_problems, s.n]
            + [repr(s.pass_at_k[k]) if k in s.pass_at_k else "" for k in ks]
            + [repr(s.mean_at_n), repr(s.maj_at_n)]
        )
    return buffer.getvalue()


def render_plot(scores: list[BenchmarkScores]) -> bytes:
    """PNG of pass@K against K (log-2 axis): one panel per benchmark plus the average,
    one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    benchmarks = list(dict.fromkeys(s.benchmark for s in scores if s.benchmark != AVERAGE))
    benchmarks.append(AVERAGE)
    columns = min(4, len(benchmarks))
    rows = math.ceil(len(benchmarks) / columns)
    figure = Figure(figsize=(4 * columns, 3.2 * rows))
    FigureCanvasAgg(figure)
    for position, benchmark in enumerate(benchmarks, start=1):
        axes = figure.add_subplot(rows, columns, position)
        for s in scores:
            if s.benchmark != benchmark or not s.pass_at_k:
                continue
            ks = sorted(s.pass_at_k)
            axes.plot(ks, [100 * s.pass_at_k[k] for k in ks], marker="o", markersize=3, label=s.run)
        axes.set_xscale("log", base=2)
        axes.set_title(benchmark)
        axes.set_xlabel("K")
        axes.set_ylabel("pass@K (%)")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _parse_record(record: Any, where: str) -> tuple[str, str, Sample]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    for key in ("benchmark", "problem_id", "sample_index", "reward", "answer"):
        if key not in record:
            raise DataError(f"{where}: missing key {key!r}")
    benchmark, problem_id = record["benchmark"], record["problem_id"]
    index, reward, answer = record["sample_index"], record["reward"], record["answer"]
    if not isinstance(benchmark, str) or not benchmark:
        raise DataError(f"{where}: 'benchmark' must be a non-empty string")
    if isinstance(problem_id, bool) or not isinstance(problem_id, (str, int)):
        raise DataError(f"{where}: 'problem_id' must be a string or an integer")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise DataError(f"{where}: 'sample_index' must be a non-negative integer")
    if isinstance(reward, str) or reward not in (0, 1):
        raise DataError(f"{where}: 'reward' must be 0 or 1, got {reward!r}")
    if answer is not None and not isinstance(answer, str):
        raise DataError(f"{where}: 'answer' must be a string or null")
    return benchmark, str(problem_id), Sample(index, float(reward), answer)


def _label_runs(samples_paths: list[Path] | dict[str, Path]) -> dict[str, Path]:
    if isinstance(samples_paths, dict):
        runs = {label: Path(path) for label, path in samples_paths.items()}
    else:
        runs = {Path(path).stem: Path(path) for path in samples_paths}
        if len(runs) != len(samples_paths):
            raise ValueError("two sample files share a name: pass a dict of run labels instead")
    if not runs:
        raise ValueError("no sample files given")
    return runs


def _all_ks(scores: list[BenchmarkScores]) -> list[int]:
    return sorted({k for s in scores for k in s.pass_at_k})


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values)
