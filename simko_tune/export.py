"""The policy as a Hugging Face directory: what vLLM, transformers and the eval recipe load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from simko_tune.generation.shards import write_shards
from simko_tune.parallel.collectives import rank as process_rank

# Everything of the base model directory except its weights: config, tokenizer, generation config.
_HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "special_tokens_map.json",
    "original/tokenizer.model",  # Meta's tiktoken file, where Llama 3 releases keep it
)


def export_hf(
    model: nn.Module,
    out_dir: str | Path,
    hf_config: dict,
    base_model_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``model``'s weights in Hugging Face names (floating tensors in ``dtype``: the
    base checkpoint's, so an export of a bf16 release is bf16 like it) into the new folder
    ``out_dir``, with the standard index file and the base model's config and tokenizer
    files. Collective (sharded parameters are gathered; the writing is spread over the ranks
    on rank 0's node). The caller publishes ``out_dir`` atomically (it lives inside a
    checkpoint's temp folder)."""
    out, base = Path(out_dir), Path(base_model_dir)
    rank = process_rank()
    files = write_shards(model, out, hf_config, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if rank != 0:
        return out
    weight_map = {name: f["name"] for f in files for name in f["tensors"]}
    total = sum(f["tensor_bytes"] for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name in _HF_SIDE_FILES:
        if (base / name).is_file():
            (out / name).parent.mkdir(exist_ok=True)
            shutil.copy2(base / name, out / name)
    return out
