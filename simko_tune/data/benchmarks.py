"""Evaluation benchmarks (Qwen2.5-Math evaluation format), each read into :class:`MathProblem`.

Every benchmark stores its problem and gold answer differently (ints, floats, lists,
answers buried in a rationale), so each has a small spec; the gold extraction follows
Qwen2.5-Math's ``parse_ground_truth`` so that scores compare with published numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from simko_tune.data.problems import DataError, MathProblem, answer_field, read_rows, text_field
from simko_tune.paths import local_data_dir

# An unescaped ``$`` (``\$`` is a dollar sign in LaTeX and stays).
_MATH_DELIMITER = re.compile(r"(?<!\\)\$")
# ``$69$,$84$``: several inline-math answers in one string.
_ANSWER_SEPARATOR = re.compile(r"(?<!\\)\$\s*,\s*(?<!\\)\$")
# ``9 (apples)``: ASDiv puts the unit in brackets after the number.
_BRACKETED = re.compile(r"\(.*?\)")


@dataclass(frozen=True)
class RowFormat:
    """How a row of one copy of a benchmark reads into a problem, and how many rows the whole
    copy has: a copy of another size is another problem set, and its scores would not compare."""

    problem: Callable[[dict[str, Any]], Any]
    answer: Callable[[dict[str, Any]], Any]
    row_id: Callable[[dict[str, Any], int], Any]
    rows: int
    # Rows (0-based) left out on purpose, each for a reason given where it is set.
    excluded_rows: frozenset[int] = frozenset()


@dataclass(frozen=True)
class HubCopy:
    """The benchmark on the Hugging Face hub: ``datasets.load_dataset(repo, config,
    split=split)``, read with its own field mapping (hub copies name fields differently)."""

    repo: str
    split: str
    format: RowFormat
    config: str | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark's file under the local data folder, how to read it, and its hub copy
    (used when no local folder is configured; None where no trustworthy copy is known)."""

    file: str
    format: RowFormat
    hub: HubCopy | None = None


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


def _benchmark(file: str, problem, answer, row_id, rows: int, **kwargs) -> BenchmarkSpec:
    return BenchmarkSpec(file, RowFormat(problem, answer, row_id, rows, **kwargs))


def _same_fields_on_hub(local: RowFormat, repo: str, split: str, rows: int) -> HubCopy:
    return HubCopy(repo, split, replace(local, rows=rows))


_MATH500 = RowFormat(_field("problem"), _field("answer"), _row_id("unique_id"), rows=500)
_AIME = RowFormat(_field("problem"), _field("answer"), _row_id("id"), rows=30)

# Hub copies, each chosen for its dataset card (features, split, row count):
# - HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id; split test,
#   500 rows. The fields of the local file (simpleRL's copy of the same 500 problems).
# - HuggingFaceH4/aime_2024: id (int), problem, solution, answer (str), url, year; split
#   train, 30 rows (AIME 2024 I and II, from AI-MO/aimo-validation-aime).
# - math-ai/aime25: problem, answer, id; split test, 30 rows (one test.jsonl; the local
#   file is AReaL's copy with the same fields).
# - math-ai/amc23: question, answer; split test, 40 rows (the AMC 2023 set of Qwen2.5-Math).
# - math-ai/minervamath: question, answer (the final answer, already out of the solution);
#   split test, 272 rows.
# - Hothan/OlympiadBench, config OE_TO_maths_en_COMP (text-only English math, open-ended):
#   the benchmark authors' release; id, question, solution (list), final_answer (list),
#   ...; split train, 674 rows. Qwen2.5-Math's local file has 675 (one more problem).
# - openai/gsm8k, config main: question, answer (rationale, gold after "#### "); split
#   test, 1,319 rows.
# college_math, gaokao2023en, svamp and asdiv have no hub copy known to match the local
# files; they need the local folder.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec(
        "eval/math500.jsonl",
        _MATH500,
        _same_fields_on_hub(_MATH500, "HuggingFaceH4/MATH-500", "test", rows=500),
    ),
    "aime24": BenchmarkSpec(
        "eval/aime24.jsonl",
        _AIME,
        _same_fields_on_hub(_AIME, "HuggingFaceH4/aime_2024", "train", rows=30),
    ),
    "aime25": BenchmarkSpec(
        "eval/aime25.jsonl", _AIME, _same_fields_on_hub(_AIME, "math-ai/aime25", "test", rows=30)
    ),
    "amc23": BenchmarkSpec(
        "eval/amc23.jsonl",
        RowFormat(_field("problem"), _field("answer"), _row_id("id"), rows=40),
        HubCopy(
            "math-ai/amc23",
            "test",
            RowFormat(_field("question"), _field("answer"), _index_id, rows=40),
        ),
    ),
    "minerva_math": BenchmarkSpec(
        "eval/minerva_math.jsonl",
        RowFormat(_field("problem"), _minerva_answer, _row_id("idx"), rows=272),
        HubCopy(
            "math-ai/minervamath",
            "test",
            RowFormat(_field("question"), _field("answer"), _index_id, rows=272),
        ),
    ),
    "olympiadbench": BenchmarkSpec(
        "eval/olympiadbench.jsonl",
        RowFormat(_field("question"), _olympiad_answer, _row_id("id"), rows=675),
        HubCopy(
            "Hothan/OlympiadBench",
            "train",
            RowFormat(_field("question"), _olympiad_answer, _row_id("id"), rows=674),
            config="OE_TO_maths_en_COMP",
        ),
    ),
    "gsm8k": BenchmarkSpec(
        "eval/gsm8k.jsonl",
        RowFormat(_field("question"), _gsm8k_answer, _row_id("idx"), rows=1319),
        # The local idx is the row index, so ids agree between the two copies.
        HubCopy(
            "openai/gsm8k",
            "test",
            RowFormat(_field("question"), _gsm8k_answer, _index_id, rows=1319),
            config="main",
        ),
    ),
    "college_math": _benchmark(
        "eval/college_math.jsonl",
        _field("question"),
        lambda row: _strip_math_delimiters(text_field(row["answer"], "answer")),
        lambda row, _index: f"{row['data_source']}/{row['question_number']}",
        rows=2818,
    ),
    "gaokao2023en": _benchmark(
        "eval/gaokao2023en.jsonl",
        _field("question"),
        lambda row: _strip_math_delimiters(text_field(row["answer"], "answer")),
        _index_id,
        rows=385,
        # Both rows have an empty answer (the gold is inside the question text).
        excluded_rows=frozenset({167, 192}),
    ),
    "svamp": _benchmark(
        "eval/svamp.jsonl", _svamp_problem, _field("Answer"), _row_id("ID"), rows=1000
    ),
    "asdiv": _benchmark(
        "eval/asdiv.jsonl",
        lambda row: f"{text_field(row['body'], 'body')} {text_field(row['question'], 'question')}",
        lambda row: _BRACKETED.sub("", text_field(row["answer"], "answer")),
        _row_id("idx"),
        rows=2215,
    ),
}

