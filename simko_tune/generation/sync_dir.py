"""The sync directory: where publications live, who may write there, which versions exist.

A publication is ``sync_dir/v{version:06d}/`` (``.tmp`` while it is written). The directory
must be this user's own, not a symlink and not writable by others: whoever can write there
can change the weights the workers load. The trainer checks it when it prepares it, and a
worker before each publication it reads (:func:`check_sync_dir`): remote workers read it on
a shared filesystem that the trainer's check does not cover. ``sync_dir/spare/`` is a
pruned full publication that the next full one is written over (:func:`take_spare`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from simko_tune.generation.types import PublicationError

MANIFEST = "manifest.json"  # written last: its presence says a publication is complete
SPARE = "spare"  # a pruned full publication, kept for the next full one to write over
_VERSION_DIR = re.compile(r"^v(\d{6,})(\.tmp)?$")


def _is_ours(name: str) -> bool:
    """A folder this module writes in the sync dir: a publication, partial or not, or the
    spare (anything else there, such as logs, is left alone)."""
    return name == SPARE or _VERSION_DIR.match(name) is not None


def private_root() -> Path:
    """``<shared memory>/simko_tune-<uid>``, made 0700 and checked, so no other user can
    plant or read a publication at a predictable path. Shared memory has no disk I/O."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    parent = base / f"simko_tune-{os.getuid()}"
    try:
        parent.mkdir(mode=0o700)
    except FileExistsError:
        pass
    _check_owned(parent, private=True)
    return parent


def default_sync_dir(run_name: str) -> Path:
    """``private_root()/<run_name>``: right for single-node runs (use a folder on a shared
    filesystem when workers run on other nodes)."""
    return private_root() / run_name


def _check_owned(path: Path, *, private: bool) -> None:
    """``path`` is a real directory owned by this user; ``private``: no one else may enter
    it; otherwise: no one else may write to it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise PublicationError(f"sync dir {path}: missing (nothing is published there)") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PublicationError(f"sync dir {path}: not a directory (a symlink?); refusing it")
    if st.st_uid != os.getuid():
        raise PublicationError(
            f"sync dir {path}: owned by uid {st.st_uid}, not this user ({os.getuid()}); "
            "another user could change the weights the workers load: use another path"
        )
    if st.st_mode & (0o077 if private else 0o022):
        raise PublicationError(
            f"sync dir {path}: mode {stat.S_IMODE(st.st_mode):o} lets other users "
            f"{'in' if private else 'write'}; use a directory only you can write "
            f"(chmod {'700' if private else 'go-w'})"
        )


def check_sync_dir(path: str | Path) -> None:
    """Refuse (:class:`PublicationError`) a sync dir that is not this user's own or that
    others may write to: what a worker checks before it reads a publication there."""
    _check_owned(Path(path), private=False)


def prepare_sync_dir(path: str | Path) -> Path:
    """Create ``path`` if missing (0700), check it is ours, and clear any publication left by
    an earlier run: a stale version must never be loaded."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_sync_dir(path)
    for p in path.iterdir():
        if _is_ours(p.name):
            shutil.rmtree(p)
    return path


def version_dir(sync_dir: str | Path, version: int) -> Path:
    return Path(sync_dir) / f"v{version:06d}"


def published_versions(sync_dir: str | Path) -> list[int]:
    """Complete publications (final names) in ``sync_dir``, ascending."""
    out = []
    for p in Path(sync_dir).iterdir() if Path(sync_dir).is_dir() else []:
        m = _VERSION_DIR.match(p.name)
        if m and not m.group(2):
            out.append(int(m.group(1)))
    return sorted(out)


def prune_versions(sync_dir: str | Path, keep_version: int) -> None:
    """Remove leftover partial publications older than ``keep_version``, the version every
    worker acknowledged, and the complete ones older than the newest full publication at or
    before it: a restarted worker rebuilds ``keep_version`` from that full one and the
    deltas after it (without deltas, that is ``keep_version`` itself). The newest full one
    removed becomes the spare when there is none: no reader is left on it."""
    root = Path(sync_dir)
    if not root.is_dir():
        return
    versions = published_versions(root)
    floor = next(
        (v for v in reversed(versions) if v <= keep_version and _is_full(root, v)), keep_version
    )
    spare = root / SPARE
    if not spare.exists():
        newest_pruned = next(
            (v for v in reversed(versions) if v < floor and _is_full(root, v)), None
        )
        if newest_pruned is not None:
            version_dir(root, newest_pruned).rename(spare)
            (spare / MANIFEST).unlink(missing_ok=True)
    for p in root.iterdir():
        m = _VERSION_DIR.match(p.name)
        if m and int(m.group(1)) < (keep_version if m.group(2) else floor):
            shutil.rmtree(p, ignore_errors=True)


def take_spare(sync_dir: str | Path, folder: Path) -> bool:
    """Rename the spare (if any) to ``folder``, where a full publication is about to be
    written: its shards are written over in place (:func:`~simko_tune.fs.open_in_place`),
    so on /dev/shm the new version reuses the old one's memory pages instead of allocating
    them while the trainer's heap competes for the same memory; files the new version does
    not write are removed before its manifest. Returns whether there was a spare."""
    spare = Path(sync_dir) / SPARE
    try:
        spare.rename(folder)
    except FileNotFoundError:
        return False
    return True


def spare_bytes(sync_dir: str | Path) -> int:
    """Bytes the spare's files hold: space the next full publication writes over."""
    spare = Path(sync_dir) / SPARE
    return sum(p.stat().st_size for p in spare.iterdir()) if spare.is_dir() else 0


def _is_full(root: Path, version: int) -> bool:
    """Whether a publication holds whole shards only (unreadable: treated as not full, so
    pruning keeps what is before it)."""
    meta = manifest_fields(root, version)
    return meta is not None and meta.get("kind", "full") == "full"


def manifest_fields(root: Path, version: int) -> dict | None:
    """A publication's manifest as JSON (``kind``, a delta's ``base``), unchecked; None when
    it is missing or unreadable. For peeking (pruning, a worker's prefetch); loading goes
    through :func:`~simko_tune.generation.weights.read_publication`."""
    try:
        return json.loads((version_dir(root, version) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def remove_versions(sync_dir: Path) -> None:
    """Every publication, complete or partial (what a run leaves behind when it closes)."""
    for p in sync_dir.iterdir():
        if _is_ours(p.name):
            shutil.rmtree(p, ignore_errors=True)
