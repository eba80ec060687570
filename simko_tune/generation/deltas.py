"""Weight publications as deltas: each shard written as the bytes that differ from the same
shard of the previous publication, as (gap, XOR) pairs, zstd-compressed
(:mod:`~simko_tune.generation.xor_codec` has the format and why).

Why this encoding (``tools/bench_weight_delta.py`` measures it): a bf16 weight keeps its
bits unless an update moves it by more than about |w|/256, so at RL learning rates 2-4 % of
the bytes of consecutive versions differ. Listing just those bytes, in one compiled pass
that skips equal ones 8 at a time, is 3x faster than zstd over the whole XOR and smaller
(2.9 % against 4.8 % of the bytes). It works on the file's bytes, header included: no
knowledge of dtypes or tensor bounds. Each shard is cut into frames (4 MiB), each its own
zstd frame, so the trainer encodes and a worker rebuilds a shard on all their threads (the
manifest lists the frames' sizes).

Trainer side, :class:`DeltaWriter`: one per writer rank. It keeps the bytes of its shards of
the last publication (host RAM: one copy of its share) and writes each shard of the next as
a delta against them, or whole when there is no base, every ``full_every`` versions, or when
the delta would not be much smaller (``max_ratio``): at the CPU default's learning rate of
1e-3 nearly every weight changes and the delta is as large as the shard. The choice is per
shard; a publication whose shards are all whole is a full one.

Worker side, :class:`ServedWeights`: the files of the version a worker serves. A full
publication is served from the sync dir's own files; a delta one is rebuilt by walking its
chain of bases back to the version served (or to the newest full publication, for a worker
that starts or restarts mid-run) into a private folder under /dev/shm, each rebuilt file
checked against the checksum of the bytes the trainer meant, before anything loads it. A
gap in the chain, a wrong base or a corrupt delta raises :class:`PublicationError` naming
the version and file; the worker then keeps serving what it has. The manifests' names and
targets are plain file names, checked when the manifest is read, before any file is opened
(:func:`~simko_tune.generation.weights.read_publication`), and so is the sync dir's owner.

A worker owns its private folder by a lock on it held for its lifetime, not by its PID:
workers in containers that share /dev/shm (docker ``--ipc=host``) see other PID namespaces,
where a PID says nothing. A worker that makes its folder first removes those whose lock it
can take (their worker was killed before its ``close``); a worker whose folder was removed
anyway (a cleanup of /dev/shm) makes a new one.
"""

from __future__ import annotations

import bisect
import fcntl
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from simko_tune.fs import CHECKSUM, open_in_place
from simko_tune.generation.sync_dir import check_sync_dir, private_root
from simko_tune.generation.types import PublicationError
from simko_tune.generation.xor_codec import apply_frame, encode_into, pairs_bound

DELTA_SUFFIX = ".delta.zst"
ENCODING = "xor-pairs/zstd"  # the manifest names it: a reader refuses any other
_SPARE = "spare"  # a worker's rebuilt folder of two versions ago, overwritten by the next
TARGET_CHECKSUM = f"target_{CHECKSUM}"  # of the rebuilt shard's bytes (the loader checks it)
# of each frame's rebuilt bytes: a worker checks a frame on the thread that rebuilt it, while
# it is in cache, instead of hashing the whole shard again on one thread
FRAME_CHECKSUMS = f"frame_{CHECKSUM}"


