"""Files and folders that others read: written durably, published atomically, listed in a
manifest that is checked before anything reads them. The one home for checkpoints', weight
publications' and reports' writes.

- :func:`atomic_write`: a file that readers see whole or not at all (temp file, rename).
- :func:`write_synced`: a file inside a folder that is published as a whole, flushed to disk
  by the process that wrote it (on a shared filesystem another node's fsync would not flush
  this node's pages).
- :func:`atomic_dir`, :func:`replace_dir`: a folder published by one rename, replacing what
  was there (``renameat2(RENAME_EXCHANGE)`` where the kernel has it, so readers never see the
  target missing).
- :func:`append_synced`: a record appended to a log, on disk before the call returns.
- :func:`open_in_place`: a file written over without freeing its pages first (tmpfs reuse).
- :class:`Manifest`: a published folder's files with their sizes and xxh3, written last.
- :func:`check_member`: a file name read from a manifest stays in its folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CHECKSUM = "xxh3_64"


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


def write_synced(path: str | Path, data: bytes | str) -> None:
    """Write ``path`` and flush it to disk before returning: for files inside a folder that
    is published as a whole afterwards (a checkpoint), where the rename must not publish
    pages still in this node's cache."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


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


def open_in_place(path: str | Path) -> IO[bytes]:
    """``path`` opened to be written from its first byte without being truncated first (call
    ``truncate()`` after the last write). A file written over keeps its memory pages on
    /dev/shm: truncating frees them and the next write allocates them again, which costs a
    page fault per 4 KiB and, on a VM whose host must back each new page, seconds per GB
    (measured on the 0.5B shape: a 1.4 GB publication 0.3 s into recycled pages, 5-10 s into
    new ones once updates had grown the trainer's heap)."""
    return open(path, "r+b" if Path(path).exists() else "wb")


def append_synced(f: IO[str], text: str) -> None:
    """Append ``text`` to an open file and flush it to disk: a log whose records must
    survive a kill once written (the eval recipe's samples, one problem per write)."""
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


class ManifestError(ValueError):
    """A manifest that cannot be read, or does not match its folder."""


def check_member(folder: Path, name: Any, *, plain: bool = False) -> None:
    """Refuse (ValueError saying why) a ``name`` read from a manifest unless ``folder /
    name`` is a file of ``folder``: a manifest is input, not trust, and ``folder / "/abs"``
    is ``/abs`` and ``..`` climbs out, so an unchecked name would have its reader read, or a
    rebuild write, any file it can. ``name`` must be relative, with no empty, ``.`` or
    ``..`` part and no NUL, one part when ``plain``, and stay inside ``folder`` with
    symlinks resolved. Nothing is opened."""
    if not isinstance(name, str) or not name:
        raise ValueError("is not a file name")
    if "\0" in name:
        raise ValueError("holds a NUL byte")
    if os.path.isabs(name):
        raise ValueError("is an absolute path")
    parts = name.split("/")
    if plain and (len(parts) > 1 or "\\" in name or name in (".", "..")):
        raise ValueError("is not a plain file name")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError("has an empty, '.' or '..' part")
    if not (folder / name).resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"leads out of {folder} (through a symlink)")


@dataclass
class Manifest:
    """A published folder's files (relative names) with their sizes and xxh3, plus what
    the owner records beside them (``step``, ``version``). Written last into the folder
    before it is published, so its presence says the folder is complete; checked before
    anything reads the files: sizes cheaply, checksums when the files are used."""

    files: dict[str, dict[str, Any]]  # name -> {"bytes": int, "xxh3_64": str, ...}
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, folder: Path, digests: dict[str, str], **fields: Any) -> Manifest:
        """The entries of ``digests``'s files (name -> xxh3) with their sizes in ``folder``."""
        files = {n: {"bytes": (folder / n).stat().st_size, CHECKSUM: d} for n, d in digests.items()}
        return cls(files, fields)

    def write(self, path: Path, *, fsync: bool) -> None:
        text = json.dumps({**self.fields, "checksum": CHECKSUM, "files": self.files}, indent=1)
        if fsync:
            write_synced(path, text)
        else:
            path.write_text(text)

    @classmethod
    def read(
        cls, path: Path, *, plain: bool = False, name_fields: tuple[str, ...] = ()
    ) -> Manifest:
        """Raises :class:`ManifestError` for a manifest that is unreadable, of another
        checksum, whose file entries lack a size or a checksum, or that names a file
        :func:`check_member` refuses (relative to the manifest's folder; ``plain``: file
        names only): the name itself and each entry's ``name_fields`` (a delta's target)."""
        try:
            meta = json.loads(path.read_text())
            files = meta.pop("files")
            checksum = meta.pop("checksum", CHECKSUM)
            ok = isinstance(files, dict) and all(
                isinstance(f, dict) and {"bytes", CHECKSUM} <= f.keys() for f in files.values()
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"{path}: unreadable manifest ({e!r})") from e
        if checksum != CHECKSUM:
            raise ManifestError(f"{path}: unknown checksum {checksum!r}")
        if not ok:
            raise ManifestError(f"{path}: every file must have its bytes and {CHECKSUM}")
        for name, entry in files.items():
            for key, value in [("", name)] + [(k, entry[k]) for k in name_fields if k in entry]:
                try:
                    check_member(path.parent, value, plain=plain)
                except ValueError as e:
                    field = f" has {key} {value!r}, which" if key else ""
                    raise ManifestError(
                        f"{path}: file entry {name!r}{field} {e}; refusing the manifest"
                    ) from None
        return cls(files, meta)

    def size_problems(self, folder: Path) -> list[str]:
        """Listed files that are missing or of another size (truncated): cheap, no reads."""
        out = []
        for name, entry in self.files.items():
            path = folder / name
            if not path.is_file():
                out.append(f"{path}: listed in the manifest but missing")
            elif path.stat().st_size != entry["bytes"]:
                out.append(
                    f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']} "
                    "(truncated?)"
                )
        return out

    def corrupt(self, digests: dict[str, str]) -> list[str]:
        """Names whose xxh3 in ``digests`` differs from the manifest's."""
        return [n for n in sorted(self.files) if digests[n] != self.files[n][CHECKSUM]]
