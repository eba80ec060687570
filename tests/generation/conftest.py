"""Shared fixtures for the generation tests: a tiny model vLLM's CPU attention accepts, one
real vLLM worker for the whole session, and the trainer-side reference computations."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

# vLLM's CPU attention has no kernel for head_dim 16 (the shared tiny model's): use 32.
GEN_DIMS = {
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "embed_dim": 64,
    "intermediate_dim": 128,
}
MAX_MODEL_LEN = 256
ENGINE_KWARGS = {"enforce_eager": True, "dtype": "float32", "max_model_len": MAX_MODEL_LEN}


@pytest.fixture(scope="session")
def gen_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny random Qwen2 directory (head_dim 32, tokenizer of ``tiny_model_dir``)."""
    from simko_tune.demo.tiny import TinyQwen2Dims, build_tiny_qwen2

    dims = TinyQwen2Dims(**GEN_DIMS, max_seq_len=MAX_MODEL_LEN)
    return build_tiny_qwen2(
        tiny_model_dir, tmp_path_factory.mktemp("gen_model") / "model", dims, seed=0
    )


@pytest.fixture(scope="session")
def sync_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sync")


@pytest.fixture(scope="session")
def versions():
    """Fresh version numbers: tests share the worker, and versions only move forward."""
    return itertools.count(1)


@pytest.fixture(scope="session")
def vllm_worker(gen_model_dir, sync_dir, tmp_path_factory):
    """One real vLLM worker process shared by the session (an engine start costs ~20 s)."""
    from simko_tune.generation import VLLMWorkers

    workers = VLLMWorkers.start_local(
        gen_model_dir,
        sync_dir=sync_dir,
        engine_kwargs=ENGINE_KWARGS,
        log_dir=tmp_path_factory.mktemp("worker_logs"),
        request_timeout_s=300,
    )
    yield workers
    workers.close()


# ------------------------------------------------------------------ trainer-side references
def trainer_model(model_dir: Path):
    """The trainer's torchtune model with a checkpoint's weights, loaded with torchtune's own
    converter (independent of the generation package's loader)."""
    from safetensors.torch import load_file
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    from simko_tune.models import model_from_hf_config, read_hf_config

    cfg = read_hf_config(model_dir)
    model = model_from_hf_config(model_dir)
    state = load_file(str(Path(model_dir) / "model.safetensors"))
    model.load_state_dict(
        qwen2_hf_to_tune(
            state,
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg["num_key_value_heads"],
            dim=cfg["hidden_size"],
            tie_word_embeddings=cfg["tie_word_embeddings"],
        )
    )
    return model.eval()


@torch.no_grad()
def recompute_logprobs(
    model, prompt: list[int], response: list[int], temperature: float
) -> torch.Tensor:
    """log softmax(logits / T) of each response token, one full forward pass, no cache."""
    tokens = torch.tensor([prompt + response])
    logits = model(tokens)[0, len(prompt) - 1 : -1].float()
    logp = (logits / temperature).log_softmax(-1)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0]


@torch.no_grad()
def naive_greedy(model, prompt: list[int], max_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding the slow, obvious way: full forward each step, argmax, stop token kept."""
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([prompt + out]))[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        if tok in stop_ids:
            break
    return out


def perturbed_model(model_dir: Path, seed: int, std: float = 0.2):
    """The trainer's model with new random weights (as if trained): peakier than the
    initial ones, so greedy decoding changes."""
    model = trainer_model(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="session")
def ref():
    """The reference helpers above (test modules cannot import conftest under importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        trainer_model=trainer_model,
        recompute_logprobs=recompute_logprobs,
        naive_greedy=naive_greedy,
        perturbed_model=perturbed_model,
    )
