"""Where benchmarks come from: the local data folder when one is configured, else their
Hugging Face hub copies, read through ``datasets.load_dataset`` and checked as strictly as
the local files. The hub copies here are local folders laid out as the hub serves them (a
README whose YAML names the configs and splits, parquet shards): no network."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from simko_tune import paths
from simko_tune.data import BENCHMARKS, DataError, load_benchmark
from simko_tune.data import benchmarks as benchmarks_module


def hub_repo(root: Path, rows: list[dict], split: str, config: str | None = None) -> Path:
    """A dataset repository as the hub serves it: ``README.md`` declaring the config's data
    files, and one parquet shard per split (``<config>/<split>-00000-of-00001.parquet``, as in
    openai/gsm8k; ``data/...`` for the default config)."""
    import datasets

    folder = config or "data"
    shard = root / folder / f"{split}-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(shard))
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        f"- config_name: {config or 'default'}\n"
        f"  data_files:\n  - split: {split}\n    path: {folder}/{split}-*\n"
        "---\n"
    )
    return root


@pytest.fixture(autouse=True)
def datasets_cache(monkeypatch, tmp_path):
    """A fresh ``datasets`` cache per test: its cache key for a local folder does not tell two
    tests' folders apart, and tests must not fill the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture
def no_local_folder(monkeypatch, tmp_path):
    """A checkout with no data folder beside it and no SIMKO_DATA_DIR, as a user who cloned
    only this repository has."""
    monkeypatch.delenv("SIMKO_DATA_DIR", raising=False)
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "clone" / "simko-tune")
    assert paths.local_data_dir() is None


def point_hub_copy(monkeypatch, name: str, repo: Path) -> None:
    spec = BENCHMARKS[name]
    monkeypatch.setitem(BENCHMARKS, name, replace(spec, hub=replace(spec.hub, repo=str(repo))))


def aime_rows(n: int) -> list[dict]:
    """AIME 2024 as HuggingFaceH4/aime_2024 serves it (id int, answer str, solution, url, year)."""
    return [
        {
            "id": 60 + i,
            "problem": f"Find the number {i}.",
            "solution": "...",
            "answer": str(100 + i),
            "url": f"https://artofproblemsolving.com/{i}",
            "year": "2024",
        }
        for i in range(n)
    ]


# ------------------------------------------------------------------------- data folder


def test_local_data_dir_is_the_env_var_else_the_sibling_folder_if_it_exists(monkeypatch, tmp_path):
    clone = tmp_path / "work" / "simko-tune"
    monkeypatch.setattr(paths, "REPO_ROOT", clone)
    monkeypatch.delenv("SIMKO_DATA_DIR", raising=False)
    assert paths.local_data_dir() is None
    with pytest.raises(FileNotFoundError, match="SIMKO_DATA_DIR is not set and .*shared/data"):
        paths.data_dir()

    sibling = tmp_path / "work" / "shared" / "data"
    sibling.mkdir(parents=True)
    assert paths.local_data_dir() == sibling == paths.data_dir()

    # The variable wins, and is taken as given: a wrong path is an error, not a download.
    monkeypatch.setenv("SIMKO_DATA_DIR", str(tmp_path / "nonexistent"))
    assert paths.local_data_dir() == tmp_path / "nonexistent"
    with pytest.raises(FileNotFoundError, match="SIMKO_DATA_DIR=.*nonexistent is not a folder"):
        paths.data_dir()
    with pytest.raises(FileNotFoundError, match="data folder .*nonexistent does not exist"):
        load_benchmark("aime24")


