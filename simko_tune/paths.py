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