# The six benchmarks the SimKO paper averages over.
PAPER_BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench")


def load_benchmark(
    name: str, data_dir: Path | None = None, limit: int | None = None
) -> list[MathProblem]:
    """Load benchmark ``name`` (a key of :data:`BENCHMARKS`), optionally its first ``limit``
    problems, from ``data_dir``, else the configured local folder
    (:func:`simko_tune.paths.local_data_dir`), else the benchmark's hub copy.

    Both copies go through the same checks: every row must be usable (a :class:`DataError`
    names the file or hub dataset, the row and the key) and the copy must have the number of
    rows its spec states: a benchmark with silently dropped or added rows would report scores
    over a different problem set. ``limit`` applies after the checks.
    """
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    spec = BENCHMARKS[name]
    folder = data_dir if data_dir is not None else local_data_dir()
    if folder is not None:
        if not folder.is_dir():
            raise FileNotFoundError(f"benchmark {name!r}: data folder {folder} does not exist")
        path = folder / spec.file
        problems = _read_problems(
            name,
            read_rows(path),
            spec.format,
            lambda r: f"{path}:{r}" if r is not None else str(path),
        )
    elif spec.hub is not None:
        hub = spec.hub
        where = f"hub dataset {hub.repo}" + (f" ({hub.config})" if hub.config else "")
        problems = _read_problems(
            name,
            _hub_rows(hub),
            hub.format,
            lambda r: f"{where}, split {hub.split}" + (f", row {r}" if r is not None else ""),
        )
    else:
        raise FileNotFoundError(
            f"benchmark {name!r} has no hub copy and no local data folder is configured: set "
            f"SIMKO_DATA_DIR to the folder that holds {spec.file}"
        )
    return problems if limit is None else problems[:limit]


def _hub_rows(hub: HubCopy) -> Iterable[tuple[int, dict[str, Any]]]:
    """Rows of the hub copy, numbered from 0 as the hub's viewer numbers them."""
    from datasets import load_dataset

    return enumerate(load_dataset(hub.repo, hub.config, split=hub.split))


def _read_problems(
    name: str,
    rows: Iterable[tuple[int, dict[str, Any]]],
    row_format: RowFormat,
    where: Callable[[int | None], str],
) -> list[MathProblem]:
    """Every row of one copy as a problem, checked; ``where(row_number)`` names a row in
    messages, ``where(None)`` the copy."""
    problems: list[MathProblem] = []
    seen: dict[str, int] = {}
    count = 0
    for index, (row_number, row) in enumerate(rows):
        count += 1
        if index in row_format.excluded_rows:
            continue
        try:
            problem = MathProblem(
                id=answer_field(row_format.row_id(row, index), "id"),
                problem=text_field(row_format.problem(row), "problem"),
                answer=answer_field(row_format.answer(row), "answer"),
                source=name,
            )
        except KeyError as e:
            raise DataError(f"{where(row_number)}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise DataError(f"{where(row_number)}: {e}") from None
        if problem.id in seen:
            raise DataError(
                f"{where(row_number)}: id {problem.id!r} repeats row {seen[problem.id]}"
            )
        seen[problem.id] = row_number
        problems.append(problem)
    if count != row_format.rows:
        raise DataError(
            f"{where(None)}: {name} has {count} rows here, expected {row_format.rows}; "
            "this is not the copy of the benchmark that the spec describes"
        )
    return problems
