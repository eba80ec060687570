"""The tiny models the project builds load identically in torchtune, transformers and the
`tokenizers` library: same ids, same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from simko_tune.demo.tiny import (
    LLAMA3_ROPE_SCALING,
    TinyQwen2Dims,
    build_tiny_llama3,
    build_tiny_qwen2,
    tokenizer_files,
)
from simko_tune.models import final_hidden, model_from_hf_config, output_weight, read_hf_config

TEXTS = [
    "<|im_start|>user\nWhat is 123+4? 3*5+7<|im_end|>\n",
    "The answer is \\boxed{\\frac{7}{2}} 2026 ünïcode",
]


def test_three_tokenizers_agree(tiny_model_dir):
    from tokenizers import Tokenizer
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    tt = qwen2_5_tokenizer(**tokenizer_files(tiny_model_dir))
    for text in TEXTS:
        ids = raw.encode(text).ids
        assert hf.encode(text) == ids
        assert tt.encode(text, add_bos=False, add_eos=False) == ids
        assert tt.decode(ids, skip_special_tokens=False) == text
    im_start = raw.token_to_id("<|im_start|>")
    assert raw.encode(TEXTS[0]).ids[0] == im_start
    # digits are split one by one, as in Qwen2
    assert len(raw.encode("123").ids) == 3


def _load_tune(model_dir):
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    cfg = read_hf_config(model_dir)
    model = model_from_hf_config(model_dir)
    sd = qwen2_hf_to_tune(
        load_file(model_dir / "model.safetensors"),
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        dim=cfg["hidden_size"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
    )
    model.load_state_dict(sd, strict=True)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(tiny_model_dir, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir
    if not tied:
        model_dir = build_tiny_qwen2(
            tiny_model_dir, tmp_path / "untied", TinyQwen2Dims(tie_word_embeddings=False), seed=1
        )
    tune = _load_tune(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, read_hf_config(model_dir)["vocab_size"], (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        full = tune(ids)
        chunked = final_hidden(tune, ids) @ output_weight(tune).T
    assert ref.abs().max() > 0.1  # random weights give non-trivial logits
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-5)


def test_directory_is_complete(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
    } <= names
    assert not any(n.startswith(".") for n in names)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    raw = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    assert cfg["vocab_size"] == len(raw["model"]["vocab"]) + len(raw["added_tokens"])


@pytest.mark.parametrize(
    "tied, rope_scaling",
    [(True, LLAMA3_ROPE_SCALING), (False, LLAMA3_ROPE_SCALING), (False, None)],
    ids=["llama3.2", "llama3.1", "llama3.0"],
)
def test_llama3_logits_match_transformers(tmp_path, tied, rope_scaling):
    """Llama 3.x directories (RoPE scaling or none, tied or not) load into torchtune with the
    logits transformers computes; positions up to 300 exercise the scaled low frequencies."""
    from transformers import AutoModelForCausalLM

    from simko_tune.models import load_hf_model

    model_dir = build_tiny_llama3(  # large weights: sharp attention, so RoPE matters
        tmp_path / "llama",
        vocab_size=256,
        tie_word_embeddings=tied,
        rope_scaling=rope_scaling,
        init_std=0.3,
    )
    tune = load_hf_model(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 300))
    with torch.no_grad():
        ref = hf(ids).logits
        full = tune(ids)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)


def test_llama3_with_unknown_rope_scaling_is_refused(tmp_path):
    scaling = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="rope_scaling"):
        build_tiny_llama3(tmp_path / "llama", vocab_size=256, rope_scaling=scaling)
    assert not (tmp_path / "llama").exists()


def test_model_family_registry():
    """Every family names a tensor-parallel plan that exists; any other model_type is a clear
    error naming the known ones."""
    from simko_tune.models import MODEL_FAMILIES, model_family
    from simko_tune.parallel import get_tp_plan

    assert set(MODEL_FAMILIES) == {"qwen2", "llama"}
    for family in MODEL_FAMILIES.values():
        assert get_tp_plan(family.tp_plan)
    with pytest.raises(
        ValueError, match=r"model_type 'gpt2' is not supported; known: \['llama', 'qwen2'\]"
    ):
        model_family({"model_type": "gpt2"})