@dataclass(frozen=True)
class DeltaSettings:
    full_every: int = 20  # a full publication at least every this many versions
    max_ratio: float = 0.5  # a shard whose delta is bigger than this share is written whole
    # zstd level of the pairs: 3 is no smaller on them (0.667 of the pairs against 0.651,
    # 358M bf16 weights each moved by 1e-6) and 6.5x slower
    level: int = 1
    # Each shard is cut into frames of this many bytes, each its own zstd frame: threads
    # encode and rebuild frames at once, and a frame's pairs stay in cache through encode
    # and compress. The manifest lists the frames' compressed sizes.
    frame_bytes: int = 1 << 22
    # threads that encode frames; 0: torch's intra-op threads (the thread rule: publishing
    # is all the trainer does then)
    threads: int = 0

    def __post_init__(self) -> None:
        if self.full_every < 1:
            raise ValueError(f"full_every must be >= 1, got {self.full_every}")
        if not 0 < self.max_ratio <= 1:
            raise ValueError(f"max_ratio must be in (0, 1], got {self.max_ratio}")
        if self.frame_bytes < 1 or self.threads < 0:
            raise ValueError(
                f"frame_bytes must be >= 1 and threads >= 0, got {self.frame_bytes}, {self.threads}"
            )


def _zstd():
    import zstandard

    return zstandard


