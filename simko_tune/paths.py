"""Where the project finds its shared data, keeps its caches and opens local ports."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# A training checkpoint's folder: step_00000120 (what the trainer writes, the eval reads).
STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checksum_file(path: str | Path) -> str:
    """xxh3-64 of a file, hashed through a memory map (no copy out of the page cache). Fast
    enough (memory bandwidth) to check every publication and checkpoint it guards against
    truncation and bit flips; not a defence against forgery."""
    import xxhash

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64_hexdigest(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return xxhash.xxh3_64_hexdigest(m)


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


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (and ``root``): what a rename publishes
    must be on disk before the rename is, or a crash can leave a complete-looking directory
    of empty files."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).
    False where the kernel, libc or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def replace_dir(src: str | Path, dst: str | Path, *, fsync: bool = True) -> None:
    """Put the finished directory ``src`` at ``dst``, replacing what is there, so that a
    reader of ``dst`` sees the old directory or the new one and never neither.

    ``dst`` absent: one rename. Present: the two are exchanged atomically (renameat2), then
    the old content, now at ``src``, is deleted. Where the exchange is unsupported the old
    directory is first renamed aside; a crash between the two renames then leaves it under
    ``.<name>.old.*`` beside ``dst``, not lost. With ``fsync``, ``src``'s files and
    directories are flushed before, and the parent directory after.
    """
    src, dst = Path(src), Path(dst)
    if fsync:
        fsync_tree(src)
    if not dst.exists() and not dst.is_symlink():
        os.rename(src, dst)
    elif _exchange(src, dst):
        shutil.rmtree(src)
    else:
        trash = dst.with_name(f".{dst.name}.old.{os.getpid()}.{time.monotonic_ns()}")
        os.rename(dst, trash)
        os.rename(src, dst)
        shutil.rmtree(trash)
    if fsync:
        _fsync_dir(dst.parent)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a sibling temp folder to fill; when the block succeeds it replaces ``out_dir``
    (:func:`replace_dir`), so a reader sees the old directory or the complete new one, never
    a partial one or none. On error the temp folder is removed and ``out_dir`` is left as
    it was."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the result from other users' readers
    try:
        yield tmp
        replace_dir(tmp, out, fsync=fsync)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write(path: str | Path, data: bytes | str, *, fsync: bool = True) -> None:
    """Write a file so that readers see the old content or the new, never a torn one: a temp
    file beside it, flushed, then renamed over it (a file rename is atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users' readers
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


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
