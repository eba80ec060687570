"""The pass@K report end to end on a tiny hand-written sample file, numbers computed by hand."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from harness import run_process

from simko_tune.data import DataError
from simko_tune.metrics import passk_report

REPO = Path(__file__).resolve().parents[2]


def write_samples(path: Path, problems: dict[tuple[str, str], list[tuple[int, str | None]]]):
    with path.open("w") as f:
        for (benchmark, problem_id), samples in problems.items():
            for index, (reward, answer) in enumerate(samples):
                record = {
                    "benchmark": benchmark,
                    "problem_id": problem_id,
                    "sample_index": index,
                    "reward": reward,
                    "answer": answer,
                }
                f.write(json.dumps(record) + "\n")


# b1: three problems with 4 samples each.
#   p1: 1 of 4 correct; votes "3" x2 (wrong) beat "5" (right)           -> maj 0
#   p2: 2 of 4 correct; "7" x2 (right) ties "2" x2, "7" came first         -> maj 1
#   p3: none correct, no answers                                           -> maj 0
# pass@1 = (1/4 + 2/4 + 0) / 3 = 1/4
# pass@2 = (1 - C(3,2)/C(4,2) + 1 - C(2,2)/C(4,2) + 0) / 3 = (1/2 + 5/6) / 3 = 4/9
# pass@4 = (1 + 1 + 0) / 3 = 2/3
# b2: q1 has 3 samples (1 correct), q2 has 5 (5 correct): n = 3, K = 1, 2; q1 is "short".
# pass@1 = (1/3 + 1) / 2 = 2/3; pass@2 = (1 - C(2,2)/C(3,2) + 1) / 2 = (2/3 + 1) / 2 = 5/6
# maj: q1 votes "x" x2 (wrong) -> 0, q2 -> 1: 1/2. mean@n = (1/3 + 1) / 2 = 2/3
# average (K = 1, 2): pass@1 = (1/4 + 2/3) / 2 = 11/24, pass@2 = (4/9 + 5/6) / 2 = 23/36
RUN_A = {
    ("b1", "p1"): [(1, "5"), (0, "3"), (0, "3"), (0, None)],
    ("b1", "p2"): [(1, "7"), (0, "2"), (1, "7"), (0, "2")],
    ("b1", "p3"): [(0, None)] * 4,
    ("b2", "q1"): [(0, "x"), (1, "y"), (0, "x")],
    ("b2", "q2"): [(1, "z")] * 5,
}
EXPECTED_A = {
    "b1": {
        "n": 4,
        "problems": 3,
        "pass@1": 1 / 4,
        "pass@2": 4 / 9,
        "pass@4": 2 / 3,
        "mean@n": 1 / 4,
        "maj@n": 1 / 3,
    },
    "b2": {
        "n": 3,
        "problems": 2,
        "pass@1": 2 / 3,
        "pass@2": 5 / 6,
        "mean@n": 2 / 3,
        "maj@n": 1 / 2,
    },
    "average": {
        "n": 3,
        "problems": 5,
        "pass@1": 11 / 24,
        "pass@2": 23 / 36,
        "mean@n": (1 / 4 + 2 / 3) / 2,
        "maj@n": (1 / 3 + 1 / 2) / 2,
    },
}
# A second run: every sample of every problem correct.
RUN_B = {key: [(1, "ok")] * len(samples) for key, samples in RUN_A.items()}


@pytest.fixture
def report(tmp_path):
    write_samples(tmp_path / "a.jsonl", RUN_A)
    write_samples(tmp_path / "b.jsonl", RUN_B)
    return passk_report(
        {"grpo": tmp_path / "a.jsonl", "simko": tmp_path / "b.jsonl"}, tmp_path / "out"
    )


def test_scores_match_hand_computed_values(report):
    rows = {(r["run"], r["benchmark"]): r for r in csv.DictReader(report.csv.open())}
    assert set(rows) == {(run, b) for run in ("grpo", "simko") for b in ("b1", "b2", "average")}
    for benchmark, expected in EXPECTED_A.items():
        row = rows[("grpo", benchmark)]
        for column, value in expected.items():
            assert float(row[column]) == pytest.approx(value, rel=1e-12), (benchmark, column)
    assert rows[("grpo", "b2")]["pass@4"] == ""  # b2 has only 3 samples of its q1
    assert rows[("grpo", "average")]["pass@4"] == ""
    for benchmark in ("b1", "b2", "average"):
        assert float(rows[("simko", benchmark)]["pass@1"]) == 1.0
    b2 = next(s for s in report.scores if s.run == "grpo" and s.benchmark == "b2")
    assert b2.short_problems == ("q1",)


def test_markdown_table(report):
    text = report.markdown.read_text()
    lines = text.splitlines()
    assert (
        lines[0] == "| run | benchmark | problems | n | pass@1 | pass@2 | pass@4 | mean@n | maj@n |"
    )
    assert "| grpo | b1 | 3 | 4 | 25.0 | 44.4 | 66.7 | 25.0 | 33.3 |" in lines
    assert "| grpo | b2 | 2 | 3 | 66.7 | 83.3 |  | 66.7 | 50.0 |" in lines
    assert "| grpo | average | 5 | 3 | 45.8 | 63.9 |  | 45.8 | 41.7 |" in lines
    assert "grpo / b2: 1 problems have fewer samples" in text and "q1" in text


def test_plot_is_a_png(report):
    data = report.plot.read_bytes()
    assert len(data) > 0 and data.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    image = matplotlib.image.imread(report.plot)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_explicit_ks_keep_those_each_benchmark_has(tmp_path):
    write_samples(tmp_path / "a.jsonl", RUN_A)
    result = passk_report([tmp_path / "a.jsonl"], tmp_path / "out", ks=[1, 3, 4])
    by_name = {s.benchmark: s for s in result.scores}
    assert set(by_name) == {"b1", "b2", "average"} and {s.run for s in result.scores} == {"a"}
    assert list(by_name["b1"].pass_at_k) == [1, 3, 4]
    assert list(by_name["b2"].pass_at_k) == [1, 3]
    assert list(by_name["average"].pass_at_k) == [1, 3]
    # p1: 1 - C(3,3)/C(4,3) = 3/4; p2: only 2 wrong, any 3 hit = 1; p3: 0
    assert by_name["b1"].pass_at_k[3] == pytest.approx((3 / 4 + 1 + 0) / 3)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (
            '{"benchmark": "b1", "problem_id": "p1", "sample_index": 0, "reward": 1}',
            "missing key 'answer'",
        ),
        (
            '{"benchmark": "b1", "problem_id": "p1", "sample_index": 0, "reward": 0.5, "answer": null}',
            "'reward' must be 0 or 1",
        ),
        (
            '{"benchmark": "b1", "problem_id": "p1", "sample_index": 0, "reward": 1, "answer": null}',
            "appears twice",
        ),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_sample_lines_name_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    good = '{"benchmark": "b1", "problem_id": "p1", "sample_index": 0, "reward": 1, "answer": "4"}'
    path.write_text(good + "\n" + bad_line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
        passk_report([path], tmp_path / "out")


def test_cli_writes_the_report(tmp_path):
    write_samples(tmp_path / "a.jsonl", RUN_A)
    write_samples(tmp_path / "b.jsonl", RUN_B)
    out = tmp_path / "cli"
    result = run_process(
        [
            sys.executable,
            str(REPO / "tools" / "passk_report.py"),
            "--run",
            f"grpo={tmp_path / 'a.jsonl'}",
            "--run",
            f"simko={tmp_path / 'b.jsonl'}",
            "--out",
            str(out),
        ],
        timeout_s=120,
    )
    assert "| grpo | b1 | 3 | 4 | 25.0 | 44.4 | 66.7 | 25.0 | 33.3 |" in result.stdout
    assert {p.name for p in out.iterdir()} == {"passk.md", "passk.csv", "passk.png"}
