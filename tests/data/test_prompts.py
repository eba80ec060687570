"""Prompt templates and their token ids, against independent reference tokenizers built here:
the `tokenizers` library for Qwen2.5 and `tiktoken` for Llama 3 (recipes in data/README.md)."""

from __future__ import annotations

import json

import pytest

from simko_tune.data import (
    encode_with_special_tokens,
    render_prompt,
    stop_token_ids,
    tokenize_prompt,
)

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN_BOXED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{problem}\n"
    "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
LLAMA3_CHAT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{problem}\n"
    "Please reason step by step, and put your final answer within \\boxed{}.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

HAND_WRITTEN_PROBLEMS = [
    "What is 1+1?",
    "Compute $\\frac{1}{2} + \\sqrt{12345678}$ and give {x | x > 0}.",
    "Janet’s ducks lay 16 eggs.\n\n  Indented line\twith tab; café, naïve (cafe\u0301 composed), π≈3.14159, 日本語",
    "  leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def problems(shared_data):
    """Hand-written edge cases plus real problems from the benchmark files."""
    real = []
    for name, key in (("math500", "problem"), ("gsm8k", "question"), ("olympiadbench", "question")):
        with open(shared_data / "eval" / f"{name}.jsonl", encoding="utf-8") as f:
            real += [json.loads(line)[key] for _, line in zip(range(15), f)]
    return HAND_WRITTEN_PROBLEMS + real


@pytest.fixture(scope="module")
def qwen_reference(shared_data):
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    folder = shared_data / "tokenizers" / "qwen2.5"
    tokenizer = Tokenizer(
        models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
        ]
    )
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def llama3_reference(shared_data):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(shared_data / "tokenizers" / "llama3" / "tokenizer.model"))
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
    ]
    encoding = tiktoken.Encoding(
        name="llama3_reference",
        pat_str=LLAMA3_SPLIT,
        mergeable_ranks=ranks,
        special_tokens={name: len(ranks) + i for i, name in enumerate(names)},
    )
    return lambda text: encoding.encode(text, allowed_special="all")


def test_templates_render_exact_text():
    assert render_prompt("qwen_boxed", "P {x}") == QWEN_BOXED.replace("{problem}", "P {x}")
    assert render_prompt("llama3_chat", "P {x}") == LLAMA3_CHAT.replace("{problem}", "P {x}")
    assert render_prompt("plain", "P {x}") == "P {x}"
    with pytest.raises(KeyError, match="unknown prompt template"):
        render_prompt("chatml", "P")


def test_references_match_readme(qwen_reference, llama3_reference):
    assert qwen_reference("What is 1+1? <|im_start|>") == [
        3838,
        374,
        220,
        16,
        10,
        16,
        30,
        220,
        151644,
    ]
    assert qwen_reference("<|im_start|>hello<|im_end|>") == [151644, 14990, 151645]
    assert llama3_reference("What is 1+1? <|eot_id|>") == [
        3923,
        374,
        220,
        16,
        10,
        16,
        30,
        220,
        128009,
    ]


def test_qwen_prompt_matches_reference(qwen_tokenizer, qwen_reference, problems):
    for problem in problems:
        ids = tokenize_prompt(qwen_tokenizer, "qwen_boxed", problem)
        assert ids == qwen_reference(render_prompt("qwen_boxed", problem)), problem


def test_qwen_special_tokens_at_their_positions(qwen_tokenizer):
    ids = tokenize_prompt(qwen_tokenizer, "qwen_boxed", "What is 1+1?")
    system = qwen_tokenizer.encode(
        "system\nYou are a helpful assistant.", add_bos=False, add_eos=False
    )
    newline = qwen_tokenizer.encode("\n", add_bos=False, add_eos=False)
    assert ids[0] == 151644
    assert ids[1 : 1 + len(system)] == system
    assert ids[1 + len(system)] == 151645
    assert ids[2 + len(system) : 3 + len(system) + len(newline)] == newline + [151644]
    assert [i for i, t in enumerate(ids) if t == 151644] == [0, 11, 38]
    assert [i for i, t in enumerate(ids) if t == 151645] == [9, 36]
    assert ids[-3:] == [151644] + qwen_tokenizer.encode("assistant\n", add_bos=False, add_eos=False)
    # No bos/eos added around the template: it ends where the assistant's turn begins.
    assert 151643 not in ids


def test_llama3_prompt_matches_reference(llama3_tokenizer, llama3_reference, problems):
    for problem in problems:
        ids = tokenize_prompt(llama3_tokenizer, "llama3_chat", problem)
        assert ids == llama3_reference(render_prompt("llama3_chat", problem)), problem


def test_llama3_special_tokens_are_single_ids(llama3_tokenizer):
    ids = tokenize_prompt(llama3_tokenizer, "llama3_chat", "What is 1+1?")
    assert ids[:5] == [128000, 128006, 882, 128007, 271]  # bos, header "user", "\n\n"
    assert ids.count(128000) == 1  # exactly one bos: the template's, none added
    assert ids.count(128009) == 1 and ids.index(128009) == len(ids) - 5
    assert ids[-4:] == [128006, 78191, 128007, 271]  # "assistant" header, "\n\n"
    assert 128001 not in ids


def test_plain_template_has_no_special_tokens(qwen_tokenizer, qwen_reference, llama3_tokenizer):
    problem = HAND_WRITTEN_PROBLEMS[2]
    assert tokenize_prompt(qwen_tokenizer, "plain", problem) == qwen_reference(problem)
    assert tokenize_prompt(llama3_tokenizer, "plain", problem) == llama3_tokenizer.encode(
        problem, add_bos=False, add_eos=False
    )


def test_special_token_text_inside_text_becomes_one_id(llama3_tokenizer, qwen_tokenizer):
    assert encode_with_special_tokens(llama3_tokenizer, "a<|eot_id|>b") == [64, 128009, 65]
    assert encode_with_special_tokens(qwen_tokenizer, "a<|im_end|>b") == [64, 151645, 65]


def test_stop_token_ids(qwen_tokenizer, llama3_tokenizer):
    assert stop_token_ids(qwen_tokenizer) == [151645, 151643]  # <|im_end|>, <|endoftext|>
    assert set(stop_token_ids(llama3_tokenizer)) == {
        128009,
        128001,
        128008,
    }  # eot, end_of_text, eom
