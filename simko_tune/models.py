"""torchtune model helpers the RL loop needs: final hidden states without the output layer,
the output projection (tied or not, sharded or not), builders from a Hugging Face
``config.json``, and torchtune → Hugging Face weight names for publishing and export."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torchtune.modules import TransformerDecoder
from torchtune.modules.tied_linear import TiedLinear

StateDict = dict[str, torch.Tensor]


def final_hidden(
    model: TransformerDecoder, tokens: torch.Tensor, input_pos: torch.Tensor | None = None
) -> torch.Tensor:
    """Hidden states after the final norm, [B, S, D].

    The chunked policy loss projects these to the vocabulary itself, chunk by chunk, so the
    model's own ``output`` layer (which would build [B, S, V] logits) is skipped.
    Right-padded rows need no mask: causal attention keeps padding out of earlier tokens.
    """
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, input_pos=input_pos)
    return model.norm(h)


def output_weight(model: TransformerDecoder) -> torch.Tensor:
    """The [V, D] output projection: the embedding table when tied (Qwen2.5 ≤ 3B, Llama 3.2),
    else ``output.weight``. Under FSDP2/TP it is a DTensor; the loss gathers it."""
    out = model.output
    if isinstance(out, TiedLinear):
        return out.tied_module.weight
    assert isinstance(out, nn.Linear), f"unexpected output layer {type(out).__name__}"
    return out.weight


def read_hf_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return json.loads(path.read_text())


def _dims(cfg: dict) -> dict:
    return {
        "vocab_size": cfg["vocab_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_heads": cfg["num_attention_heads"],
        "num_kv_heads": cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        "embed_dim": cfg["hidden_size"],
        "intermediate_dim": cfg["intermediate_size"],
        "norm_eps": cfg.get("rms_norm_eps", 1e-6),
    }


def _build_qwen2(cfg: dict, dims: dict, seq: int, tie: bool) -> TransformerDecoder:
    from torchtune.models.qwen2 import qwen2

    return qwen2(
        **dims, max_seq_len=seq, rope_base=cfg.get("rope_theta", 1e6), tie_word_embeddings=tie
    )


def _build_llama(cfg: dict, dims: dict, seq: int, tie: bool) -> TransformerDecoder:
    from torchtune.models.llama3_2 import llama3_2

    rope_base = cfg.get("rope_theta", 5e5)
    scaling = cfg.get("rope_scaling")
    if scaling is None and not tie:  # Llama 3.0: plain RoPE
        from torchtune.models.llama3 import llama3

        return llama3(**dims, max_seq_len=seq, rope_base=rope_base)
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(
            f"rope_scaling {scaling} with tie_word_embeddings={tie} is not supported "
            "(Llama 3.0 has none and is untied; 3.1/3.2 use 'llama3')"
        )
    return llama3_2(  # Llama 3.1/3.2: "llama3" RoPE scaling
        **dims,
        max_seq_len=seq,
        rope_base=rope_base,
        scale_factor=scaling.get("factor", 32),
        tie_word_embeddings=tie,
    )


def _qwen2_hf_to_tune(state: StateDict, kw: dict, tie: bool) -> StateDict:
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    return qwen2_hf_to_tune(state, **kw, tie_word_embeddings=tie)


def _qwen2_tune_to_hf(state: StateDict, kw: dict, tie: bool) -> StateDict:
    from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

    return qwen2_tune_to_hf(state, **kw, tie_word_embeddings=tie)


def _llama_hf_to_tune(state: StateDict, kw: dict, tie: bool) -> StateDict:
    from torchtune.models.convert_weights import hf_to_tune

    return hf_to_tune({k: v for k, v in state.items() if not (tie and k == "lm_head.weight")}, **kw)


def _llama_tune_to_hf(state: StateDict, kw: dict, tie: bool) -> StateDict:
    """torchtune's converter permutes q/k for HF's RoPE layout; a tied model has no head."""
    from torchtune.models.convert_weights import tune_to_hf

    out = tune_to_hf(state, **kw)
    if tie:
        out.pop("lm_head.weight", None)
    return out


@dataclass(frozen=True)
class ModelFamily:
    """What the project needs of one Hugging Face ``model_type``: its torchtune builder,
    the weight renaming both ways, and the name of its tensor-parallel plan
    (``simko_tune.parallel.tp_plans``)."""

    build: Callable[[dict, dict, int, bool], TransformerDecoder]  # (config, dims, seq, tied)
    hf_to_tune: Callable[[StateDict, dict, bool], StateDict]
    tune_to_hf: Callable[[StateDict, dict, bool], StateDict]
    tp_plan: str


MODEL_FAMILIES: dict[str, ModelFamily] = {
    "qwen2": ModelFamily(_build_qwen2, _qwen2_hf_to_tune, _qwen2_tune_to_hf, tp_plan="qwen2"),
    "llama": ModelFamily(_build_llama, _llama_hf_to_tune, _llama_tune_to_hf, tp_plan="llama3"),
}


def model_family(hf_config: dict) -> ModelFamily:
    """The family of an HF ``config.json``; a clear error for any other ``model_type``."""
    family = MODEL_FAMILIES.get(hf_config.get("model_type"))
    if family is None:
        raise ValueError(
            f"model_type {hf_config.get('model_type')!r} is not supported; "
            f"known: {sorted(MODEL_FAMILIES)}"
        )
    return family


def model_from_hf_config(
    model_dir: str | Path, max_seq_len: int | None = None
) -> TransformerDecoder:
    """Build the torchtune model matching an HF ``config.json`` (qwen2 or llama).

    Real configs name torchtune's builders directly (``qwen2_5_7b_base``); this one serves
    checkpoints of any shape, such as the tiny models the tests and the CPU default build.
    """
    cfg = read_hf_config(model_dir)
    seq = max_seq_len or cfg.get("max_position_embeddings", 4096)
    tie = bool(cfg.get("tie_word_embeddings", False))
    try:
        return model_family(cfg).build(cfg, _dims(cfg), seq, tie)
    except ValueError as e:
        raise ValueError(f"{model_dir}/config.json: {e}") from None


def _converter_kwargs(hf_config: dict) -> dict:
    """The shape arguments torchtune's weight converters take, in both directions."""
    dims = _dims(hf_config)
    return {
        "num_heads": dims["num_heads"],
        "num_kv_heads": dims["num_kv_heads"],
        "dim": dims["embed_dim"],
        "head_dim": hf_config.get("head_dim"),
    }


