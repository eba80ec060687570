"""Every labelled case in both reward modes: the public-suite and answer-form cases of
labelled_cases.py, and the project's own table (test_answers_match.py) with each prediction
boxed in a sentence, as a model writes it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from simko_tune.rewards import REWARD_MODES, extract_for_mode, reward_fn_for_mode

sys.path.insert(0, str(Path(__file__).parent))
from labelled_cases import CASES, PROJECT_MODE_CASES, SUITE_DISAGREEMENTS  # noqa: E402

ALL_CASES = CASES + PROJECT_MODE_CASES


def _short(s: str) -> str:
    s = s if len(s) <= 30 else s[:27] + "..."
    return s.encode("ascii", "backslashreplace").decode()


def _params(mode: str):
    column = 2 if mode == "boxed" else 3
    return [
        pytest.param(c[0], c[1], c[column], id=f"{c[4]}|{_short(c[0])}|{_short(c[1])}")
        for c in ALL_CASES
    ]


def test_table_size_and_balance():
    assert len(ALL_CASES) >= 600
    for column in (2, 3):
        positives = sum(1 for c in ALL_CASES if c[column]) / len(ALL_CASES)
        assert 0.3 < positives < 0.8
    keys = {(c[0], c[1]) for c in CASES}
    assert set(SUITE_DISAGREEMENTS) <= keys


@pytest.mark.parametrize("gold, response, expected", _params("boxed"))
def test_boxed_mode(gold: str, response: str, expected: bool):
    assert REWARD_MODES["boxed"](response, gold) == float(expected)


@pytest.mark.parametrize("gold, response, expected", _params("math_verify"))
def test_math_verify_mode(gold: str, response: str, expected: bool):
    assert REWARD_MODES["math_verify"](response, gold) == float(expected)


def test_modes_differ_only_in_extraction():
    free_form = "The final answer is $\\frac{1}{2}$."
    assert reward_fn_for_mode("boxed")(free_form, "0.5") == 0.0
    assert reward_fn_for_mode("math_verify")(free_form, "0.5") == 1.0
    assert extract_for_mode(free_form, "boxed") is None
    assert extract_for_mode(free_form, "math_verify") == "\\frac{1}{2}"
    several = "\\boxed{1} and \\boxed{2}"
    assert extract_for_mode(several, "boxed") == "2"


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="rewards.mode must be one of .*'boxed'.*got 'boxd'"):
        reward_fn_for_mode("boxd")
