"""Evaluation benchmarks (Qwen2.5-Math evaluation format), each read into :class:`MathProblem`.

Every benchmark stores its problem and gold answer differently (ints, floats, lists,
answers buried in a rationale), so each has a small spec; the gold extraction follows
Qwen2.5-Math's ``parse_ground_truth`` so that scores compare with published numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simko_tune.data.problems import DataError, MathProblem, answer_field, read_rows, text_field
from simko_tune.paths import data_dir as default_data_dir

# An unescaped ``$`` (``\$`` is a dollar sign in LaTeX and stays).
_MATH_DELIMITER = re.compile(r"(?<!\\)\$")
# ``$69$,$84$``: several inline-math answers in one string.
_ANSWER_SEPARATOR = re.compile(r"(?<!\\)\$\s*,\s*(?<!\\)\$")
# ``9 (apples)``: ASDiv puts the unit in brackets after the number.
_BRACKETED = re.compile(r"\(.*?\)")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives (relative to the data folder) and how to read one row."""

    file: str
    problem: Callable[[dict[str, Any]], Any]
    answer: Callable[[dict[str, Any]], Any]
    row_id: Callable[[dict[str, Any], int], Any]
    # Rows (0-based) left out on purpose, each for a reason given where it is set.
    excluded_rows: frozenset[int] = frozenset()


def _field(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: row[key]


def _row_id(key: str) -> Callable[[dict[str, Any], int], Any]:
    return lambda row, _index: row[key]


def _index_id(_row: dict[str, Any], index: int) -> int:
    return index


def _strip_math_delimiters(answer: str) -> str:
    return _MATH_DELIMITER.sub("", answer).strip()


def _olympiad_answer(row: dict[str, Any]) -> str:
    answers = row["final_answer"]
    if not isinstance(answers, list):
        raise TypeError(f"'final_answer' must be a list, got {type(answers).__name__}")
    parts = [
        _strip_math_delimiters(part)
        for answer in answers
        for part in _ANSWER_SEPARATOR.split(text_field(answer, "final_answer"))
    ]
    return ", ".join(parts)


def _minerva_answer(row: dict[str, Any]) -> str | None:
    from simko_tune.rewards import extract_answer

    return extract_answer(row["solution"])


def _gsm8k_answer(row: dict[str, Any]) -> str:
    from simko_tune.rewards import extract_gsm8k_gold

    return extract_gsm8k_gold(row["answer"])


def _svamp_problem(row: dict[str, Any]) -> str:
    body = text_field(row["Body"], "Body")
    if not body.endswith("."):
        body += "."
    return f"{body} {text_field(row['Question'], 'Question')}"


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec(
        "eval/math500.jsonl", _field("problem"), _field("answer"), _row_id("unique_id")
    ),
    "aime24": BenchmarkSpec(
        "eval/aime24.jsonl", _field("problem"), _field("answer"), _row_id("id")
    ),
    "aime25": BenchmarkSpec(
        "eval/aime25.jsonl", _field("problem"), _field("answer"), _row_id("id")
    ),
    "amc23": BenchmarkSpec("eval/amc23.jsonl", _field("problem"), _field("answer"), _row_id("id")),
    "minerva_math": BenchmarkSpec(
        "eval/minerva_math.jsonl", _field("problem"), _minerva_answer, _row_id("idx")
    ),
    "olympiadbench": BenchmarkSpec(
        "eval/olympiadbench.jsonl", _field("question"), _olympiad_answer, _row_id("id")
    ),
    "gsm8k": BenchmarkSpec("eval/gsm8k.jsonl", _field("question"), _gsm8k_answer, _row_id("idx")),
    "college_math": BenchmarkSpec(
        "eval/college_math.jsonl",
        _field("question"),
        lambda row: _strip_math_delimiters(text_field(row["answer"], "answer")),
        lambda row, _index: f"{row['data_source']}/{row['question_number']}",
    ),
    "gaokao2023en": BenchmarkSpec(
        "eval/gaokao2023en.jsonl",
        _field("question"),
        lambda row: _strip_math_delimiters(text_field(row["answer"], "answer")),
        _index_id,
        # Both rows have an empty answer (the gold is inside the question text).
        excluded_rows=frozenset({167, 192}),
    ),
    "svamp": BenchmarkSpec("eval/svamp.jsonl", _svamp_problem, _field("Answer"), _row_id("ID")),
    "asdiv": BenchmarkSpec(
        "eval/asdiv.jsonl",
        lambda row: f"{text_field(row['body'], 'body')} {text_field(row['question'], 'question')}",
        lambda row: _BRACKETED.sub("", text_field(row["answer"], "answer")),
        _row_id("idx"),
    ),
}

# The six benchmarks the SimKO paper averages over.
PAPER_BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench")


def load_benchmark(
    name: str, data_dir: Path | None = None, limit: int | None = None
) -> list[MathProblem]:
    """Load benchmark ``name`` (a key of :data:`BENCHMARKS`), optionally its first ``limit``
    problems. Any unusable row raises :class:`DataError`: a benchmark with silently dropped
    rows would report scores over a different problem set."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    spec = BENCHMARKS[name]
    path = (data_dir or default_data_dir()) / spec.file
    problems: list[MathProblem] = []
    seen: dict[str, int] = {}
    for index, (row_number, row) in enumerate(read_rows(path)):
        if limit is not None and len(problems) >= limit:
            break
        if index in spec.excluded_rows:
            continue
        try:
            problem = MathProblem(
                id=answer_field(spec.row_id(row, index), "id"),
                problem=text_field(spec.problem(row), "problem"),
                answer=answer_field(spec.answer(row), "answer"),
                source=name,
            )
        except KeyError as e:
            raise DataError(f"{path}:{row_number}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}:{row_number}: {e}") from None
        if problem.id in seen:
            raise DataError(
                f"{path}:{row_number}: id {problem.id!r} repeats row {seen[problem.id]}"
            )
        seen[problem.id] = row_number
        problems.append(problem)
    return problems