def test_a_configured_folder_is_read_and_the_hub_left_alone(monkeypatch, tmp_path):
    monkeypatch.setattr(
        benchmarks_module, "_hub_rows", lambda hub: pytest.fail(f"hub {hub.repo} was asked")
    )
    (tmp_path / "eval").mkdir()
    lines = [json.dumps(row) for row in aime_rows(30)]
    (tmp_path / "eval" / "aime24.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("SIMKO_DATA_DIR", str(tmp_path))
    problems = load_benchmark("aime24")
    assert [p.id for p in problems] == [str(60 + i) for i in range(30)]


def test_benchmark_without_hub_copy_says_to_configure_the_folder(no_local_folder):
    assert BENCHMARKS["college_math"].hub is None
    with pytest.raises(FileNotFoundError, match="'college_math' has no hub copy.*SIMKO_DATA_DIR"):
        load_benchmark("college_math")


def test_every_paper_benchmark_and_gsm8k_names_a_hub_copy():
    for name in ("math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "gsm8k"):
        hub = BENCHMARKS[name].hub
        assert hub is not None and "/" in hub.repo and hub.split, name
        assert hub.format.rows > 0


# ------------------------------------------------------------------------- hub copies


def test_hub_copy_is_loaded_when_no_folder_is_configured(monkeypatch, tmp_path, no_local_folder):
    point_hub_copy(monkeypatch, "aime24", hub_repo(tmp_path / "aime_2024", aime_rows(30), "train"))
    problems = load_benchmark("aime24")
    assert len(problems) == 30
    assert (problems[3].id, problems[3].problem, problems[3].answer) == (
        "63",
        "Find the number 3.",
        "103",
    )
    assert {p.source for p in problems} == {"aime24"}
    assert [p.id for p in load_benchmark("aime24", limit=2)] == ["60", "61"]


def test_hub_copy_of_another_size_is_refused(monkeypatch, tmp_path, no_local_folder):
    point_hub_copy(monkeypatch, "aime24", hub_repo(tmp_path / "aime_2024", aime_rows(29), "train"))
    with pytest.raises(
        DataError,
        match=r"hub dataset .*aime_2024, split train: aime24 has 29 rows here, expected 30",
    ):
        load_benchmark("aime24")
    # The check holds with a limit too: the first rows of a wrong copy are not the benchmark.
    with pytest.raises(DataError, match="expected 30"):
        load_benchmark("aime24", limit=1)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("answer", "", "'answer' is empty"),
        ("answer", None, "'answer' must be a string"),
        ("problem", " ", "'problem' is empty"),
        ("id", 60, "id '60' repeats row 0"),
    ],
)
def test_bad_hub_rows_name_dataset_split_row_and_key(
    monkeypatch, tmp_path, no_local_folder, field, value, message
):
    rows = aime_rows(30)
    rows[3][field] = value
    point_hub_copy(monkeypatch, "aime24", hub_repo(tmp_path / "aime_2024", rows, "train"))
    with pytest.raises(DataError, match=f"aime_2024, split train, row 3: {message}"):
        load_benchmark("aime24")


def test_hub_row_without_a_mapped_field_names_the_key(monkeypatch, tmp_path, no_local_folder):
    rows = [{"id": r["id"], "question": r["problem"], "answer": r["answer"]} for r in aime_rows(30)]
    point_hub_copy(monkeypatch, "aime24", hub_repo(tmp_path / "aime_2024", rows, "train"))
    with pytest.raises(DataError, match="split train, row 0: missing key 'problem'"):
        load_benchmark("aime24")


def test_hub_gsm8k_config_gives_the_problems_of_the_local_file(
    monkeypatch, tmp_path, shared_data, no_local_folder
):
    """openai/gsm8k serves config ``main``, split ``test``, with columns question and answer
    only: the same problems, golds and ids (the row index) as the local file."""
    local = load_benchmark("gsm8k", data_dir=shared_data)
    with (shared_data / "eval" / "gsm8k.jsonl").open(encoding="utf-8") as f:
        rows = [{"question": r["question"], "answer": r["answer"]} for r in map(json.loads, f)]
    point_hub_copy(monkeypatch, "gsm8k", hub_repo(tmp_path / "gsm8k", rows, "test", "main"))
    assert load_benchmark("gsm8k") == local


