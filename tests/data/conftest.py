"""Shared, session-scoped fixtures for the data tests: the real tokenizers load once (from
the shared data folder; ``shared_data`` in tests/conftest.py skips them where it is absent)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer(shared_data):
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    folder = shared_data / "tokenizers" / "qwen2.5"
    return qwen2_5_tokenizer(
        path=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")
    )


@pytest.fixture(scope="session")
def llama3_tokenizer(shared_data):
    from torchtune.models.llama3 import llama3_tokenizer

    return llama3_tokenizer(path=str(shared_data / "tokenizers" / "llama3" / "tokenizer.model"))