def _frame_starts(frames: Any, packed: int, size: int, frame_bytes: Any) -> list[int]:
    """Offsets of each frame in a delta file of ``packed`` bytes that rebuilds ``size``
    bytes in frames of ``frame_bytes`` (the manifest's table, checked: it is read, not
    trusted)."""
    if (
        not isinstance(frame_bytes, int)
        or frame_bytes < 1
        or not isinstance(frames, list)
        or not all(isinstance(n, int) and n > 0 for n in frames)
        or len(frames) != max(1, -(-size // frame_bytes))
        or sum(frames) != packed
    ):
        raise ValueError(
            f"its frame table ({len(frames) if isinstance(frames, list) else frames!r} "
            f"frames of {frame_bytes!r} bytes) does not fit a {packed}-byte delta of "
            f"{size} bytes"
        )
    starts = [0]
    for n in frames:
        starts.append(starts[-1] + n)
    return starts


def apply_delta(data: bytes, out: np.ndarray, frames: list[int], frame_bytes: int) -> None:
    """Apply the delta ``data`` (its ``frames``, each for ``frame_bytes`` of the shard) to
    ``out``, the base's bytes, in place; anything that does not fit is a corrupt delta
    (ValueError)."""
    starts = _frame_starts(frames, len(data), out.size, frame_bytes)
    view = memoryview(data)
    for i in range(len(frames)):
        lo = i * frame_bytes
        apply_frame(view[starts[i] : starts[i + 1]], out[lo : lo + frame_bytes])


def digest(data: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(data.data)


def _threads(setting: int = 0) -> int:
    return setting or torch.get_num_threads()


def _frames_in_order(
    count: int,
    buffer_bytes: int,
    threads: int,
    work: Callable[[int, np.ndarray], Any],
    consume: Callable[[int, np.ndarray, Any], None],
    cores: frozenset[int] | None = None,
) -> None:
    """``work(i, buffer)`` for each frame ``i`` on ``threads`` threads (the codec's kernels,
    zstd and file writes release the GIL), ``consume(i, buffer, result)`` on this thread in
    frame order (a checksum runs over the frames in order). Two buffers of ``buffer_bytes``
    per thread are in flight, reused: no allocation per frame. ``cores``: the threads' CPU
    affinity (a vLLM worker's main thread is pinned to its first core by OpenMP, and new
    threads inherit that pin)."""
    if threads <= 1 or count <= 1:
        buf = np.empty(buffer_bytes, dtype=np.uint8)
        for i in range(count):
            consume(i, buf, work(i, buf))
        return
    free = [np.empty(buffer_bytes, dtype=np.uint8) for _ in range(2 * threads)]
    pending: deque = deque()
    pin = {"initializer": os.sched_setaffinity, "initargs": (0, cores)} if cores else {}
    with ThreadPoolExecutor(threads, thread_name_prefix="delta", **pin) as pool:
        try:
            i = 0
            while i < count or pending:
                while i < count and free:
                    buf = free.pop()
                    pending.append((i, buf, pool.submit(work, i, buf)))
                    i += 1
                j, buf, future = pending.popleft()
                consume(j, buf, future.result())
                free.append(buf)
        finally:
            for _, _, future in pending:
                future.cancel()


class DeltaWriter:
    """Trainer side: writes one rank's shards of each publication (see the module doc). Use
    ``begin(version)`` → ``write`` per shard (``write_shards``' writer) → ``end(ok)``."""

    def __init__(self, settings: DeltaSettings) -> None:
        self.settings = settings
        self._base: dict[str, np.ndarray] = {}  # shard name -> its bytes in base_version
        self.base_version: int | None = None
        self._version: int | None = None
        self._delta_allowed = False
        self.delta_base: int | None = None
        self._since_full = 0
        self.stats: dict[str, float] = {}

    def begin(self, version: int) -> None:
        """Start ``version``: deltas against the last publication unless there is none (a
        fresh start, a failed one) or ``full_every`` versions passed."""
        self._version = version
        self._delta_allowed = (
            self.base_version is not None
            and version > self.base_version
            and self._since_full + 1 < self.settings.full_every
        )
        self._since_full = self._since_full + 1 if self._delta_allowed else 0
        # what the manifest names as the base: the workers rebuild from it
        self.delta_base = self.base_version if self._delta_allowed else None
        self.stats = {"bytes": 0, "full_bytes": 0, "encode_s": 0.0}

    def write(self, tensors: dict[str, torch.Tensor], path: Path) -> dict:
        """Write one shard as a delta (``<name>.delta.zst``) or whole; keep its bytes as the
        next publication's base. One pass, frame by frame on the threads (list the bytes that
        differ from the base and write them into it, compress the list; the checksum of the
        new bytes follows in frame order), the base updated in its own buffer: no allocation
        of a shard's size per publication. Returns its manifest entry."""
        from simko_tune.generation.shards import shard_header

        head = shard_header(tensors)
        parts = [np.frombuffer(head, dtype=np.uint8)]
        parts += [t.reshape(-1).view(torch.uint8).numpy() for t in tensors.values()]
        starts = [0]
        for p in parts:
            starts.append(starts[-1] + p.size)
        size = starts[-1]
        entry = {"tensors": list(tensors), "tensor_bytes": size - len(head)}
        base = self._base.get(path.name)
        as_delta = self._delta_allowed and base is not None and base.size == size
        if base is None or base.size != size:
            base = self._base[path.name] = np.empty(size, dtype=np.uint8)
        frame_bytes, level = self.settings.frame_bytes, self.settings.level
        count = max(1, -(-size // frame_bytes))

        def pieces(i: int):  # (part, start, end, offset in the shard) of frame i
            lo, hi = i * frame_bytes, min((i + 1) * frame_bytes, size)
            k = bisect.bisect_right(starts, lo) - 1
            while lo < hi:
                while starts[k + 1] <= lo:  # skip empty parts
                    k += 1
                a = lo - starts[k]
                b = min(hi, starts[k + 1]) - starts[k]
                yield parts[k], a, b, lo
                lo += b - a

        local = threading.local()

        def work(i: int, buf: np.ndarray) -> tuple[bytes, str] | None:
            k, last, h = 0, 0, xxhash.xxh3_64()
            for part, a, b, at in pieces(i):
                if as_delta:
                    k, last = encode_into(
                        part[a:b], base[at : at + b - a], buf, k, at - i * frame_bytes, last
                    )
                    h.update(part[a:b].data)
                else:
                    base[at : at + b - a] = part[a:b]
            if not as_delta:
                return None
            if not hasattr(local, "compressor"):
                local.compressor = _zstd().ZstdCompressor(level=level)
            return local.compressor.compress(buf[:k].data), h.hexdigest()

        target = xxhash.xxh3_64()
        frames: list[bytes] = []
        frame_digests: list[str] = []

        def consume(i: int, buf: np.ndarray, done: tuple[bytes, str] | None) -> None:
            for part, a, b, _ in pieces(i):
                target.update(part[a:b].data)
            if done is not None:
                frames.append(done[0])
                frame_digests.append(done[1])

        t0 = time.perf_counter()
        buffer_bytes = pairs_bound(frame_bytes) if as_delta else 0
        _frames_in_order(count, buffer_bytes, _threads(self.settings.threads), work, consume)
        delta = b"".join(frames)
        if as_delta:
            self.stats["encode_s"] += time.perf_counter() - t0
        if as_delta and len(delta) <= self.settings.max_ratio * size:
            delta_path = path.with_name(path.name + DELTA_SUFFIX)
            delta_path.write_bytes(delta)
            entry |= {
                "name": delta_path.name,
                "bytes": len(delta),
                CHECKSUM: xxhash.xxh3_64_hexdigest(delta),
                "target": path.name,
                "encoding": ENCODING,
                "target_bytes": size,
                TARGET_CHECKSUM: target.hexdigest(),
                FRAME_CHECKSUMS: frame_digests,
                "frame_bytes": frame_bytes,
                "frames": [len(f) for f in frames],
            }
        else:
            _write_array(base, path)
            entry |= {"name": path.name, "bytes": size, CHECKSUM: target.hexdigest()}
        self.stats["bytes"] += entry["bytes"]
        self.stats["full_bytes"] += size
        return entry

    def end(self, ok: bool) -> None:
        """After the publication: its bytes become the base, or, if it failed part way (the
        held bytes are then a mix of two versions), none and the next one is full."""
        self.base_version = self._version if ok else None
        if not ok:
            self._base.clear()

    def write_full(self, version: int, folder: Path) -> list[dict]:
        """This rank's shards of ``version``, the last publication, written whole from the
        held bytes: a refused delta is republished without the model (which has moved on).
        The next publication then deltas against it as usual."""
        if self.base_version != version:
            raise PublicationError(
                f"cannot republish version {version} whole: this rank holds the bytes of "
                f"version {self.base_version}"
            )
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for name, data in self._base.items():
            _write_array(data, folder / name)
            entries.append({"name": name, "bytes": data.size, CHECKSUM: digest(data)})
        self._since_full = 0
        return entries


def _read_verified(path: Path, entry: dict) -> bytes:
    from simko_tune.generation.shards import _check_digest

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PublicationError(f"{path}: unreadable ({e})") from None
    _check_digest(path, xxhash.xxh3_64_hexdigest(raw), entry[CHECKSUM])
    return raw


def _check_rebuilt(path: Path, target: str, version: int, got: list[str], entry: dict) -> None:
    """``got``: the xxh3 of each rebuilt frame, against the trainer's."""
    expected = entry.get(FRAME_CHECKSUMS)
    if got != expected:
        listed = expected if isinstance(expected, list) else []
        bad = next((i for i, d in enumerate(got) if i >= len(listed) or d != listed[i]), len(got))
        raise PublicationError(
            f"{path}: rebuilt {target} of version {version} does not match its checksum "
            f"(frame {bad}; a wrong base?)"
        )


def _frame_digests(data: np.ndarray, frame_bytes: int) -> list[str]:
    return [digest(data[lo : lo + frame_bytes]) for lo in range(0, max(data.size, 1), frame_bytes)]


def _xor_stream(
    base: Path, packed: bytes, entry: dict, out: Path, cores: frozenset[int] | None = None
) -> list[str]:
    """Write ``base`` with the delta ``packed`` (of ``entry``) applied to ``out``, frame by
    frame on torch's threads, and return the xxh3 of each frame written. Raises ValueError
    when the sizes, the frame table or a frame's pairs do not fit. Each frame is read into
    a buffer that stays in cache through apply, write and hash (``pread``, not a map of the
    base: mapping its pages cost as much as copying them)."""
    size, frame_bytes, frames = entry["target_bytes"], entry.get("frame_bytes"), entry.get("frames")
    starts = _frame_starts(frames, len(packed), size, frame_bytes)
    digests: list[str] = []
    view = memoryview(packed)
    src = os.open(base, os.O_RDONLY)
    fd = -1
    try:
        if (have := os.fstat(src).st_size) != size:
            raise ValueError(f"the served {base.name} has {have} bytes, not {size}")
        fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)

        def work(i: int, buf: np.ndarray) -> str:
            lo = i * frame_bytes
            n = min(frame_bytes, size - lo)
            done = 0
            while done < n:
                got = os.preadv(src, [buf[done:n]], lo + done)
                if got == 0:
                    raise ValueError(f"the served {base.name} ends at {lo + done} bytes")
                done += got
            apply_frame(view[starts[i] : starts[i + 1]], buf[:n])
            done = 0
            while done < n:
                done += os.pwrite(fd, buf[done:n], lo + done)
            return digest(buf[:n])

        def consume(i: int, buf: np.ndarray, frame_digest: str) -> None:
            digests.append(frame_digest)

        _frames_in_order(len(frames), frame_bytes, _threads(), work, consume, cores)
    finally:
        os.close(src)
        if fd >= 0:
            os.close(fd)
    return digests


def _rebuilt_entry(target: str, entry: dict) -> dict:
    size = entry.get("target_bytes", entry["bytes"])
    return {
        "name": target,
        "bytes": size,
        CHECKSUM: entry.get(TARGET_CHECKSUM, entry[CHECKSUM]),
        "tensors": entry.get("tensors", []),
    }


def _lock(folder: Path) -> int | None:
    """A descriptor of ``folder`` holding its lock (``flock``, on the folder itself), or
    None when another process holds it or the folder is gone."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


def _holds(folder: Path, fd: int) -> bool:
    """Whether ``fd`` (locked) is still the folder at ``folder`` (not removed)."""
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(folder))
    except OSError:
        return False


def _make_private(root: Path) -> tuple[Path, int]:
    """A new private folder under ``root`` and the descriptor holding its lock."""
    while True:
        folder = Path(tempfile.mkdtemp(prefix="worker-", dir=root))
        fd = _lock(folder)  # None or removed: a sweep listed it before the lock; make another
        if fd is not None:
            if _holds(folder, fd):
                return folder, fd
            os.close(fd)


def _remove_orphans(root: Path) -> None:
    """Private folders no worker holds (killed before their ``close``)."""
    for folder in root.glob("worker-*"):
        try:
            fd = _lock(folder)
        except OSError:  # not a folder, or no locks there: never taken for an orphan
            continue
        if fd is not None:
            try:
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                os.close(fd)


def _write_array(data: np.ndarray, path: Path) -> None:
    """Write ``data`` over ``path`` in place when it exists (a recycled file keeps its
    memory pages on /dev/shm: no allocation per version)."""
    with open_in_place(path) as f:
        f.write(data.data)
        f.truncate()


def publication_kind(files: list[dict]) -> str:
    return "delta" if any("target" in f for f in files) else "full"


class ServedWeights:
    """Worker side: the files of the version served (see the module doc). One owner of the
    private folder that rebuilt versions live in: made on the first delta, removed by
    :meth:`close`.

    With ``prefetch``, after each version it serves a background thread watches the sync
    dir for the next delta on it and rebuilds that while the engine still generates with
    the old weights (one-step-off publishes it then): the load only waits for the switch."""

    def __init__(
        self,
        sync_dir: str | Path | None,
        prefetch: bool = False,
        poll_s: float = 0.05,
        cores: frozenset[int] | None = None,
    ) -> None:
        self.sync_dir = None if sync_dir is None else Path(sync_dir)
        self._cores = cores  # where the rebuild's threads run (default: where they start)
        self.version: int | None = None
        self.folder: Path | None = None
        self.files: list[dict] | None = None
        self._private: Path | None = None
        self._private_fd = -1  # holds the private folder's lock
        self._prefetch, self._poll_s = prefetch, poll_s
        self._lock = threading.Lock()  # one rebuild at a time: the loader's or the watcher's
        self._prefetched: dict[int, tuple[Path, list[dict], dict[str, float]]] = {}
        self._asked: int | None = None  # the newest version a load asked for: left alone
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def prepare(self, version: int) -> tuple[Path, list[dict], dict[str, float]]:
        """The folder and shard entries (safetensors files, checksums of their bytes) of
        ``version``, rebuilt from its delta chain if it is a delta publication, and timings
        (``rebuild_s``: what the caller waited for it; ``rebuild_work_s``: what the rebuild
        took, in the watcher's thread when ``prefetched`` is 1). A full
        publication's checksums are left to the loader (it hashes the bytes it reads); a
        rebuilt one is verified here, shard by shard."""
        t0 = time.perf_counter()
        with self._lock:  # waits for a prefetch under way
            self._asked = max(version, self._asked or version)
            hit = self._prefetched.pop(version, None)
            if hit is not None:
                waited = time.perf_counter() - t0
                return hit[0], hit[1], {**hit[2], "rebuild_s": waited, "prefetched": 1.0}
            return self._prepare(version)

    def _prepare(self, version: int) -> tuple[Path, list[dict], dict[str, float]]:
        from simko_tune.generation.weights import read_publication

        if self.sync_dir is None:
            raise PublicationError("this worker was started without --sync-dir")
        check_sync_dir(self.sync_dir)
        chain: list[tuple[int, Path, list[dict]]] = []  # newest first
        v, from_served = version, False
        while True:
            try:
                folder, files, fields = read_publication(self.sync_dir, v)
            except PublicationError as e:
                if v == version:
                    raise
                raise PublicationError(
                    f"version {version} is a delta whose chain needs version {v}, which cannot "
                    f"be read ({e}); the trainer republishes it whole"
                ) from None
            chain.append((v, folder, files))
            if publication_kind(files) == "full":
                break
            base = fields.get("base")
            if not isinstance(base, int) or base >= v:
                raise PublicationError(f"{folder}: a delta publication with base {base!r}")
            if base == self.version and self.folder is not None and self.folder.is_dir():
                from_served = True
                break
            v = base
        if len(chain) == 1 and not from_served:
            return chain[0][1], chain[0][2], {}
        t0 = time.perf_counter()
        out = self._private_dir() / f"v{version:06d}"
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        spare = self._private_dir() / _SPARE
        if spare.is_dir():  # overwritten in place: its memory pages exist already
            spare.rename(tmp)
        else:
            tmp.mkdir()
        try:
            entries = [
                self._rebuild(chain, target, tmp, from_served)
                for target in (f.get("target", f["name"]) for f in chain[0][2])
            ]
            for p in tmp.iterdir():  # the spare's files of shards this version lacks
                if p.name not in {e["name"] for e in entries}:
                    p.unlink()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return (
            out,
            entries,
            {"rebuild_s": (took := time.perf_counter() - t0), "rebuild_work_s": took}
            | {"chain": len(chain), "prefetched": 0.0},
        )

    def _rebuild(
        self, chain: list[tuple[int, Path, list[dict]]], target: str, out: Path, from_served: bool
    ) -> dict:
        """Apply the chain (oldest first) to one shard; write it to ``out``. The usual case,
        one delta on the served version, streams: no copy of the shard in memory."""
        data: np.ndarray | None = None
        held = self.folder / target if from_served else None
        if held is not None and not held.is_file():
            raise PublicationError(f"{held}: the served copy of {target} is missing")
        entry: dict = {}
        for v, folder, files in reversed(chain):
            entry = next((f for f in files if f.get("target", f["name"]) == target), None)
            if entry is None:
                raise PublicationError(f"{folder}: has no shard {target} (the chain's last has)")
            path = folder / entry["name"]
            if "target" in entry and entry.get("encoding") != ENCODING:
                raise PublicationError(
                    f"{path}: a delta in encoding {entry.get('encoding')!r}; this version of "
                    f"simko-tune reads {ENCODING!r}"
                )
            raw = _read_verified(path, entry)
            if held is not None and len(chain) == 1 and "target" in entry:
                try:
                    rebuilt = _xor_stream(held, raw, entry, out / target, self._cores)
                except ValueError as e:
                    raise PublicationError(f"{path}: {e} (corrupt)") from None
                _check_rebuilt(path, target, v, rebuilt, entry)
                return _rebuilt_entry(target, entry)
            if held is not None and data is None:
                data = np.fromfile(held, dtype=np.uint8)
            if "target" not in entry:
                data = np.frombuffer(raw, dtype=np.uint8).copy()
                continue
            if data is None or data.size != entry["target_bytes"]:
                raise PublicationError(f"{path}: a delta of version {v} has no base to apply to")
            try:
                apply_delta(raw, data, entry.get("frames"), entry.get("frame_bytes"))
            except ValueError as e:
                raise PublicationError(f"{path}: {e} (corrupt)") from None
            _check_rebuilt(path, target, v, _frame_digests(data, entry["frame_bytes"]), entry)
        _write_array(data, out / target)
        return _rebuilt_entry(target, entry)

    def served(self, version: int, folder: Path, files: list[dict] | None) -> None:
        """``version`` is now served from ``folder``; a rebuilt folder of an older one, and
        prefetched ones it will not need, go; the watcher starts on the next delta."""
        self._stop_watcher()
        old = self.folder
        with self._lock:
            self.version, self.folder, self.files = version, folder, files
            stale = [v for v in self._prefetched if v <= version]
            for v in stale:
                self.discard(self._prefetched.pop(v)[0])
        if old is not None and old != folder and self._owns(old):
            spare = self._private / _SPARE
            if spare.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # the next rebuild writes into it
                old.rename(spare)
        if self._prefetch and self.sync_dir is not None:
            self._stop.clear()
            self._watcher = threading.Thread(
                target=self._watch, args=(version,), name="delta-prefetch", daemon=True
            )
            self._watcher.start()

    def _watch(self, served: int) -> None:
        """Poll for a delta whose base is ``served``; rebuild it (errors are left to the
        load, which redoes it and reports them)."""
        from simko_tune.generation.sync_dir import manifest_fields, published_versions

        while not self._stop.wait(self._poll_s):
            for v in (v for v in published_versions(self.sync_dir) if v > served):
                meta = manifest_fields(self.sync_dir, v) or {}
                if meta.get("kind") != "delta" or meta.get("base") != served:
                    continue
                with self._lock:
                    # a load that asked first rebuilt it already (or refused it): rebuilding
                    # again would only take the cores from the engine's reload under way
                    asked = self._asked is not None and v <= self._asked
                    if self._stop.is_set() or self.version != served or asked:
                        return
                    try:
                        self._prefetched[v] = self._prepare(v)
                    except (PublicationError, OSError):
                        pass
                return

    def _stop_watcher(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None

    def discard(self, folder: Path) -> None:
        """A prepared version that was not served (its load failed)."""
        if folder != self.folder and self._owns(folder):
            shutil.rmtree(folder, ignore_errors=True)

    def _owns(self, folder: Path) -> bool:
        return (
            self._private is not None
            and folder.parent == self._private
            and _holds(self._private, self._private_fd)
        )

    def _private_dir(self) -> Path:
        """The private folder: made on first use, after a sweep of orphans, and again when it
        was removed."""
        if self._private is not None and not _holds(self._private, self._private_fd):
            os.close(self._private_fd)
            self._private, self._private_fd = None, -1
        if self._private is None:
            root = private_root()
            _remove_orphans(root)
            self._private, self._private_fd = _make_private(root)
        return self._private

    def close(self) -> None:
        self._stop_watcher()
        if self._private is not None:
            if _holds(self._private, self._private_fd):
                shutil.rmtree(self._private, ignore_errors=True)
            os.close(self._private_fd)  # the lock goes with it
            self._private, self._private_fd = None, -1
