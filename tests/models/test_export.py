"""HF export from a publication, and the atomic directory swap behind every HF write."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from simko_tune.export import export_hf_dir
from simko_tune.paths import atomic_dir


def test_atomic_dir_keeps_old_content_on_error(tmp_path):
    out = tmp_path / "d"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    assert out.stat().st_mode & 0o777 == 0o755  # readable by other users' processes
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("writer died")
    assert (out / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp folder left behind


def test_export_indexes_every_shard(tmp_path, tiny_model_dir):
    pub = tmp_path / "v000003"
    pub.mkdir()
    tensors = load_file(tiny_model_dir / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, pub / "model-00001.safetensors")
    save_file({k: tensors[k] for k in names[half:]}, pub / "model-00002.safetensors")
    (pub / "manifest.json").write_text("{}")
    out = export_hf_dir(pub, tiny_model_dir, tmp_path / "hf")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == names
    assert {index["weight_map"][k] for k in names[:half]} == {"model-00001.safetensors"}
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "manifest.json").exists()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, value in model.state_dict().items():
        if name in tensors:
            assert torch.equal(value, tensors[name])


def test_export_without_shards_is_an_error(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        export_hf_dir(tmp_path / "empty", tiny_model_dir, tmp_path / "hf")


def test_export_keeps_llama3_tiktoken_file(tmp_path):
    """Llama 3 releases keep the tokenizer at original/tokenizer.model, where the llama3
    configs look: an export of a Llama policy must carry it."""
    from simko_tune.tiny import build_tiny_llama3

    base = tmp_path / "base"
    base.mkdir()
    (base / "tok.model").write_bytes(b"tiktoken ranks")
    model_dir = build_tiny_llama3(tmp_path / "llama", base / "tok.model", vocab_size=256)
    out = export_hf_dir(model_dir, model_dir, tmp_path / "hf")
    assert (out / "original" / "tokenizer.model").read_bytes() == b"tiktoken ranks"
    assert (out / "config.json").read_text() == (model_dir / "config.json").read_text()
