"""Tiny Qwen2 and Llama 3 models, and tokenizers, that this project builds itself.

No weights can be downloaded on the development machine, so tests and the CPU default run on
small models built here. They are real Hugging Face directories (``config.json``,
``model.safetensors``, tokenizer files) that vLLM, transformers and torchtune's
checkpointers load exactly as they load Qwen2.5.

The tokenizer is a byte-level BPE trained with Qwen2's own pre-tokenizer: transformers 5.x
swaps in that pre-tokenizer for any ``model_type: qwen2`` directory, so a tokenizer trained
with another one would give different ids in vLLM than in the trainer (DESIGN §3).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from simko_tune.fs import atomic_dir

# Qwen2's pre-tokenizer split pattern (digits one by one), as in its tokenizer.json.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's special tokens, in id order (torchtune's Qwen2.5 tokenizer requires all of them).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip


@dataclass
class TinyQwen2Dims:
    """Shape of a tiny Qwen2 model (defaults: ~0.4M parameters with a 400-token vocabulary)."""

    num_layers: int = 2
    num_heads: int = 4  # head dim 32: vLLM's CPU attention supports 32, 64, 80, ... only
    num_kv_heads: int = 2  # divisible by a tensor-parallel size of 2
    embed_dim: int = 128
    intermediate_dim: int = 256
    max_seq_len: int = 512
    tie_word_embeddings: bool = True
    rope_base: float = 1_000_000.0
    norm_eps: float = 1e-6


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer with Qwen2's pre-tokenizer and write it in the
    Hugging Face layout (``tokenizer.json``, ``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json``) that transformers, vLLM and torchtune's
    ``qwen2_5_tokenizer(path, merges_file, special_tokens_path)`` all read."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt (torchtune's Qwen2 tokenizer reads these)

    specials = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for t, i in specials.items()
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def tokenizer_files(model_dir: str | Path) -> dict[str, str]:
    """Arguments for torchtune's ``qwen2_5_tokenizer`` pointing at a tiny model's files."""
    d = Path(model_dir)
    return {
        "path": str(d / "vocab.json"),
        "merges_file": str(d / "merges.txt"),
        "special_tokens_path": str(d / "tokenizer.json"),
    }


def hf_qwen2_config(
    vocab_size: int, dims: TinyQwen2Dims, eos_token_id: int, pad_token_id: int
) -> dict:
    """A ``config.json`` for ``Qwen2ForCausalLM`` with the given shape (fp32)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": dims.embed_dim,
        "intermediate_size": dims.intermediate_dim,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "num_key_value_heads": dims.num_kv_heads,
        "max_position_embeddings": dims.max_seq_len,
        "rope_theta": dims.rope_base,
        "rms_norm_eps": dims.norm_eps,
        "tie_word_embeddings": dims.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def build_tiny_qwen2(
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    dims: TinyQwen2Dims | None = None,
    seed: int = 0,
    init_std: float = 0.02,
) -> Path:
    """Write a randomly initialised tiny Qwen2 model as a Hugging Face directory.

    The weights come from torchtune's ``qwen2`` builder (the trainer's own model class),
    converted to HF names with torchtune's converter, so the trainer, transformers and vLLM
    all see one model. The directory is assembled in a temp folder and published by rename.
    """
    import torch
    from torchtune.models.qwen2 import qwen2

    from simko_tune.models import tune_to_hf_converter

    dims = dims or TinyQwen2Dims()
    tok_dir = Path(tokenizer_dir)
    tok_json = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab_size = len(tok_json["model"]["vocab"]) + len(tok_json["added_tokens"])
    specials = {t["content"]: t["id"] for t in tok_json["added_tokens"]}

    torch.manual_seed(seed)
    model = qwen2(
        vocab_size=vocab_size,
        num_layers=dims.num_layers,
        num_heads=dims.num_heads,
        num_kv_heads=dims.num_kv_heads,
        embed_dim=dims.embed_dim,
        intermediate_dim=dims.intermediate_dim,
        max_seq_len=dims.max_seq_len,
        norm_eps=dims.norm_eps,
        rope_base=dims.rope_base,
        tie_word_embeddings=dims.tie_word_embeddings,
    )
    _random_init(model, init_std)
    config = hf_qwen2_config(vocab_size, dims, specials["<|im_end|>"], specials["<|endoftext|>"])
    hf_state = tune_to_hf_converter(config)(model.state_dict())
    write_hf_dir(hf_state, config, tok_dir, out_dir)
    (Path(out_dir) / "tiny_dims.json").write_text(json.dumps(asdict(dims), indent=2))
    return Path(out_dir)


def _random_init(model, init_std: float) -> None:
    """Norm scales 1, biases 0, every other weight N(0, init_std²)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, init_std)


def write_hf_dir(
    hf_state: dict, config: dict, tokenizer_dir: str | Path, out_dir: str | Path
) -> Path:
    """Write a complete HF directory (weights, config, tokenizer files) atomically: it is
    assembled in a sibling temp folder and published by one rename."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        tensors = {k: v.detach().contiguous() for k, v in hf_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    return Path(out_dir)


LLAMA3_VOCAB_SIZE = 128_256  # the Llama 3 tiktoken vocabulary with its 256 reserved specials
LLAMA3_ROPE_SCALING = {  # Llama 3.1/3.2's "llama3" RoPE scaling, as in their config.json
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def build_tiny_llama3(
    out_dir: str | Path,
    tokenizer_model: str | Path | None = None,
    vocab_size: int = LLAMA3_VOCAB_SIZE,
    tie_word_embeddings: bool = True,
    rope_scaling: dict | None = LLAMA3_ROPE_SCALING,
    seed: int = 0,
    init_std: float = 0.02,
) -> Path:
    """Write a randomly initialised tiny Llama 3 model as a Hugging Face directory.

    The defaults mirror Llama 3.2 (tied embeddings, "llama3" RoPE scaling) in miniature:
    2 layers, width 64, head dim 32. ``tokenizer_model`` (Llama 3's tiktoken file) is copied
    to ``original/tokenizer.model``, where Meta's releases keep it and the configs look.
    """
    import torch
    from safetensors.torch import save_file

    from simko_tune.models import model_from_hf_config, tune_to_hf_converter

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 2048,  # room for the llama config's 1,024-token prompts
        "rope_theta": 500_000.0,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128_000,
        "eos_token_id": [128_001, 128_008, 128_009],
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        torch.manual_seed(seed)
        model = model_from_hf_config(tmp)
        _random_init(model, init_std)
        hf_state = tune_to_hf_converter(config)(model.state_dict())
        tensors = {k: v.detach().contiguous() for k, v in hf_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gen = {"bos_token_id": 128_000, "eos_token_id": config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer_model is not None:
            (tmp / "original").mkdir()
            shutil.copy2(tokenizer_model, tmp / "original" / "tokenizer.model")
    return Path(out_dir)
