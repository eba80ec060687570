"""Answer extraction from responses and GSM8K rationales."""

from __future__ import annotations

import pytest

from simko_tune.rewards import extract_answer, extract_gsm8k_gold, math_reward

EXTRACT_CASES = [
    ("So the answer is $\\boxed{42}$.", "42"),
    ("nested: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    (
        "deep: \\boxed{\\left(\\frac{\\sqrt{3}}{2}, \\{1\\}\\right)}",
        "\\left(\\frac{\\sqrt{3}}{2}, \\{1\\}\\right)",
    ),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{3} and finally \\boxed{\\text{(C)}}", "\\text{(C)}"),
    ("$\\boxed 5$", "5"),
    ("thus \\boxed 5", "5"),
    ("\\fbox{17}", "17"),
    ("\\boxed{ 7 }", "7"),
    ("\\boxed{7} ... template \\boxed{}", "7"),  # empty box skipped
    ("no answer here", None),
    # escaped braces are text, not groups: a `\left\{` must not swallow the closing brace
    ("\\boxed{\\{1, 2\\}} end", "\\{1, 2\\}"),
    (
        "\\boxed{f=\\left\\{\\begin{array}{ll}1 & x<0 \\\\ 2 & x \\geq 0\\end{array}\\right.} so",
        "f=\\left\\{\\begin{array}{ll}1 & x<0 \\\\ 2 & x \\geq 0\\end{array}\\right.",
    ),
    ("\\boxed{a \\\\{b}}", "a \\\\{b}"),  # `\\` is a line break: the `{` after it opens a group
    ("", None),
    ("unclosed \\boxed{12", None),
    # the paper's rule: no box, no answer (free-form answers are the math_verify mode's)
    ("The final answer is $7$.", None),
    ("Answer: 1,000\nmore text", None),
    ("the answer is 4 but \\boxed{5}", "5"),  # a box wins over a phrase
]


@pytest.mark.parametrize(
    "text, expected", EXTRACT_CASES, ids=[repr(t)[:40] for t, _ in EXTRACT_CASES]
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_is_linear_on_huge_input():
    text = "\\boxed{" + "1" * 1_000_000 + "}"
    assert extract_answer(text) == "1" * 1_000_000
    assert extract_answer("{" * 100_000 + "\\boxed{3}") == "3"


def test_extract_gsm8k_gold():
    assert extract_gsm8k_gold("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18") == "18"
    assert extract_gsm8k_gold("...\n#### 1,000") == "1000"
    assert extract_gsm8k_gold("#### -5") == "-5"
    with pytest.raises(ValueError, match="####"):
        extract_gsm8k_gold("no marker 18")


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("Reasoning... so $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}", 1.0),
        ("Reasoning... so $\\boxed{2}$.", "\\frac{1}{2}", 0.0),
        ("The final answer is $204$.", "204", 0.0),  # boxed mode: no box, no reward
        ("I give up.", "204", 0.0),
        ("\\boxed{x=3}", "3", 1.0),
        ("\\boxed{70}", 70, 1.0),  # aime25 stores int golds
        ("\\boxed{27}", 27.0, 1.0),  # amc23 stores float golds
    ],
)
def test_math_reward(response, gold, expected):
    assert math_reward(response, str(gold)) == expected
