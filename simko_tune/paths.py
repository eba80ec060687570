"""Where the project finds its shared data and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The shared data folder: ``$SIMKO_DATA_DIR`` if set, else ``<repo root>/../shared/data``.

    The benchmark files, SimKO's training parquets and the real tokenizers live there and
    are never copied into the repository.
    """
    env = os.environ.get("SIMKO_DATA_DIR")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared data folder not found at {path}; set SIMKO_DATA_DIR to the folder that "
            "holds eval/, train/ and tokenizers/"
        )
    return path


def cache_dir() -> Path:
    """Project-owned cache root (vLLM, inductor, built tiny models): ``$SIMKO_CACHE_DIR``
    or ``~/.cache/simko_tune``."""
    env = os.environ.get("SIMKO_CACHE_DIR")
    path = Path(env) if env else Path.home() / ".cache" / "simko_tune"
    path.mkdir(parents=True, exist_ok=True)
    return path
