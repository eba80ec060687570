"""Where the project finds its shared data, keeps its caches and opens local ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


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
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a sibling temp folder to fill; when the block succeeds it replaces ``out_dir``
    by rename, so a reader sees the old directory or the complete new one, never a partial
    one. On error the temp folder is removed and ``out_dir`` is left as it was."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the result from other users' readers
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
