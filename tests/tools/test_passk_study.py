"""tools/passk_study.py: end to end at a tiny setting (real `tune run`s, resumable), and its
verdict sentences against hand-made numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from harness import load_module, run_process

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "passk_study.py"


def _load_tool():
    return load_module(TOOL)


def _run(seed_values: dict[str, list[float]], base: list[float] | None = None) -> dict:
    """Results of one method over seeds: pass@1 = v / 2, pass@4 = v."""
    runs = []
    for i, v in enumerate(seed_values):
        runs.append(
            {
                "base_passk": {"1": base[i] / 2, "4": base[i]} if base else None,
                "final_passk": {"1": v / 2, "4": v},
                "curves": {},
            }
        )
    return runs


def test_collect_and_verdict_from_numbers():
    tool = _load_tool()
    results = {
        "grpo": _run([0.50, 0.52, 0.48], base=[0.6, 0.6, 0.6]),
        "simko": _run([0.60, 0.63, 0.61]),
        "psr": _run([0.50, 0.53, 0.47]),
    }
    table = tool.collect(results)
    assert table["base"][4] == [0.6, 0.6, 0.6] and table["simko"][1] == [0.30, 0.315, 0.305]
    lines = tool.verdict(table, n=4)
    assert "concentration signature (pass@K" in lines[0]  # GRPO 0.50 < base 0.6 at K=4
    simko = next(line for line in lines if line.startswith("- **simko vs GRPO**"))
    psr = next(line for line in lines if line.startswith("- **psr vs GRPO**"))
    # simko - grpo at K=4: +0.10, +0.11, +0.13 -> mean 11.3, std 1.53, SE 0.88
    assert "paired difference +11.3 ± 0.9" in simko, simko
    assert "It keeps pass@4 above GRPO's" in simko
    # pass@1 difference +5.7: not within 2 points
    assert "pass@1 difference +5.7" in simko and "is not within 2 points" in simko
    # psr - grpo: 0.0, +0.01, -0.01 -> mean 0: not above; pass@1 within 2 points
    assert "It does not keep pass@4 above" in psr and "is within 2 points" in psr
    assert any("smoke-test setting, not a result" in line for line in lines)


def test_fewer_seeds_pair_with_the_references_first_seeds():
    """``--seeds-of nsr=2``: nsr's two seeds pair with GRPO's seeds 0 and 1, not its last."""
    tool = _load_tool()
    mean, se = tool.paired_difference([0.3, 0.5], [0.1, 0.2, 0.9])
    # differences 0.2, 0.3: mean 0.25, std 0.0707, SE 0.05
    assert mean == pytest.approx(0.25) and se == pytest.approx(0.05)
    with pytest.raises(ValueError, match="3 seeds to pair with 2"):
        tool.paired_difference([0.1, 0.2, 0.3], [0.1, 0.2])
    args = tool.parse_args(["--steps", "1", "--seeds", "3", "--seeds-of", "nsr=2"])
    assert args.seeds_of == {"nsr": 2}
    with pytest.raises(SystemExit):
        tool.parse_args(["--steps", "1", "--seeds", "3", "--seeds-of", "grpo=2"])


def test_judge_against_plain_arithmetic():
    """The paired difference's standard error is the std of the per-seed differences over
    the square root of the seeds; one seed has none and is never judged above."""
    tool = _load_tool()
    table = {
        "grpo": {1: [0.30, 0.32, 0.28, 0.31], 256: [0.80, 0.70, 0.75, 0.85]},
        "simko": {1: [0.31, 0.31, 0.29, 0.33], 256: [0.86, 0.78, 0.80, 0.88]},
        "one": {1: [0.5], 256: [0.9]},
    }
    j = tool.judge(table, "simko")
    diffs = [0.06, 0.08, 0.05, 0.03]
    mean = sum(diffs) / 4
    std = (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5
    assert j["diff_top"] == pytest.approx(mean) and j["se_top"] == pytest.approx(std / 2)
    assert j["keeps_top"] == (mean > 2 * std / 2) and j["keeps_top"]
    assert j["diff_pass1"] == pytest.approx(0.0075) and j["pass1_within"]
    one = tool.judge({"grpo": {1: [0.3], 256: [0.8]}, "one": table["one"]}, "one")
    assert not one["keeps_top"] and one["seeds"] == 1
    del table["one"]
    rows = tool.difference_rows(table | {"base": table["grpo"]}, [1, 256])
    assert rows[2] == "| simko | 4 | +0.7 ± 0.6 | +5.5 ± 1.0 |"


def test_methods_and_splits_make_the_runs(tmp_path, monkeypatch):
    """GRPO runs first in each seed (its run evaluates the base policy); seeds start at
    --first-seed; the validation split replaces the test set in every run."""
    tool = _load_tool()
    ran = []

    def fake_run(directory, overrides, args):
        ran.append((directory.parent.name, directory.name, overrides))
        return {}

    monkeypatch.setattr(tool, "ensure_run", fake_run)
    monkeypatch.setattr(tool, "write_report", lambda results, plan, args, docs: {})
    monkeypatch.setattr(tool, "collect", lambda results: {})
    monkeypatch.setattr(tool, "judge", lambda table, method: {})
    argv = ["--out", str(tmp_path), "--docs", str(tmp_path / "d.md"), "--steps", "3"]
    tool.main([*argv, "--methods", "simko,grpo", "--method", "mine=loss.alpha=0.3,loss.lam=2",
               "--seeds", "2", "--first-seed", "7", "--split", "val"])  # fmt: skip
    assert [(m, s) for m, s, _ in ran] == [
        ("grpo", "seed7"), ("simko", "seed7"), ("mine", "seed7"),
        ("grpo", "seed8"), ("simko", "seed8"), ("mine", "seed8"),
    ]  # fmt: skip
    for method, _, overrides in ran:
        assert ("eval.before_training=true" in overrides) == (method == "grpo")
        assert "eval.sets.countdown_test=null" in overrides
        assert "eval.sets.countdown_val.split=val" in overrides
    assert ran[2][2][-2:] == ["loss.alpha=0.3", "loss.lam=2"]
    ran.clear()
    tool.main([*argv, "--methods", "grpo", "--seeds", "1"])
    assert "eval.sets.countdown_test=null" not in ran[0][2]
    for bad in (["--methods", "simko"], ["--methods", "nope"], ["--method", "x=noequals"],
                ["--method", "grpo=loss.alpha=1"], ["--seeds", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            tool.main([*argv, *bad])


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resumes(tmp_path):
    from simko_tune.demo.warm_start import WarmStartConfig, build_tiny_policy

    policy = build_tiny_policy(
        tmp_path / "policy",
        WarmStartConfig(max_steps=60, target_success=None, sft_problems=300, eval_problems=16),
    )
    out, docs = tmp_path / "study", tmp_path / "docs" / "passk_study.md"
    command = [
        sys.executable, str(TOOL), "--steps", "2", "--seeds", "1", "--n", "4",
        "--out", str(out), "--docs", str(docs), "--methods", "grpo,simko",
        *(f"--override={o}" for o in (
            f"model_dir={policy}", "prepare_model=null", "generation.backend=native",
            "dataset.n=64", "rollout.prompts_per_step=4", "ppo.mini_batch_prompts=2",
            "eval.sets.countdown_test.n=8", "log.samples_every_n_steps=0",
        )),
    ]  # fmt: skip
    first = run_process(command, timeout_s=1500)
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["methods"] == ["base", "grpo", "simko"] and summary["n"] == 4
    assert set(summary["mean"]) == {"base", "grpo", "simko"}
    for method in ("grpo", "simko"):
        result = json.loads((out / method / "seed0" / "result.json").read_text())
        assert set(result["final_passk"]) == {"1", "2", "4"}
        assert set(result["curves"]["policy/logprob_rank2_gated"]) == {"1", "2"}
        assert (result["base_passk"] is not None) == (method == "grpo")
    text = docs.read_text()
    for needle in ("| base | 1 |", "| grpo | 1 |", "| simko | 1 |", "simko vs GRPO",
                   "| simko | 1 | +", "`logprob_rank2_gated`"):  # fmt: skip
        assert needle in text, needle
    for png in ("passk_study_passk.png", "passk_study_shape.png"):
        assert (docs.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_process(command, timeout_s=600)
    assert again.stdout.count("[skip]") == 2 and "[run ]" not in again.stdout
