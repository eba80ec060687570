"""Training problem sets: SimKO's verl parquets, any JSONL/parquet with a field mapping, or a
Hugging Face hub dataset, all read into :class:`MathProblem`.

Bad rows either stop the load with a :class:`DataError` naming file, row and key, or are
skipped and counted in a :class:`LoadReport` (and logged): never dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simko_tune.data.problems import (
    DataError,
    MathProblem,
    answer_field,
    get_path,
    read_rows,
    text_field,
)
from simko_tune.paths import data_dir as default_data_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisteredDataset:
    """A data file under the shared data folder, with keys when the defaults do not fit."""

    file: str
    problem_key: str | None = None
    answer_key: str | None = None


TRAIN_DATASETS: dict[str, RegisteredDataset] = {
    "simko_math_train": RegisteredDataset("train/simko/math_train.parquet"),
    "simko_gsm8k_level1_train": RegisteredDataset("train/simko/gsm8k_level1_train.parquet"),
    "simko_math_test": RegisteredDataset("eval/simko/math_test.parquet"),
    "simko_aime2025_test": RegisteredDataset("eval/simko/aime2025_test.parquet"),
    "simko_amc23_test": RegisteredDataset("eval/simko/amc23_test.parquet"),
    # MATH500 despite its name; its prompt is pre-wrapped in "Question:/Answer:", the raw
    # problem is in extra_info.
    "simko_gsm8k_level1_test": RegisteredDataset(
        "eval/simko/gsm8k_level1_test.parquet", problem_key="extra_info.question"
    ),
}

_VERL_PROBLEM_KEY = "prompt"
_VERL_ANSWER_KEY = "reward_model.ground_truth"


@dataclass
class LoadReport:
    """What a load kept and what it skipped (``(row, reason)`` pairs)."""

    source: str
    loaded: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)


def load_train_dataset(
    source: str,
    *,
    split: str = "train",
    problem_key: str | None = None,
    answer_key: str | None = None,
    on_bad_row: str = "error",
    data_dir: Path | None = None,
) -> list[MathProblem]:
    """Load a training problem set; see :func:`load_train_dataset_with_report`."""
    problems, _ = load_train_dataset_with_report(
        source,
        split=split,
        problem_key=problem_key,
        answer_key=answer_key,
        on_bad_row=on_bad_row,
        data_dir=data_dir,
    )
    return problems


def load_train_dataset_with_report(
    source: str,
    *,
    split: str = "train",
    problem_key: str | None = None,
    answer_key: str | None = None,
    on_bad_row: str = "error",
    data_dir: Path | None = None,
) -> tuple[list[MathProblem], LoadReport]:
    """Load problems from ``source``: a registered name (:data:`TRAIN_DATASETS`), a
    ``.jsonl``/``.parquet`` path, or a Hugging Face hub dataset name (``split`` applies
    to hub datasets only).

    ``problem_key``/``answer_key`` are dotted paths into a row. Left out, verl rows
    (a ``prompt`` column) use the last user message and ``reward_model.ground_truth``;
    other rows use ``problem`` (or ``question``) and ``answer``. A ground truth that is a
    struct with ``target`` (SimKO's MATH parquets) is read through ``.target``.
    ``on_bad_row`` is ``"error"`` (raise :class:`DataError`) or ``"skip"`` (count it in the
    report and log a warning).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    name, location, rows = _open_source(source, split, data_dir)
    if source in TRAIN_DATASETS:
        problem_key = problem_key or TRAIN_DATASETS[source].problem_key
        answer_key = answer_key or TRAIN_DATASETS[source].answer_key

    report = LoadReport(source=name)
    problems: list[MathProblem] = []
    for row_number, row in rows:
        try:
            problems.append(_to_problem(row, row_number, name, problem_key, answer_key))
        except KeyError as e:
            reason = f"missing key {e.args[0]!r}"
        except (TypeError, ValueError) as e:
            reason = str(e)
        else:
            continue
        if on_bad_row == "error":
            raise DataError(f"{location}: row {row_number}: {reason}")
        report.skipped.append((row_number, reason))
    report.loaded = len(problems)
    if report.skipped:
        first_row, first_reason = report.skipped[0]
        logger.warning(
            "%s: skipped %d bad rows of %d (first: row %d: %s)",
            location,
            len(report.skipped),
            len(report.skipped) + report.loaded,
            first_row,
            first_reason,
        )
    return problems, report


def _open_source(
    source: str, split: str, data_dir: Path | None
) -> tuple[str, str, Iterable[tuple[int, dict[str, Any]]]]:
    """Resolve ``source`` to (name, location for messages, numbered rows)."""
    if source in TRAIN_DATASETS:
        path = (data_dir or default_data_dir()) / TRAIN_DATASETS[source].file
        return source, str(path), read_rows(path)
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise FileNotFoundError(f"training data file not found: {path}")
        return path.stem, str(path), read_rows(path)
    from datasets import load_dataset

    dataset = load_dataset(source, split=split)
    return f"{source}:{split}", f"hub dataset {source} (split {split})", enumerate(dataset)


def _to_problem(
    row: dict[str, Any],
    row_number: int,
    name: str,
    problem_key: str | None,
    answer_key: str | None,
) -> MathProblem:
    is_verl = _VERL_PROBLEM_KEY in row
    if problem_key is None:
        if is_verl:
            problem_key = _VERL_PROBLEM_KEY
        else:
            problem_key = "question" if "question" in row and "problem" not in row else "problem"
    if answer_key is None:
        answer_key = _VERL_ANSWER_KEY if is_verl else "answer"

    problem = get_path(row, problem_key)
    if isinstance(problem, list):
        problem = _last_user_message(problem, problem_key)
    answer = get_path(row, answer_key)
    if isinstance(answer, dict):
        if "target" not in answer:
            raise KeyError(f"{answer_key}.target")
        answer_key, answer = f"{answer_key}.target", answer["target"]
    return MathProblem(
        id=f"{name}/{row_number}",
        problem=text_field(problem, problem_key),
        answer=answer_field(answer, answer_key),
        source=name,
    )


def _last_user_message(messages: list[Any], key: str) -> Any:
    """The content of the last user turn of a chat-format prompt (verl's ``prompt``)."""
    for message in reversed(messages):
        if not isinstance(message, dict):
            raise TypeError(f"{key!r} must be a list of {{role, content}} messages")
        if message.get("role") == "user":
            return message.get("content")
    raise ValueError(f"{key!r} has no user message")
