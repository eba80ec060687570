"""Hugging Face directories out of published weights: what vLLM and transformers load."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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
)


def export_hf_dir(
    publication_dir: str | Path, base_model_dir: str | Path, out_dir: str | Path
) -> Path:
    """Assemble ``out_dir`` from a weight publication (safetensors shards + manifest) and the
    base model's config and tokenizer files; published atomically by one rename."""
    pub, base, out = Path(publication_dir), Path(base_model_dir), Path(out_dir)
    shards = sorted(pub.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{pub}: no safetensors shards to export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in shards + sorted(pub.glob("*.safetensors.index.json")):
            shutil.copy2(f, tmp / f.name)
        for name in _HF_SIDE_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
