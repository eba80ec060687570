"""Training problem sets: SimKO's verl parquets, any JSONL/parquet with a field mapping, or a
Hugging Face hub dataset, all read into :class:`MathProblem`.

Bad rows either stop the load with a :class:`DataError` naming file, row and key, or are
skipped and counted in a :class:`LoadReport` (and logged): never dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
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
from simko_tune.paths import local_data_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainHubCopy:
    """The same problems on the Hugging Face hub, each row mapped to ``problem``/``answer``."""

    repo: str
    split: str
    to_row: Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class RegisteredDataset:
    """A data file under the local data folder, its row count (local and hub copies alike),
    keys when the defaults do not fit, and its hub copy where one is known."""

    file: str
    rows: int
    problem_key: str | None = None
    answer_key: str | None = None
    hub: TrainHubCopy | None = None


def _math_row(row: dict[str, Any]) -> dict[str, Any]:
    """A MATH row (problem, level, type, solution): the gold is the solution's last
    ``\\boxed{}``, as in the verl parquets built from it; None where there is none."""
    from simko_tune.rewards import extract_answer

    solution = row.get("solution")  # a missing field is a bad row, reported with its number
    answer = extract_answer(solution) if isinstance(solution, str) else None
    return {"problem": row.get("problem"), "answer": answer}


# TianHongZXY/MATH is the data_source SimKO's MATH parquets name; its dataset card lists
# problem, level, type, solution, with splits train (7,500 rows) and test (5,000).
TRAIN_DATASETS: dict[str, RegisteredDataset] = {
    "simko_math_train": RegisteredDataset(
        "train/simko/math_train.parquet",
        rows=7500,
        hub=TrainHubCopy("TianHongZXY/MATH", "train", _math_row),
    ),
    "simko_gsm8k_level1_train": RegisteredDataset(
        "train/simko/gsm8k_level1_train.parquet", rows=8388
    ),
    "simko_math_test": RegisteredDataset(
        "eval/simko/math_test.parquet",
        rows=5000,
        hub=TrainHubCopy("TianHongZXY/MATH", "test", _math_row),
    ),
    "simko_aime2025_test": RegisteredDataset("eval/simko/aime2025_test.parquet", rows=30),
    "simko_amc23_test": RegisteredDataset("eval/simko/amc23_test.parquet", rows=40),
    # MATH500 despite its name; its prompt is pre-wrapped in "Question:/Answer:", the raw
    # problem is in extra_info.
    "simko_gsm8k_level1_test": RegisteredDataset(
        "eval/simko/gsm8k_level1_test.parquet", rows=500, problem_key="extra_info.question"
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
    to hub datasets only). A registered name reads ``data_dir``, else the configured local
    folder (:func:`simko_tune.paths.local_data_dir`), else its hub copy, and must have the
    registered number of rows (bad ones included) in either copy.

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
    if source in TRAIN_DATASETS:
        expected, found = TRAIN_DATASETS[source].rows, report.loaded + len(report.skipped)
        if found != expected:
            raise DataError(
                f"{location}: {found} rows, expected {expected} for {source}; this is not the "
                "copy of the data set that the registry describes"
            )
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
        entry = TRAIN_DATASETS[source]
        folder = data_dir if data_dir is not None else local_data_dir()
        if folder is None and entry.hub is not None:
            from datasets import load_dataset

            hub = entry.hub
            rows = load_dataset(hub.repo, split=hub.split)
            where = f"hub dataset {hub.repo} (split {hub.split})"
            return source, where, ((i, hub.to_row(row)) for i, row in enumerate(rows))
        if folder is None:
            raise FileNotFoundError(
                f"training set {source!r} has no hub copy and no local data folder is "
                f"configured: set SIMKO_DATA_DIR to the folder that holds {entry.file}"
            )
        path = folder / entry.file
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