def hf_to_tune(state: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Hugging Face → torchtune names (torchtune's converters; inverse of
    :func:`tune_to_hf_converter`)."""
    tie = bool(hf_config.get("tie_word_embeddings", False))
    return model_family(hf_config).hf_to_tune(state, _converter_kwargs(hf_config), tie)


def load_hf_weights(model: TransformerDecoder, folder: str | Path, hf_config: dict) -> None:
    """Load every ``*.safetensors`` in ``folder`` into ``model`` (strict: all weights)."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(path)))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    model.load_state_dict(hf_to_tune(state, hf_config), strict=True)


def load_hf_model(model_dir: str | Path, max_seq_len: int | None = None) -> TransformerDecoder:
    """The torchtune model of an HF directory with its weights loaded (fp32, CPU)."""
    model = model_from_hf_config(model_dir, max_seq_len)
    load_hf_weights(model, model_dir, read_hf_config(model_dir))
    return model


def tune_to_hf_converter(hf_config: dict) -> Callable[[StateDict], StateDict]:
    """torchtune → HF state-dict renaming for the model described by ``hf_config``
    (torchtune's own converters: Qwen2 keeps q/k layouts, Llama permutes them for RoPE)."""
    family, kw = model_family(hf_config), _converter_kwargs(hf_config)
    tie = bool(hf_config.get("tie_word_embeddings", False))
    return lambda sd: family.tune_to_hf(sd, kw, tie)


def qwen2_5_math_7b() -> TransformerDecoder:
    """Qwen2.5-Math-7B: Qwen2.5-7B's shape with a 4K context and RoPE base 10,000
    (torchtune has no builder for it; ``qwen2_5_7b_base`` would use base 1e6 and 128K)."""
    from torchtune.models.qwen2 import qwen2

    return qwen2(
        vocab_size=152064,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        embed_dim=3584,
        intermediate_dim=18944,
        max_seq_len=4096,
        norm_eps=1e-6,
        rope_base=10_000.0,
    )
