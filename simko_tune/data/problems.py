"""The one record type every dataset loads into, and the strict field readers behind it."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file holds a row we cannot use; the message names the file, row and key."""


@dataclass(frozen=True)
class MathProblem:
    """One problem with its gold answer. ``id`` is stable and unique within ``source``."""

    id: str
    problem: str
    answer: str
    source: str


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row_number, row)`` from a JSONL (1-based line numbers) or parquet (0-based
    row index) file. A line that is not a JSON object raises :class:`DataError`."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist())
        return
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r} (expected .jsonl or .parquet)"
        )
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}"
                )
            yield line_number, row


def get_path(row: dict[str, Any], key: str) -> Any:
    """Look up a dotted key (``reward_model.ground_truth.target``) in nested dicts.
    Raises ``KeyError(key)`` naming the full key when any part is missing."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def text_field(value: Any, key: str) -> str:
    """A required, non-empty string field (surrounding whitespace removed)."""
    if not isinstance(value, str):
        raise TypeError(f"{key!r} must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError(f"{key!r} is empty")
    return text


def answer_field(value: Any, key: str) -> str:
    """A gold answer as text. Integral floats lose their ``.0`` (AMC's ``27.0`` is ``27``);
    a list joins its items with ``", "`` (multi-answer problems)."""
    if isinstance(value, bool):
        raise TypeError(f"{key!r} must be a string or a number, got bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key!r} is not finite ({value})")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{key!r} is an empty list")
        return ", ".join(answer_field(item, key) for item in value)
    return text_field(value, key)
