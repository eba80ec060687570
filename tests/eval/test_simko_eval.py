"""The pass@K evaluation recipe: model resolution, config checks, resume, and one real run
through ``tune run simko_eval`` with a vLLM worker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import simko_eval
from harness import TUNE_RUN, run_process
from omegaconf import OmegaConf

from simko_tune.config import resolve_config_path
from simko_tune.data import DataError, load_benchmark, stop_token_ids, tokenize_prompt
from simko_tune.demo.tiny import tokenizer_files
from simko_tune.rewards import extract_answer, math_reward

ROW_FIELDS = {
    "benchmark",
    "problem_id",
    "sample_index",
    "reward",
    "answer",
    "response",
    "finish_reason",
    "num_tokens",
}


def tiny_cfg(model_dir, output_dir, *overrides: str, data_dir=None):
    """The eval_tiny_cpu config; ``data_dir`` (the shared folder) for tests that read
    benchmarks: the hub is never asked."""
    cfg = OmegaConf.load(resolve_config_path("eval_tiny_cpu"))
    dotlist = [f"model_dir={model_dir}", f"output_dir={output_dir}", *overrides]
    if data_dir is not None:
        dotlist.append(f"data_dir={data_dir}")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))


def run_recipe(cfg) -> simko_eval.PassAtKEvalRecipe:
    recipe = simko_eval.PassAtKEvalRecipe(cfg)
    recipe.setup()
    recipe.evaluate()
    recipe.report()
    recipe.cleanup()
    return recipe


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar in the event files under ``log_dir`` (torchtune's
    TensorBoardLogger writes new-style scalars, stored as tensors)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = sorted(log_dir.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {log_dir}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            scalars.setdefault(tag, []).extend(
                (e.step, float(make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)
            )
    return scalars


def qwen_tokenizer(model_dir):
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    return qwen2_5_tokenizer(**tokenizer_files(model_dir))


def fake_hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


# ------------------------------------------------------------------------- model_dir


def test_hf_dir_resolves_to_itself(tmp_path):
    hf = fake_hf_dir(tmp_path / "model")
    assert simko_eval.resolve_model_dir(hf) == (hf.resolve(), None)


def test_checkpoint_dir_resolves_to_its_hf_export(tmp_path):
    run = tmp_path / "checkpoints"
    fake_hf_dir(run / "step_00000010" / "hf")
    fake_hf_dir(run / "step_00000030" / "hf")
    (run / "step_00000040").mkdir()  # no hf/ export: not a usable checkpoint
    step10 = (run / "step_00000010" / "hf").resolve()
    assert simko_eval.resolve_model_dir(run / "step_00000010") == (step10, 10)
    assert simko_eval.resolve_model_dir(run / "step_00000010" / "hf") == (step10, 10)
    # A folder of checkpoints: the latest complete one.
    step30 = (run / "step_00000030" / "hf").resolve()
    assert simko_eval.resolve_model_dir(run) == (step30, 30)


def test_bad_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_dir=.*no such directory"):
        simko_eval.resolve_model_dir(tmp_path / "missing")
    (tmp_path / "empty" / "step_00000001").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face model directory"):
        simko_eval.resolve_model_dir(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face model directory"):
        simko_eval.resolve_model_dir(tmp_path / "empty" / "step_00000001")


# ------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("benchmarks=[math500,math5000]", r"'benchmarks\[1\]': unknown benchmark 'math5000'"),
        ("benchmarks=[]", "'benchmarks' must be a non-empty list"),
        ("benchmarks=[aime24,aime24]", "'benchmarks' lists a benchmark twice"),
        ("eval.n_per_benchmark.aime2024=300", "'eval.n_per_benchmark.aime2024'"),
        ("eval.n=0", "'eval.n' must be a positive integer"),
        ("eval.n=many", "'eval.n'"),
        ("eval.problems_per_call=0", "'eval.problems_per_call' must be a positive integer"),
        ("eval.ks=[1,0]", "'eval.ks' must hold positive integers"),
        ("eval.num_samples=4", "'eval.num_samples'"),  # the old key: refused, not ignored
        (
            "generation.backend=sglang",
            "'generation.backend': Invalid value 'sglang', expected one of",
        ),
        ("generation.vllm.num_workers=2", "'generation.vllm'"),
        ("generation.addresses=[tcp://h:1]", "'generation.addresses': simko_eval starts"),
        ("rewards.timeout_s=soon", "'rewards.timeout_s'"),
        ("prompt_template=chatml", "'prompt_template': unknown template 'chatml'"),
    ],
)
def test_config_errors_name_the_key(tmp_path, override, message):
    cfg = tiny_cfg(tmp_path, tmp_path / "out", override)
    with pytest.raises(ValueError, match=message):
        simko_eval.PassAtKEvalRecipe(cfg)


def test_model_dir_is_required(tmp_path):
    cfg = OmegaConf.load(resolve_config_path("eval_math"))
    cfg.output_dir = str(tmp_path)
    with pytest.raises(ValueError, match="missing: model_dir"):
        simko_eval.PassAtKEvalRecipe(cfg)


def test_paper_config_settings(tmp_path):
    cfg = OmegaConf.load(resolve_config_path("eval_math"))
    cfg.model_dir = str(tmp_path)
    recipe = simko_eval.PassAtKEvalRecipe(cfg)
    assert recipe.num_samples == {
        "math500": 256,
        "aime24": 300,
        "aime25": 300,
        "amc23": 300,
        "minerva_math": 256,
        "olympiadbench": 256,
    }
    assert (cfg.eval.temperature, cfg.eval.top_p, cfg.eval.max_tokens) == (0.6, 0.95, 4096)
    assert cfg.prompt_template == "qwen_boxed"


@pytest.mark.parametrize("name", ["eval_math", "eval_tiny_cpu"])
def test_eval_configs_share_the_training_sections(name):
    """``generation`` and ``rewards`` are the training recipe's sections and the sampling keys
    those of its ``eval`` section, so a block of YAML moves between the two recipes."""
    from dataclasses import fields

    from simko_tune.config import EvalSection as TrainEvalSection
    from simko_tune.config import GenerationSection, RewardSection

    cfg = OmegaConf.load(resolve_config_path(name))
    assert set(cfg.generation) <= {f.name for f in fields(GenerationSection)}
    assert set(cfg.rewards) == {f.name for f in fields(RewardSection)}
    sampling = {"n", "temperature", "top_p", "max_tokens"}
    assert sampling <= {f.name for f in fields(TrainEvalSection)} & set(cfg.eval)
    train = OmegaConf.load(resolve_config_path("tiny_cpu"))
    assert set(train.rewards) == set(cfg.rewards)


def test_without_a_data_folder_the_recipe_reads_the_hub_copies(
    tiny_model_dir, tmp_path, shared_data, monkeypatch
):
    """A user who cloned only this repository: no SIMKO_DATA_DIR, no ../shared/data. The
    recipe takes each benchmark's hub copy (served here from the local file's rows, as
    ``datasets`` would serve HuggingFaceH4/MATH-500) instead of failing on the folder."""
    import json as json_module

    from simko_tune import paths
    from simko_tune.data import benchmarks

    with (shared_data / "eval" / "math500.jsonl").open(encoding="utf-8") as f:
        rows = [json_module.loads(line) for line in f]
    asked = []
    monkeypatch.setattr(
        benchmarks, "_hub_rows", lambda hub: asked.append(hub.repo) or enumerate(rows)
    )
    monkeypatch.delenv("SIMKO_DATA_DIR", raising=False)
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "clone" / "simko-tune")
    recipe = simko_eval.PassAtKEvalRecipe(tiny_cfg(tiny_model_dir, tmp_path / "out"))
    recipe.setup()
    assert asked == ["HuggingFaceH4/MATH-500"]
    assert recipe._problems["math500"] == load_benchmark("math500", shared_data, limit=3)
    recipe.cleanup()


# ------------------------------------------------------------------------- samples file


def test_corrupt_line_before_the_end_names_file_and_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    row = {"benchmark": "math500", "problem_id": "a", "sample_index": 0, "reward": 0.0}
    path.write_text(json.dumps(row) + "\n{not json\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"samples.jsonl:2: not valid JSON"):
        simko_eval.read_samples(path)
    path.write_text(json.dumps({"benchmark": "math500"}) + "\n")
    with pytest.raises(DataError, match=r"samples.jsonl:1: missing key 'problem_id'"):
        simko_eval.read_samples(path)


def test_completed_problems_keeps_whole_problems_only(tmp_path):
    def rows(benchmark, problem_id, indices):
        return [
            {"benchmark": benchmark, "problem_id": problem_id, "sample_index": j, "reward": 0.0}
            for j in indices
        ]

    whole, partial, other = (
        rows("aime24", "1", range(3)),
        rows("aime24", "2", [0, 2]),
        rows("gsm8k", "7", [0]),
    )
    done, keep = simko_eval.completed_problems(
        whole + partial + other, {"aime24": 3}, tmp_path / "samples.jsonl"
    )
    assert done == {("aime24", "1")}
    assert keep == whole + other  # a benchmark this run does not select is left alone
    with pytest.raises(ValueError, match=r"aime24/1 has 3 samples but this run asks for 2"):
        simko_eval.completed_problems(whole, {"aime24": 2}, tmp_path / "samples.jsonl")


def test_resume_refuses_other_settings(tiny_model_dir, tmp_path, shared_data):
    out = tmp_path / "out"
    out.mkdir()
    row = {"benchmark": "math500", "problem_id": "a", "sample_index": 0, "reward": 0.0}
    (out / "samples.jsonl").write_text(json.dumps(row) + "\n")
    settings = {
        "model_dir": str(Path(tiny_model_dir).resolve()),
        "prompt_template": "qwen_boxed",
        "temperature": 0.6,
        "top_p": 0.95,
        "max_tokens": 16,
    }
    (out / "eval_settings.json").write_text(json.dumps(settings))
    recipe = simko_eval.PassAtKEvalRecipe(
        tiny_cfg(tiny_model_dir, out, "eval.temperature=1.0", data_dir=shared_data)
    )
    with pytest.raises(ValueError, match=r"temperature=0.6.*this run has temperature=1.0"):
        recipe.setup()


# ------------------------------------------------------------------------- resume (native)


@pytest.fixture
def counting_generator(monkeypatch, tiny_model_dir, shared_data):
    """The real NativeGenerator, counting the prompts it is asked for and writing the gold
    answer into sample ``k % n`` of problem ``k``, so that rewards of 1 exist and must land
    on exactly those rows (catches a response scored against another problem's gold)."""
    from simko_tune import generation

    tokenizer = qwen_tokenizer(tiny_model_dir)
    problems = load_benchmark("math500", data_dir=shared_data, limit=3)
    by_prompt = {
        tuple(tokenize_prompt(tokenizer, "qwen_boxed", p.problem)): (k, p.answer)
        for k, p in enumerate(problems)
    }
    calls: list[int] = []

    class CountingGenerator(generation.NativeGenerator):
        def generate(self, prompts, n, sampling):
            calls.append(len(prompts))
            completions = super().generate(prompts, n, sampling)
            for prompt, samples in zip(prompts, completions):
                k, gold = by_prompt[tuple(prompt)]
                answer = tokenizer.encode(f"So \\boxed{{{gold}}}", add_bos=False, add_eos=False)
                samples[k % n].token_ids = answer + stop_token_ids(tokenizer)[:1]
            return completions

    monkeypatch.setattr(generation, "NativeGenerator", CountingGenerator)
    return calls, problems


def test_resume_generates_only_unfinished_problems(
    tiny_model_dir, tmp_path, counting_generator, shared_data
):
    calls, problems = counting_generator
    out = tmp_path / "out"
    cfg = tiny_cfg(tiny_model_dir, out, "generation.backend=native", data_dir=shared_data)
    n = cfg.eval.n
    first = run_recipe(cfg)
    assert first.num_generated_problems == 3 and sum(calls) == 3

    samples = out / "samples.jsonl"
    rows = read_rows(samples)
    assert len(rows) == len(problems) * n
    assert all(set(row) == ROW_FIELDS for row in rows)
    golds = {p.id: p.answer for p in problems}
    for row in rows:
        k = [p.id for p in problems].index(row["problem_id"])
        assert row["reward"] == math_reward(row["response"], golds[row["problem_id"]])
        injected = row["sample_index"] == k % n
        assert row["reward"] == (1.0 if injected else 0.0)
        assert row["answer"] == extract_answer(row["response"])
        assert row["finish_reason"] in ("stop", "length")
        if not injected:  # the injected answers are longer than max_tokens
            assert 1 <= row["num_tokens"] <= cfg.eval.max_tokens
    assert {(r["problem_id"], r["sample_index"]) for r in rows} == {
        (p.id, j) for p in problems for j in range(n)
    }

    # One correct sample of 4 per problem: pass@k = 1 - C(3, k) / C(4, k).
    scalars = tensorboard_scalars(out / "tensorboard")
    for k, expected in ((1, 1 / 4), (2, 1 - 3 / 6), (4, 1.0)):
        assert scalars[f"eval/math500/pass@{k}"] == [(0, pytest.approx(expected))]
    assert "| model | math500 | 3 | 4 | 25.0 | 50.0 | 100.0 |" in (out / "passk.md").read_text()

    # A kill while the last problem was being written: two of its rows and half a line lost.
    lines = samples.read_text().splitlines(keepends=True)
    torn = lines[-2][: len(lines[-2]) // 2]
    samples.write_text("".join(lines[:-2]) + torn)
    calls.clear()
    second = run_recipe(
        tiny_cfg(tiny_model_dir, out, "generation.backend=native", data_dir=shared_data)
    )
    assert second.num_generated_problems == 1 and calls == [1]
    resumed = read_rows(samples)
    assert resumed[: 2 * n] == rows[: 2 * n]  # finished problems untouched
    assert len(resumed) == len(rows)
    assert sorted((r["problem_id"], r["sample_index"]) for r in resumed) == sorted(
        (r["problem_id"], r["sample_index"]) for r in rows
    )

    # Everything scored: no generator is even started.
    calls.clear()
    third = run_recipe(
        tiny_cfg(tiny_model_dir, out, "generation.backend=native", data_dir=shared_data)
    )
    assert third.num_generated_problems == 0 and calls == []
    assert read_rows(samples) == resumed


def test_checkpoint_model_dir_evaluates_its_export_at_its_step(
    tiny_model_dir, tmp_path, shared_data
):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000007"
    shutil.copytree(tiny_model_dir, checkpoint / "hf")
    out = tmp_path / "out"
    overrides = ("generation.backend=native", "limit=1", "eval.n=2")
    recipe = run_recipe(tiny_cfg(checkpoint, out, *overrides, data_dir=shared_data))
    assert recipe.model_dir == (checkpoint / "hf").resolve()
    assert len(read_rows(out / "samples.jsonl")) == 2
    assert "| step_00000007 | math500 | 1 | 2 |" in (out / "passk.md").read_text()
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["eval/math500/pass@1"]] == [7]
    assert [step for step, _ in scalars["eval/math500/pass@2"]] == [7]


# ------------------------------------------------------------------------- end to end (vLLM)


@pytest.mark.slow
def test_cli_end_to_end_with_vllm(tiny_model_dir, tmp_path, shared_data):
    out = tmp_path / "out"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cmd = [
        *TUNE_RUN, "simko_eval", "--config", "eval_tiny_cpu", f"model_dir={tiny_model_dir}",
        f"output_dir={out}", f"data_dir={shared_data}",
    ]  # fmt: skip
    run_process(cmd, cwd=cwd, timeout_s=600)

    cfg = OmegaConf.load(resolve_config_path("eval_tiny_cpu"))
    problems = load_benchmark("math500", data_dir=shared_data, limit=cfg.limit)
    n = cfg.eval.n
    rows = read_rows(out / "samples.jsonl")
    assert len(rows) == len(problems) * n == 3 * 4
    assert all(set(row) == ROW_FIELDS for row in rows)
    golds = {p.id: p.answer for p in problems}
    for row in rows:
        assert row["reward"] in (0.0, 1.0)
        assert row["reward"] == math_reward(row["response"], golds[row["problem_id"]])
        assert 1 <= row["num_tokens"] <= cfg.eval.max_tokens
    assert sorted((r["problem_id"], r["sample_index"]) for r in rows) == sorted(
        (p.id, j) for p in problems for j in range(n)
    )
    for name in ("passk.md", "passk.csv", "passk.png"):
        assert (out / name).stat().st_size > 0
    assert "math500" in (out / "passk.md").read_text()
    assert (out / "passk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    scalars = tensorboard_scalars(out / "tensorboard")
    for k in (1, 2, 4):
        assert f"eval/math500/pass@{k}" in scalars
    expected_pass1 = sum(r["reward"] for r in rows) / len(rows)
    assert scalars["eval/math500/pass@1"] == [(0, pytest.approx(expected_pass1))]


def test_completions_of_other_weights_are_refused(
    monkeypatch, tiny_model_dir, tmp_path, shared_data
):
    """A generator serving other weights than the evaluated model (a worker that loaded a
    publication) must not get its samples scored as this model's."""
    from simko_tune import generation

    class DriftedGenerator(generation.NativeGenerator):
        def generate(self, prompts, n, sampling):
            completions = super().generate(prompts, n, sampling)
            completions[-1][0].weight_version = 3
            return completions

    monkeypatch.setattr(generation, "NativeGenerator", DriftedGenerator)
    out = tmp_path / "out"
    with pytest.raises(generation.StaleWeightsError, match="sample 0 has version 3"):
        run_recipe(tiny_cfg(tiny_model_dir, out, "generation.backend=native"))
    assert not (out / "samples.jsonl").exists() or read_rows(out / "samples.jsonl") == []
