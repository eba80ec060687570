"""Hugging Face directories out of published weights: what vLLM and transformers load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open

from simko_tune.paths import atomic_dir

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


def export_hf_dir(
    publication_dir: str | Path, base_model_dir: str | Path, out_dir: str | Path
) -> Path:
    """Assemble ``out_dir`` from a weight publication (safetensors shards + manifest) and the
    base model's config and tokenizer files; published atomically by one rename."""
    pub, base, out = Path(publication_dir), Path(base_model_dir), Path(out_dir)
    shards = sorted(pub.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{pub}: no safetensors shards to export")
    with atomic_dir(out) as tmp:
        weight_map, total = {}, 0
        for f in shards:
            shutil.copy2(f, tmp / f.name)
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    weight_map[name] = f.name
            total += f.stat().st_size  # bytes on disk; readers use the map, not the total
        # transformers and vLLM find the shards through the standard index file
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name in _HF_SIDE_FILES:
            if (base / name).is_file():
                (tmp / name).parent.mkdir(exist_ok=True)
                shutil.copy2(base / name, tmp / name)
    return out
