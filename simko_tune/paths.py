"""Where the project finds its shared data, keeps its caches and scratch folders, and opens
local ports. (Writing files others read: ``simko_tune.fs``.)"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# A training checkpoint's folder: step_00000120 (what the trainer writes, the eval reads).
STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def local_data_dir() -> Path | None:
    """The local data folder, if one is configured: ``$SIMKO_DATA_DIR`` when set (taken as
    given, so that a mistyped path is an error rather than a silent download), else
    ``<repo root>/../shared/data`` when that folder exists; None otherwise.

    The folder holds the benchmark files, SimKO's training parquets and the real tokenizers;
    none of it is copied into the repository. Without it the benchmark loaders take their
    Hugging Face hub copies (``simko_tune.data.benchmarks``).
    """
    env = os.environ.get("SIMKO_DATA_DIR")
    if env:
        return Path(env)
    sibling = REPO_ROOT.parent / "shared" / "data"
    return sibling if sibling.is_dir() else None


def data_dir() -> Path:
    """The local data folder (see :func:`local_data_dir`); ``FileNotFoundError`` saying how
    to configure it when there is none. For files that exist only there (tokenizers)."""
    path = local_data_dir()
    if path is None or not path.is_dir():
        where = (
            f"SIMKO_DATA_DIR={path} is not a folder"
            if path is not None
            else f"SIMKO_DATA_DIR is not set and {REPO_ROOT.parent / 'shared' / 'data'} "
            "does not exist"
        )
        raise FileNotFoundError(
            f"no local data folder: {where}; set SIMKO_DATA_DIR to the folder that holds "
            "eval/, train/ and tokenizers/"
        )
    return path


def cache_dir() -> Path:
    """Project-owned cache root (vLLM, inductor, built tiny models): ``$SIMKO_CACHE_DIR``
    or ``~/.cache/simko_tune``."""
    env = os.environ.get("SIMKO_CACHE_DIR")
    path = Path(env) if env else Path.home() / ".cache" / "simko_tune"
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def work_dir(path: str | Path | None, prefix: str) -> Iterator[Path]:
    """A benchmark's scratch folder: ``path`` (created if missing, kept afterwards, to look
    into), or a fresh temp dir that is removed afterwards, however the run ends (a 0.5B
    run leaves GBs of checkpoints and publications)."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
