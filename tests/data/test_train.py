"""Training sets: SimKO's verl parquets, mapped JSONL/parquet files, hub wiring, bad rows."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simko_tune.data import (
    DataError,
    load_benchmark,
    load_train_dataset,
    load_train_dataset_with_report,
)


def test_simko_math_train_has_four_rows_with_empty_targets(shared_data):
    # The real file: 4 of its 7,500 MATH problems have "\boxed{}" solutions, so an empty target.
    with pytest.raises(
        DataError,
        match=r"math_train.parquet: row 5341: 'reward_model.ground_truth.target' is empty",
    ):
        load_train_dataset("simko_math_train", data_dir=shared_data)
    problems, report = load_train_dataset_with_report(
        "simko_math_train", on_bad_row="skip", data_dir=shared_data
    )
    assert len(problems) == report.loaded == 7496
    assert len(report.skipped) == 4 and report.skipped[0][0] == 5341
    assert all("is empty" in reason for _, reason in report.skipped)
    assert len({p.id for p in problems}) == 7496
    first = problems[0]
    assert first.id == "simko_math_train/0" and first.source == "simko_math_train"
    assert first.problem.startswith("Let \\[f(x) = \\left\\{")
    assert first.answer == "0"


def test_simko_gsm8k_level1_train_plain_string_ground_truth(shared_data):
    problems = load_train_dataset("simko_gsm8k_level1_train", data_dir=shared_data)
    assert len(problems) == 8388
    assert problems[0].answer == "180"
    assert problems[0].problem.startswith("Mrs. Gable’s third grade class")


def test_simko_eval_parquets(shared_data):
    aime = load_train_dataset("simko_aime2025_test", data_dir=shared_data)
    amc = load_train_dataset("simko_amc23_test", data_dir=shared_data)
    assert (len(aime), len(amc)) == (30, 40)
    assert [p.answer for p in amc] == [
        p.answer for p in load_benchmark("amc23", data_dir=shared_data)
    ]
    aime25 = load_benchmark("aime25", data_dir=shared_data)
    differing = [
        (i, a.answer, b.answer)
        for i, (a, b) in enumerate(zip(aime, aime25))
        if a.answer != b.answer
    ]
    assert differing == [(19, "336^\\circ", "336")]  # the README's known difference (item 20)
    math_test, report = load_train_dataset_with_report(
        "simko_math_test", on_bad_row="skip", data_dir=shared_data
    )
    assert len(math_test) == 4999 and len(report.skipped) == 1


def test_simko_gsm8k_level1_test_is_math500_unwrapped(shared_data):
    problems = load_train_dataset("simko_gsm8k_level1_test", data_dir=shared_data)
    math500 = load_benchmark("math500", data_dir=shared_data)
    assert sorted(p.problem for p in problems) == sorted(p.problem for p in math500)
    assert not any(p.problem.startswith("Question:") for p in problems)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_with_dotted_field_mapping(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"q": {"text": "What is 2+2?"}, "sol": {"final": 4}},
            {"q": {"text": "Half of 3?"}, "sol": {"final": 1.5}},
            {"q": {"text": "Roots of x^2=1?"}, "sol": {"final": ["1", "-1"]}},
        ],
    )
    problems = load_train_dataset(str(path), problem_key="q.text", answer_key="sol.final")
    assert [(p.id, p.problem, p.answer) for p in problems] == [
        ("mine/1", "What is 2+2?", "4"),
        ("mine/2", "Half of 3?", "1.5"),
        ("mine/3", "Roots of x^2=1?", "1, -1"),
    ]


def test_default_keys_problem_or_question_and_answer(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"problem": "P", "question": "Q", "answer": "1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": "Q", "answer": 2}])
    assert load_train_dataset(str(a))[0].problem == "P"
    assert load_train_dataset(str(b))[0].problem == "Q"


def verl_row(content, ground_truth):
    return {
        "data_source": "x",
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
    }


def test_verl_parquet_struct_and_string_ground_truth(tmp_path):
    struct_path = tmp_path / "struct.parquet"
    pq.write_table(
        pa.Table.from_pylist([verl_row("What is 1+1?", {"question": "q", "target": "2"})]),
        struct_path,
    )
    string_path = tmp_path / "string.parquet"
    pq.write_table(pa.Table.from_pylist([verl_row("What is 2+1?", "3")]), string_path)
    (struct,) = load_train_dataset(str(struct_path))
    (string,) = load_train_dataset(str(string_path))
    assert (struct.id, struct.problem, struct.answer) == ("struct/0", "What is 1+1?", "2")
    assert (string.problem, string.answer) == ("What is 2+1?", "3")


BAD_ROWS = [
    ({"answer": "1"}, "missing key 'problem'"),
    ({"problem": "P"}, "missing key 'answer'"),
    ({"problem": "", "answer": "1"}, "'problem' is empty"),
    ({"problem": "P", "answer": "   "}, "'answer' is empty"),
    ({"problem": ["not", "messages"], "answer": "1"}, "list of {role, content} messages"),
    ({"problem": "P", "answer": False}, "'answer' must be a string or a number"),
    ({"problem": "P", "answer": {"question": "q"}}, "missing key 'answer.target'"),
    ({"problem": 12, "answer": "1"}, "'problem' must be a string"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_bad_row_raises_naming_file_row_and_key(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "data.jsonl", [{"problem": "P", "answer": "1"}, bad])
    with pytest.raises(DataError, match=rf"data.jsonl: row 2: .*{message}"):
        load_train_dataset(str(path))


def test_bad_rows_skipped_are_counted_and_logged(tmp_path, caplog):
    rows = (
        [{"problem": "P0", "answer": "0"}]
        + [bad for bad, _ in BAD_ROWS]
        + [{"problem": "P9", "answer": "9"}]
    )
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        problems, report = load_train_dataset_with_report(str(path), on_bad_row="skip")
    assert [p.problem for p in problems] == ["P0", "P9"]
    assert [p.id for p in problems] == ["data/1", "data/10"]  # ids keep the file's row numbers
    assert report.loaded == 2
    assert [row for row, _ in report.skipped] == list(range(2, 2 + len(BAD_ROWS)))
    assert "skipped 8 bad rows of 10" in caplog.text


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="on_bad_row"):
        load_train_dataset("simko_math_train", on_bad_row="drop")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_train_dataset(str(tmp_path / "missing.jsonl"))


def test_hub_dataset_goes_through_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [{"question": "What is 5-2?", "solution": "3"}, {"question": "", "solution": "1"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems, report = load_train_dataset_with_report(
        "someone/math-set", split="test", answer_key="solution", on_bad_row="skip"
    )
    assert calls == [("someone/math-set", "test")]
    assert [(p.id, p.problem, p.answer, p.source) for p in problems] == [
        ("someone/math-set:test/0", "What is 5-2?", "3", "someone/math-set:test")
    ]
    assert report.skipped == [(1, "'question' is empty")]
