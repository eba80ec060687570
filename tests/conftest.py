"""Settings shared by every test: small thread counts (2-core CI machine), project-owned caches."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Project-owned caches, set before torch/vllm import anywhere in the session.
_CACHE = Path(
    os.environ.get("SIMKO_CACHE_DIR", Path(tempfile.gettempdir()) / "simko_tune_test_cache")
)
os.environ.setdefault("SIMKO_CACHE_DIR", str(_CACHE))
os.environ.setdefault("VLLM_CACHE_ROOT", str(_CACHE / "vllm"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_CACHE / "inductor"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

TINY_CORPUS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n",
    "<|im_start|>assistant\nWe add the numbers: 12 + 30 = 42. The answer is \\boxed{42}.",
    "Let x = 3. Then 2x + 1 = 7, so the final answer is $\\frac{7}{2}$ and \\sqrt{2} < 2.",
    "Using 3, 5 and 7 make 22: 3*5 = 15, 15+7 = 22. Answer: (3*5)+7",
] * 8


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 Hugging Face directory (byte-level BPE, 2 layers, tied embeddings),
    built once per test session; tests must not modify it."""
    from simko_tune.demo.tiny import build_tiny_qwen2, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_qwen2")
    tok = train_tokenizer(TINY_CORPUS, root / "tokenizer", vocab_size=384)
    return build_tiny_qwen2(tok, root / "model", seed=0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The local data folder (benchmark files, SimKO's parquets, the real tokenizers), which
    the repository does not carry: a test that needs it is skipped, saying why, where it is
    absent (``$SIMKO_DATA_DIR``, or ``../shared/data`` beside the checkout)."""
    from simko_tune.paths import data_dir

    try:
        return data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"needs the shared data folder, which this repository does not carry ({e})")
