"""Every benchmark file loads whole, with non-empty, self-consistent golds, and every kind of
bad row is refused with the file and row named."""

from __future__ import annotations

import json

import pytest

from simko_tune.data import BENCHMARKS, DataError, load_benchmark

EXPECTED_ROWS = {
    "math500": 500,
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "minerva_math": 272,
    "olympiadbench": 675,
    "gsm8k": 1319,
    "college_math": 2818,
    "gaokao2023en": 383,  # 385 rows, 2 with an empty answer left out on purpose
    "svamp": 1000,
    "asdiv": 2215,
}


def test_every_benchmark_has_an_expected_count():
    assert set(EXPECTED_ROWS) == set(BENCHMARKS)


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_benchmark_loads_whole_with_self_consistent_golds(name, shared_data):
    from simko_tune.rewards import answers_match

    problems = load_benchmark(name, data_dir=shared_data)
    assert len(problems) == EXPECTED_ROWS[name]
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.source == name and p.problem.strip() for p in problems)
    failing = [
        (p.id, p.answer) for p in problems if not p.answer or not answers_match(p.answer, p.answer)
    ]
    assert not failing, (
        f"{name}: {len(failing)} golds are empty or do not match themselves: {failing[:20]}"
    )


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_a_response_boxing_the_gold_scores_one(name, shared_data):
    """What a perfect model writes must earn reward 1: the gold survives extraction from
    ``\\boxed{}`` and matches itself."""
    from simko_tune.rewards import math_reward

    problems = load_benchmark(name, data_dir=shared_data)
    failing = [
        (p.id, p.answer)
        for p in problems
        if math_reward(f"So the answer is $\\boxed{{{p.answer}}}$.", p.answer) != 1.0
    ]
    assert not failing, f"{name}: {len(failing)} boxed golds do not score 1: {failing[:20]}"


@pytest.mark.parametrize(
    "name, index, problem_start, answer",
    [
        ("math500", 0, "Convert the point $(0,3)$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("aime24", 0, "Every morning Aya", "204"),
        ("aime25", 0, "Find the sum of all integer bases", "70"),  # stored as the int 70
        ("amc23", 0, "Cities $A$ and $B$", "27"),  # stored as the float 27.0
        (
            "minerva_math",
            0,
            "Each of the two Magellan telescopes",
            "1.6",
        ),  # last \boxed of solution
        ("olympiadbench", 0, "Xenia and Sergey play", "2"),  # ["2"]
        ("gsm8k", 0, "Janet’s ducks lay 16 eggs", "18"),  # after "#### "
        ("svamp", 0, "There are 87 oranges and 290 bananas", "145"),
        ("asdiv", 0, "Seven red apples and two green apples", "9"),  # "9 (apples)"
        ("college_math", 0, "Simplify: $-10-4(n-5)$", "10-4 n"),  # "$10-4 n$"
    ],
)
def test_fields_are_read_per_benchmark(name, index, problem_start, answer, shared_data):
    problem = load_benchmark(name, data_dir=shared_data, limit=index + 1)[index]
    assert problem.problem.startswith(problem_start)
    assert problem.answer == answer


def test_olympiadbench_multiple_answers_are_joined_without_dollars(shared_data):
    answers = {p.id: p.answer for p in load_benchmark("olympiadbench", data_dir=shared_data)}
    rows = [json.loads(line) for line in (shared_data / "eval" / "olympiadbench.jsonl").open()]
    by_raw = {r["final_answer"][0]: answers[str(r["id"])] for r in rows}
    assert by_raw["$69$,$84$"] == "69, 84"
    assert by_raw["$(6,3),(9,3),(9,5),(54,5)$"] == "(6,3),(9,3),(9,5),(54,5)"
    assert by_raw["$2^{1009}$"] == "2^{1009}"
    assert not [a for a in answers.values() if "$" in a.replace("\\$", "")]


def test_limit_and_ids_are_stable(shared_data):
    first = load_benchmark("math500", data_dir=shared_data, limit=5)
    assert [p.id for p in first] == [
        p.id for p in load_benchmark("math500", data_dir=shared_data)[:5]
    ]
    assert first[0].id == "test/precalculus/807.json"


def test_unknown_benchmark():
    with pytest.raises(KeyError, match="unknown benchmark 'math501'"):
        load_benchmark("math501")


def write_aime24(tmp_path, lines: list[str]):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "aime24.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


GOOD = '{"id": 1, "problem": "What is 2+2?", "answer": "4"}'


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"id": 2, "problem": "What is 3+3?"}', "missing key 'answer'"),
        ('{"id": 2, "answer": "6"}', "missing key 'problem'"),
        ('{"id": 2, "problem": "  ", "answer": "6"}', "'problem' is empty"),
        ('{"id": 2, "problem": "What is 3+3?", "answer": ""}', "'answer' is empty"),
        ('{"id": 2, "problem": "What is 3+3?", "answer": null}', "'answer' must be a string"),
        (
            '{"id": 2, "problem": "What is 3+3?", "answer": true}',
            "'answer' must be a string or a number",
        ),
        ('{"id": 2, "problem": 7, "answer": "6"}', "'problem' must be a string"),
        ('{"id": 1, "problem": "What is 3+3?", "answer": "6"}', "id '1' repeats row 1"),
        ('{"id": 2, "problem": "What is 3+3?", "answer": NaN}', "not finite"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": 2, "problem": ', "not valid JSON"),
    ],
)
def test_bad_rows_name_file_row_and_key(tmp_path, bad, message):
    data = write_aime24(tmp_path, [GOOD, bad])
    with pytest.raises(DataError, match=f"aime24.jsonl:2: .*{message}"):
        load_benchmark("aime24", data_dir=data)