def test_hub_olympiadbench_reads_final_answer_lists_as_locally(
    monkeypatch, tmp_path, shared_data, no_local_folder
):
    """Hothan/OlympiadBench (config OE_TO_maths_en_COMP, 674 rows) stores answers as lists of
    LaTeX strings as Qwen2.5-Math's file does: the same answers come out of both."""
    local = load_benchmark("olympiadbench", data_dir=shared_data)
    keys = ("id", "question", "solution", "final_answer", "is_multiple_answer", "unit")
    with (shared_data / "eval" / "olympiadbench.jsonl").open(encoding="utf-8") as f:
        rows = [{k: r[k] for k in keys} for r in map(json.loads, f)][:674]
    repo = hub_repo(tmp_path / "OlympiadBench", rows, "train", "OE_TO_maths_en_COMP")
    point_hub_copy(monkeypatch, "olympiadbench", repo)
    assert load_benchmark("olympiadbench") == local[:674]


# ------------------------------------------------------------------------- training sets


def point_train_hub_copy(monkeypatch, name: str, repo: Path) -> None:
    from simko_tune.data import TRAIN_DATASETS

    entry = TRAIN_DATASETS[name]
    monkeypatch.setitem(
        TRAIN_DATASETS, name, replace(entry, hub=replace(entry.hub, repo=str(repo)))
    )


def test_registered_training_set_without_hub_copy_says_to_configure_the_folder(no_local_folder):
    from simko_tune.data import TRAIN_DATASETS, load_train_dataset

    assert TRAIN_DATASETS["simko_gsm8k_level1_train"].hub is None
    with pytest.raises(FileNotFoundError, match="'simko_gsm8k_level1_train' has no hub copy"):
        load_train_dataset("simko_gsm8k_level1_train")


@pytest.mark.slow
def test_hub_math_test_gives_the_problems_and_golds_of_simko_parquet(
    monkeypatch, tmp_path, shared_data, no_local_folder
):
    """TianHongZXY/MATH (problem, level, type, solution) as the hub serves it, built from the
    rows behind SimKO's math_test parquet: the same problems, and golds (the last ``\\boxed{}``
    of each solution) equal to SimKO's targets under the verifier, except where SimKO's
    normalisation damaged the target: spaces and the ``\\\\`` of matrix rows removed
    (``\\begin{pmatrix}6\\3\\0\\end{pmatrix}``, ``\\cotx``), ``\\text{}`` contents dropped."""
    import pyarrow.parquet as pq

    from simko_tune.data import load_train_dataset_with_report
    from simko_tune.rewards import answers_match

    local = pq.read_table(shared_data / "eval" / "simko" / "math_test.parquet").to_pylist()
    truth = [r["reward_model"]["ground_truth"] for r in local]
    rows = [
        {
            "problem": t["question"],
            "level": r["level"],
            "type": r["type"],
            "solution": t["solution"],
        }
        for r, t in zip(local, truth, strict=True)
    ]
    point_train_hub_copy(monkeypatch, "simko_math_test", hub_repo(tmp_path / "MATH", rows, "test"))
    hub, report = load_train_dataset_with_report("simko_math_test", on_bad_row="skip")
    assert (report.loaded, report.skipped) == (5000, [])
    assert [p.problem for p in hub] == [r["prompt"][-1]["content"].strip() for r in local]
    differ = [
        (p.answer, t["target"])
        for p, t in zip(hub, truth, strict=True)
        if not answers_match(p.answer, t["target"])
    ]
    damaged = [d for d in differ if d[0].replace(" ", "").replace("\\\\", "\\") == d[1]]
    assert len(damaged) >= 70  # the matrices
    assert len(differ) - len(damaged) <= 20, [d for d in differ if d not in damaged]


def test_hub_training_set_of_another_size_is_refused(monkeypatch, tmp_path, no_local_folder):
    from simko_tune.data import DataError, load_train_dataset

    rows = [
        {"problem": f"What is {i}+1?", "solution": f"It is $\\boxed{{{i + 1}}}$."} for i in range(9)
    ]
    rows.append({"problem": "No boxed answer here.", "solution": "So it goes."})
    point_train_hub_copy(
        monkeypatch, "simko_math_train", hub_repo(tmp_path / "MATH", rows, "train")
    )
    with pytest.raises(DataError, match=r"TianHongZXY|MATH \(split train\): row 9: 'answer'"):
        load_train_dataset("simko_math_train")
    with pytest.raises(DataError, match="10 rows, expected 7500 for simko_math_train"):
        load_train_dataset("simko_math_train", on_bad_row="skip")
