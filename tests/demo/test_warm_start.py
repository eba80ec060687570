"""The warm-started Countdown policy: a complete HF directory that transformers, torchtune
and the `tokenizers` library read identically, built by a real (few-step) supervised run."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from harness import run_process

from simko_tune.demo.countdown import countdown_reward, make_countdown_problems, parse_gold, solve
from simko_tune.demo.warm_start import (
    MARKER,
    CountdownTokens,
    WarmStartConfig,
    _sft_batch,
    build_tiny_policy,
    ensure_tiny_policy,
    sample_answers,
    warm_start_config,
)
from simko_tune.models import load_hf_model

REPO = Path(__file__).resolve().parents[2]
FEW_STEPS = WarmStartConfig(
    seed=1, sft_problems=200, max_steps=25, batch_size=32, target_success=None,
    eval_problems=32, report_samples=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("warm_start") / "policy", FEW_STEPS)


def _sft_loss(model, tokens: CountdownTokens, problems) -> float:
    examples = []
    for p in problems:
        numbers, target = parse_gold(p.answer)
        examples += [(tokens.prompt(p.problem), tokens.answer(s)) for s in solve(numbers, target)]
    toks, labels = _sft_batch(examples, tokens.pad_id)
    with torch.no_grad():
        logits = model(toks)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()


def test_directory_and_record(policy_dir):
    names = {p.name for p in policy_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
            "tokenizer_config.json", "generation_config.json", MARKER} <= names  # fmt: skip
    assert not any(p.name.startswith(".") for p in policy_dir.parent.iterdir())  # no temp left
    record = json.loads((policy_dir / MARKER).read_text())
    assert record["steps"] == 25 and record["seed"] == 1
    assert 0.0 <= record["train_success"] <= 1.0 and 0.0 <= record["test_success"] <= 1.0
    cfg = json.loads((policy_dir / "config.json").read_text())
    assert cfg["hidden_size"] == record["dims"]["embed_dim"]
    # vLLM's CPU attention supports head sizes 32, 64, 80, ...
    assert cfg["hidden_size"] // cfg["num_attention_heads"] in (32, 64, 128)


def test_supervised_steps_lower_the_loss(policy_dir):
    model = load_hf_model(policy_dir)
    tokens = CountdownTokens(policy_dir)
    loss = _sft_loss(model, tokens, make_countdown_problems(16, seed=5, split="test"))
    vocab = json.loads((policy_dir / "config.json").read_text())["vocab_size"]
    # a model initialised with std 0.02 starts at ~ln(vocab) ≈ 5.8
    assert loss < math.log(vocab) - 2.0


def test_transformers_loads_it_with_identical_ids_and_logits(policy_dir):
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simko_tune.data import tokenize_prompt
    from simko_tune.demo.tiny import tokenizer_files

    tokens = CountdownTokens(policy_dir)
    hf_tok = AutoTokenizer.from_pretrained(policy_dir)
    tt_tok = qwen2_5_tokenizer(**tokenizer_files(policy_dir))
    assert hf_tok.eos_token_id == tokens.stop_id == tt_tok.special_tokens["<|im_end|>"]
    problems = make_countdown_problems(6, seed=2, split="test")
    rows = []
    for p in problems:
        numbers, target = parse_gold(p.answer)
        answer = solve(numbers, target)[0]
        assert hf_tok.encode(p.problem) == tokens.prompt(p.problem)
        assert tokenize_prompt(tt_tok, "plain", p.problem) == tokens.prompt(p.problem)
        assert hf_tok.encode(answer + "<|im_end|>") == tokens.answer(answer)
        rows.append(tokens.prompt(p.problem) + tokens.answer(answer))
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokens.pad_id] * (width - len(r)) for r in rows])

    hf = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    tune = load_hf_model(policy_dir)
    with torch.no_grad():
        ref = hf(ids).logits
        got = tune(ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_sft_batch_labels_answer_tokens_only():
    tokens, labels = _sft_batch([([1, 2, 3], [7, 8, 9]), ([4, 5], [6])], pad_id=0)
    assert tokens.tolist() == [[1, 2, 3, 7, 8, 9], [4, 5, 6, 0, 0, 0]]
    # the label at t is the token at t+1, and only answer tokens are predicted
    assert labels.tolist() == [[-100, -100, 7, 8, 9, -100], [-100, 6, -100, -100, -100, -100]]


def test_kv_cache_sampler_matches_plain_greedy_decoding(policy_dir):
    """Near-zero temperature makes sampling greedy: the batched, left-padded KV-cache
    sampler must then agree with a plain loop over one unpadded prompt at a time."""
    model = load_hf_model(policy_dir).eval()
    tokens = CountdownTokens(policy_dir)
    prompts = [tokens.prompt(p.problem) for p in make_countdown_problems(8, seed=3)]
    assert len({len(p) for p in prompts}) > 1  # some padding is exercised
    got = sample_answers(
        model, prompts, tokens.stop_id, tokens.pad_id, 10, torch.Generator().manual_seed(0), 1e-6
    )
    for prompt, answer in zip(prompts, got):
        seq, expected = list(prompt), []
        with torch.no_grad():
            for _ in range(10):
                nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
                if nxt == tokens.stop_id:
                    break
                expected.append(nxt)
                seq.append(nxt)
        assert answer == expected


def test_solver_answers_round_trip_through_the_tokenizer(policy_dir):
    tokens = CountdownTokens(policy_dir)
    for p in make_countdown_problems(20, seed=4):
        numbers, target = parse_gold(p.answer)
        for s in solve(numbers, target):
            ids = tokens.answer(s)
            assert ids[-1] == tokens.stop_id
            assert countdown_reward(tokens.decode(ids[:-1]), p.answer) == 1.0


def test_ensure_reuses_a_finished_build(policy_dir, tmp_path):
    marker = policy_dir / MARKER
    before = marker.stat().st_mtime_ns
    assert ensure_tiny_policy(policy_dir, FEW_STEPS) == policy_dir
    assert marker.stat().st_mtime_ns == before


def test_ensure_rebuilds_a_build_of_other_settings(policy_dir, tmp_path):
    """A cached policy made with other warm-start settings (an older version's) is rebuilt,
    never reused: the CPU default's results depend on it."""
    copy = tmp_path / "policy"
    shutil.copytree(policy_dir, copy)
    record = json.loads((copy / MARKER).read_text())
    record["spec"]["val_fraction"] = 0.0  # as built before the validation split existed
    (copy / MARKER).write_text(json.dumps(record))
    assert ensure_tiny_policy(copy, FEW_STEPS) == copy
    rebuilt = json.loads((copy / MARKER).read_text())
    assert rebuilt["spec"]["val_fraction"] == 0.1 and rebuilt["steps"] == 25


def test_warm_start_config_from_settings():
    cfg = warm_start_config(target_success=0.5, dims={"num_layers": 3}, spec={"max_target": 40})
    assert cfg.target_success == 0.5 and cfg.dims.num_layers == 3 and cfg.spec.max_target == 40
    assert cfg.dims.embed_dim == WarmStartConfig().dims.embed_dim  # the rest: defaults
    with pytest.raises(TypeError, match="unknown warm-start settings"):
        warm_start_config(learning_rate=1.0)


@pytest.mark.slow
def test_cli_builds_a_policy(tmp_path):
    out = tmp_path / "cli_policy"
    proc = run_process(
        [sys.executable, str(REPO / "tools" / "build_tiny_policy.py"), "--out", str(out),
         "--max-steps", "3", "--target-success", "-1", "--threads", "1"],
        timeout_s=300,
    )  # fmt: skip
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["steps"] == 3 and 0.0 <= line["test_success"] <= 1.0
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
