"""Weight publication from the trainer to the generation workers, through a sync directory.

:class:`WeightSync` owns the directory and the whole life of a publication: it creates the
directory (owned by this user, not a symlink, not world-writable), clears stale versions at
start, checks free space, publishes, waits for every worker's acknowledgement and then
prunes. Generators only read from the directory.

A publication is ``sync_dir/v{version:06d}/``: safetensors shards in Hugging Face names, in
the generation engine's dtype, plus ``manifest.json`` (version, files, sizes, checksums).
Every trainer rank on rank 0's node writes its own disjoint share of the tensors into its
own shard files in ``v{version:06d}.tmp/``, each sharded tensor gathered to its writer alone
(not all-gathered); after a barrier rank 0 writes
the manifest last and publishes the folder by rename, so a reader never sees a partial
publication under the final name. Workers verify sizes and checksums before loading, which
also catches files damaged after publication.

Checksum: xxh3-64. It runs at memory bandwidth, so verifying a 15 GB bf16 7B publication
costs well under a second, where SHA-256 (~1-2 GB/s) would add several seconds per worker
per step. The sync dir is written by our own trainer into a directory only this user can
write, so the threat is truncation and corruption, not forgery: a non-cryptographic hash
suffices.

Another transport (e.g. an NCCL broadcast from the trainer to the engines) would replace
:meth:`WeightSync.publish`'s write and the generators' ``load_weights`` read, keeping the
same version numbers, acknowledgement and rollback rules. One is here: with no sync
directory, a one-rank trainer whose generator runs in its own process (the native backend)
gets each version as an in-memory snapshot of the weights, with the same versions and
deferred delivery, and no files at all.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import xxhash
from torch import nn

from simko_tune.generation.types import GenerationError
from simko_tune.models import tune_to_hf_converter
from simko_tune.parallel.collectives import (
    all_gather_object,
    barrier,
    broadcast_object,
    gather_to,
    hostnames,
    unshard,
)
from simko_tune.parallel.collectives import rank as process_rank
from simko_tune.paths import checksum_file, replace_dir

MANIFEST = "manifest.json"
CHECKSUM = "xxh3_64"
_VERSION_DIR = re.compile(r"^v(\d{6,})(\.tmp)?$")
# Wrappers that prefix parameter names (activation checkpointing, torch.compile).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
# Names some checkpoints carry that are not weights (vLLM recomputes them).
IGNORED_NAMES = re.compile(r"rotary_emb\.inv_freq$")


class PublicationError(GenerationError):
    """A publication is missing, incomplete or corrupt; it must not be loaded."""


def default_sync_dir(run_name: str) -> Path:
    """``<shared memory>/simko_tune-<uid>/<run_name>``: shared memory has no disk I/O for
    single-node runs (use a folder on a shared filesystem when workers run on other
    nodes); the per-user parent is made 0700 and checked, so no other user can plant or
    read a publication at a predictable path."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    parent = base / f"simko_tune-{os.getuid()}"
    try:
        parent.mkdir(mode=0o700)
    except FileExistsError:
        pass
    _check_owned(parent, private=True)
    return parent / run_name


def _check_owned(path: Path, *, private: bool) -> None:
    """``path`` is a real directory owned by this user; ``private``: no one else may enter
    it; otherwise: no one else may write to it."""
    st = os.lstat(path)
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


def prepare_sync_dir(path: str | Path) -> Path:
    """Create ``path`` if missing (0700), check it is ours, and clear any publication left by
    an earlier run: a stale version must never be loaded."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_owned(path, private=False)
    for p in path.iterdir():
        if _VERSION_DIR.match(p.name):
            shutil.rmtree(p)
    return path


def version_dir(sync_dir: str | Path, version: int) -> Path:
    return Path(sync_dir) / f"v{version:06d}"


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """Write one safetensors file straight from the tensors' memory, hashing the same bytes
    as they are written: one pass over the data, no serialised copy (``safetensors.save``
    would build the whole file in memory first)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns tensor data to 8 bytes
    h = xxhash.xxh3_64()
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            f.write(chunk)
            h.update(chunk)
        for t in tensors.values():
            data = t.reshape(-1).view(torch.uint8).numpy().data
            f.write(data)
            h.update(data)
    return {
        "name": path.name,
        "bytes": 8 + len(head) + offset,
        CHECKSUM: h.hexdigest(),
        "tensors": list(tensors),
        "tensor_bytes": offset,
    }


def _publication_writers() -> list[int]:
    """The ranks that write shards: those on rank 0's node, which sees the sync dir (a
    node-local /dev/shm on a multi-node trainer). Collective."""
    if not dist.is_initialized():
        return [0]
    hosts = hostnames()
    return [r for r, h in enumerate(hosts) if h == hosts[0]]


def _assign(sizes: list[int], num_writers: int) -> list[int]:
    """Writer index of each tensor: contiguous runs of the state dict's order with about
    equal bytes each, so every writer gathers and writes its share and the shards, read in
    name order, hold the weights in the model's order (layer by layer, as vLLM's reload
    wants them)."""
    total = sum(sizes)
    owner, done = [], 0
    for size in sizes:
        # the writer whose equal share of [0, total) holds this tensor's midpoint
        owner.append(min(num_writers - 1, int((done + size / 2) * num_writers / max(total, 1))))
        done += size
    return owner


def publication_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of tensor data a publication of ``model`` in ``dtype`` holds (no collective:
    DTensors know their global shapes)."""
    total = 0
    for value in model.state_dict().values():
        itemsize = dtype if dtype is not None and value.is_floating_point() else value.dtype
        total += value.numel() * itemsize.itemsize
    return total


def _rounds(sizes: list[int], owners: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Tensor indices in rounds, each holding at most one shard (``max_shard_bytes``, or a
    single larger tensor) per writer: a round gathers every writer's next shard, then all
    writers write at once. Each writer's shards are consecutive runs of its tensors."""
    chunks: dict[int, list[list[int]]] = {}
    load: dict[int, int] = {}
    for i, (size, owner) in enumerate(zip(sizes, owners)):
        runs = chunks.setdefault(owner, [[]])
        if runs[-1] and load[owner] + size > max_shard_bytes:
            runs.append([])
            load[owner] = 0
        runs[-1].append(i)
        load[owner] = load.get(owner, 0) + size
    count = max((len(runs) for runs in chunks.values()), default=0)
    return [
        sorted(i for runs in chunks.values() if k < len(runs) for i in runs[k])
        for k in range(count)
    ]


def write_shards(
    model: nn.Module,
    folder: Path,
    hf_config: dict,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2**30,
    writers: list[int] | None = None,
) -> list[dict]:
    """Write ``model``'s weights into ``folder`` as safetensors shards in Hugging Face names.

    Collective. Each tensor has one writer among ``writers`` (default: the ranks on rank 0's
    node); floating tensors are cast to ``dtype`` (default: as they are) on the ranks that
    hold them, then a sharded (FSDP2/TP) tensor travels to its writer alone
    (:func:`~simko_tune.parallel.collectives.gather_to`). Work goes in rounds: all writers
    gather their next shard (``max_shard_bytes``), then write and hash it at the same time,
    one shard per writer in memory. Returns every shard's entry (name, bytes, checksum,
    tensor names) on rank 0, once all are written."""
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    writers = writers if writers is not None else _publication_writers()
    to_hf = tune_to_hf_converter(hf_config)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    barrier()

    state = list(model.state_dict().items())
    sizes = [
        v.numel() * (dtype.itemsize if dtype and v.is_floating_point() else v.element_size())
        for _, v in state
    ]
    owners = [writers[w] for w in _assign(sizes, len(writers))]
    files: list[dict] = []
    for indices in _rounds(sizes, owners, max_shard_bytes):
        shard: dict[str, torch.Tensor] = {}
        for i in indices:
            name, value = state[i]
            full = gather_to(value, owners[i], dtype)  # a collective: every rank takes part
            if full is not None:
                for hf_name, t in to_hf({_clean_name(name): full}).items():
                    shard[hf_name] = t.to("cpu").contiguous()
        if shard:
            name = f"model-r{rank:05d}-{len(files) + 1:05d}.safetensors"
            files.append(_write_shard(shard, folder / name))
    if distributed:  # every shard is written before rank 0 lists them
        files = [f for rank_files in all_gather_object(files) for f in rank_files]
    return files


def publish_weights(
    model: nn.Module,
    version: int,
    sync_dir: str | Path,
    hf_config: dict,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2**30,
    writers: list[int] | None = None,
) -> Path | None:
    """Publish ``model``'s weights as ``version`` for the generation workers (collective;
    the shards are written as :func:`write_shards` says). Rank 0 then writes the manifest
    last and renames the folder into place; it returns the publication's path, the other
    ranks ``None``."""
    if version <= 0:
        raise ValueError(
            f"published versions must be positive (0 is the initial checkpoint): {version}"
        )
    rank = process_rank()
    final = version_dir(sync_dir, version)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    files = write_shards(
        model, tmp, hf_config, dtype=dtype, max_shard_bytes=max_shard_bytes, writers=writers
    )
    if rank != 0:
        return None
    manifest = {"version": version, "checksum": CHECKSUM, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    replace_dir(tmp, final, fsync=False)  # a republished version (a resume) is replaced whole
    return final


def read_manifest(sync_dir: str | Path, version: int) -> tuple[Path, list[dict]]:
    """Everything about a publication but its checksums: the manifest exists and names
    this version, every listed file has its size, and no unlisted shard is present (the
    loader would read it). Returns the folder and the manifest's file entries."""
    folder = version_dir(sync_dir, version)
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".tmp")
        hint = " (only a partial .tmp folder exists)" if partial.exists() else ""
        raise PublicationError(f"{folder}: weight version {version} is not published{hint}")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise PublicationError(f"{manifest_path}: manifest missing; publication is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest["version"] != version:
            raise PublicationError(
                f"{manifest_path}: names version {manifest['version']}, expected {version}"
            )
        if manifest.get("checksum") != CHECKSUM:
            raise PublicationError(
                f"{manifest_path}: unknown checksum {manifest.get('checksum')!r}"
            )
        listed = {f["name"] for f in files}
        for f in files:
            f["bytes"], f[CHECKSUM]  # noqa: B018 (each entry must have both)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PublicationError(f"{manifest_path}: unreadable manifest ({e!r})") from e

    unlisted = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in listed)
    if unlisted:
        raise PublicationError(f"{folder}: shards not in the manifest: {unlisted}")
    for f in files:
        path = folder / f["name"]
        if not path.is_file():
            raise PublicationError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != f["bytes"]:
            raise PublicationError(f"{path}: {size} bytes, manifest says {f['bytes']} (truncated?)")
    return folder, files


def _check_digest(path: Path, digest: str, expected: str) -> None:
    if digest != expected:
        raise PublicationError(f"{path}: {CHECKSUM} {digest} != manifest {expected} (corrupt)")


def verify_publication(sync_dir: str | Path, version: int) -> tuple[Path, dict[str, list[int]]]:
    """Check a publication before anything loads it (:func:`read_manifest`, then every
    file's checksum). Returns the folder and ``{tensor name: shape}``."""
    folder, files = read_manifest(sync_dir, version)
    for f in files:
        path = folder / f["name"]
        _check_digest(path, checksum_file(path), f[CHECKSUM])
    return folder, checkpoint_shapes([folder / f["name"] for f in files])


_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


@contextmanager
def verified_tensors(
    folder: Path, files: list[dict]
) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    """Verify every shard's checksum, then yield an iterator over its tensors that are views
    of the very bytes just hashed (memory maps: each byte is read from the page cache once
    to hash and once by the loader's copy, with no copy in between). Nothing is yielded
    before all shards pass, so a corrupt publication is refused before any weight moves.
    The views are valid inside the ``with`` block only."""
    maps: list[tuple[Path, mmap.mmap]] = []
    try:
        for f in files:
            path = folder / f["name"]
            m = _map(path)
            maps.append((path, m))
            _check_digest(path, xxhash.xxh3_64_hexdigest(m), f[CHECKSUM])
        yield _iter_tensors(maps)
    finally:
        for _, m in maps:
            try:
                m.close()
            except BufferError:  # a view still alive: the map closes when it is collected
                pass


def _map(path: Path) -> mmap.mmap:
    """A read-only map of ``path`` with all its pages mapped up front: one call into the
    kernel instead of a page fault per 4 KiB page as the hash first touches them (measured
    on a 0.7 GB publication: hashing 0.17 s -> 0.04 s + 0.08 s to map, unmapping 0.10 s ->
    0.02 s)."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # Linux only
    with open(path, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, flags=flags, prot=mmap.PROT_READ)


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _header(m: mmap.mmap) -> tuple[dict, int]:
    """A safetensors file's header (tensor entries only) and where its data starts."""
    head_len = int.from_bytes(m[:8], "little")
    header = json.loads(m[8 : 8 + head_len])
    header.pop("__metadata__", None)
    return header, 8 + head_len


def _view(data: torch.Tensor, base: int, info: dict) -> torch.Tensor:
    """The tensor ``info`` describes, as a view of the file's bytes (a copy if misaligned)."""
    start, end = info["data_offsets"]
    dtype = _TORCH_DTYPES[info["dtype"]]
    raw = data[base + start : base + end]
    if (base + start) % dtype.itemsize:  # a view needs aligned storage
        raw = raw.clone()
    return raw.view(dtype).view(info["shape"])


def _as_tensor(m: mmap.mmap) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # read-only map: the loader only copies from it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(m, dtype=torch.uint8)


def _iter_tensors(maps: list[tuple[Path, mmap.mmap]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of all shards, layer by layer: vLLM processes a layer once all of its weights
    arrived, so this order keeps only one layer in flight whatever the file order."""
    entries = []
    for _, m in maps:
        header, base = _header(m)
        data = _as_tensor(m)
        for name, info in header.items():
            if not IGNORED_NAMES.search(name):
                entries.append((name, info, data, base))

    def order(entry: tuple) -> tuple[int, str]:
        layer = _LAYER.search(entry[0])
        return (int(layer.group(1)) if layer else -1, entry[0])

    for name, info, data, base in sorted(entries, key=order):
        yield name, _view(data, base, info)


@contextmanager
def streamed_tensors(
    folder: Path, files: list[dict], errors: list[str]
) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    """The shards' tensors in file order (the model's order, as :func:`write_shards` splits
    it), each file's bytes hashed as its tensors are handed out: one pass over the page
    cache where verifying first and loading after take two. A file whose checksum differs
    ends the iteration and its error is appended to ``errors``: the loader has by then taken
    part of a damaged publication, and the caller must put the previous weights back."""
    maps: list[mmap.mmap] = []

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for f in files:
            path = folder / f["name"]
            m = _map(path)
            maps.append(m)
            header, base = _header(m)
            data, view = _as_tensor(m), memoryview(m)
            h = xxhash.xxh3_64(view[:base])
            done = base
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                if base + start != done:  # a gap or an overlap: not a file our writer made
                    errors.append(f"{path}: tensor data of {name} is not contiguous")
                    return
                h.update(view[base + start : base + end])
                done = base + end
                if not IGNORED_NAMES.search(name):
                    yield name, _view(data, base, info)
            h.update(view[done:])
            try:
                _check_digest(path, h.hexdigest(), f[CHECKSUM])
            except PublicationError as e:
                errors.append(str(e))
                return

    try:
        yield tensors()
    finally:
        for m in maps:
            try:
                m.close()
            except BufferError:  # a view still alive: the map closes when it is collected
                pass


def checkpoint_shapes(files: list[Path]) -> dict[str, list[int]]:
    """``{tensor name: shape}`` from safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if not IGNORED_NAMES.search(name):
                    shapes[name] = list(f.get_slice(name).get_shape())
    return shapes


def compare_shapes(expected: dict[str, list[int]], got: dict[str, list[int]], where: str) -> None:
    """A publication must carry every weight of the served model, with the same shapes: the
    loader only warns about weights it did not find, which would leave them silently stale."""
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or unexpected or wrong:
        raise PublicationError(
            f"{where}: does not match the served model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}, "
            f"wrong shapes {[(k, got[k], expected[k]) for k in wrong[:5]]}"
        )


def published_versions(sync_dir: str | Path) -> list[int]:
    """Complete publications (final names) in ``sync_dir``, ascending."""
    out = []
    for p in Path(sync_dir).iterdir() if Path(sync_dir).is_dir() else []:
        m = _VERSION_DIR.match(p.name)
        if m and not m.group(2):
            out.append(int(m.group(1)))
    return sorted(out)


def prune_versions(sync_dir: str | Path, keep_version: int) -> None:
    """Remove publications (and leftover partial ones) older than ``keep_version``, the
    version every worker acknowledged. It is kept: a restarted worker reloads it."""
    root = Path(sync_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        m = _VERSION_DIR.match(p.name)
        if m and int(m.group(1)) < keep_version:
            shutil.rmtree(p, ignore_errors=True)


class WeightConsumer(Protocol):
    """What receives publications: a generator whose ``load_weights`` returns once every
    worker serves ``version`` (its acknowledgement) or raises."""

    def load_weights(self, version: int, timeout_s: float = ...) -> None: ...


class InMemoryConsumer(Protocol):
    """What receives in-memory publications: a generator in the trainer's own process that
    copies ``state`` (the trainer's ``state_dict`` names) into its model."""

    def load_state(self, version: int, state: dict[str, torch.Tensor]) -> None: ...


class WeightSync:
    """The sync directory and the whole life of each publication in it.

    Built on every trainer rank (``publish`` is collective); rank 0 creates and checks the
    directory, clears stale versions, and, when a ``consumer`` is attached, delivers each
    publication to it and prunes older versions once it acknowledges. Pruning runs in the
    background and is joined before the next publication's free-space check, so the
    trainer never waits on freeing GB-scale folders but never counts their space as free.

    Delivery may be deferred (``publish(..., deliver=False)``, then ``deliver``): with
    one-step-off rollouts the rollout thread delivers a version just before it generates
    with it, so the workers' reload overlaps the trainer's next update instead of stalling
    it. That thread and the trainer's may then publish and deliver at once: pruning only
    removes versions older than the acknowledged one (never one being written), and the
    pruner is handed over under a lock. Up to three versions can then be on disk.

    With ``sync_dir=None`` (one trainer rank, a consumer in this process: the native
    generator) a publication is a snapshot of the weights in memory instead, a copy taken
    when the trainer publishes, so a deferred delivery hands over exactly the weights of
    that version while the trainer goes on updating its own. No files, no checksums: the
    bytes never leave the process.
    """

    def __init__(
        self,
        sync_dir: str | Path | None,
        hf_config: dict,
        *,
        dtype: torch.dtype | None = None,
        max_shard_bytes: int = 2**30,
        remove_on_close: bool = False,
    ) -> None:
        self.sync_dir = Path(sync_dir) if sync_dir is not None else None
        self.hf_config = hf_config
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self.remove_on_close = remove_on_close
        self.rank = process_rank()
        self.consumer: WeightConsumer | None = None
        self.written: int | None = None  # the newest version this sync published
        self.acknowledged: int | None = None  # the version the consumer serves
        # seconds of the last publish: "write" (gather, convert, write, rename) and, when
        # it delivered, "ack" (until every worker serves it) with the workers' "verify" and
        # "reload"; logged as metrics, read by the benchmarks
        self.last_timings: dict[str, float] = {}
        self._pruner: threading.Thread | None = None
        self._lock = threading.Lock()  # the pruner hand-over; the snapshots (in memory)
        # in memory: version -> its snapshot, until delivered (two at most: one-step-off)
        self._snapshots: dict[int, dict[str, torch.Tensor]] = {}
        if self.sync_dir is None:
            if dist.is_initialized() and dist.get_world_size() > 1:
                raise ValueError(
                    "in-memory weight transfer needs one trainer rank: the consumer holds a "
                    "whole, unsharded copy (use a sync dir with several ranks)"
                )
            return
        error = None
        if self.rank == 0:
            try:
                prepare_sync_dir(self.sync_dir)
            except (OSError, PublicationError) as e:
                error = e
        if _agree_on_error(error):
            raise error or PublicationError(
                f"sync dir {self.sync_dir}: rank 0 could not prepare it"
            )
        self._writers = _publication_writers()

    def attach(self, consumer: WeightConsumer | InMemoryConsumer) -> None:
        """Rank 0: the generator every publication is delivered to."""
        if self.sync_dir is None and not hasattr(consumer, "load_state"):
            raise TypeError(
                f"{type(consumer).__name__} loads weights from files: in-memory weight "
                "transfer needs a generator in this process (generation.backend=native)"
            )
        self.consumer = consumer

    def publish(
        self, model: nn.Module, version: int, timeout_s: float = 300.0, *, deliver: bool = True
    ) -> Path | None:
        """Write ``model`` as ``version`` (collective), then on rank 0, with ``deliver``,
        hand it to the consumer at once (:meth:`deliver`). Returns the publication's path on
        rank 0, None elsewhere and in memory."""
        t0 = time.perf_counter()
        if self.sync_dir is None:
            path = self._snapshot(model, version)
        else:
            path = self._write_files(model, version)
        self.written = version
        self.last_timings = {"write_s": time.perf_counter() - t0}
        if deliver and self.rank == 0:
            self.last_timings.update(self.deliver(version, timeout_s))
        return path

    def _snapshot(self, model: nn.Module, version: int) -> None:
        """In memory: a copy of the weights as they are now, kept until delivered. A model
        sharded on a one-rank mesh (torchrun with one process) holds DTensors: the consumer
        gets their plain, whole values."""
        snapshot = {
            name: unshard(t).detach().to(self.dtype or t.dtype, copy=True)
            for name, t in model.state_dict().items()
        }
        with self._lock:
            self._snapshots[version] = snapshot

    def _write_files(self, model: nn.Module, version: int) -> Path | None:
        """Check free space (rank 0, agreed by all), then write the publication."""
        error = None
        if self.rank == 0:
            self._join_pruner()
            need = publication_bytes(model, self.dtype)
            free = shutil.disk_usage(self.sync_dir).free
            if free < need:
                error = PublicationError(
                    f"sync dir {self.sync_dir}: {free / 2**30:.2f} GiB free, publishing "
                    f"version {version} needs {need / 2**30:.2f} GiB; free space there, or "
                    "point generation.sync_dir at a larger filesystem"
                )
        if _agree_on_error(error):
            raise error or PublicationError(f"sync dir {self.sync_dir}: not enough free space")
        return publish_weights(
            model,
            version,
            self.sync_dir,
            self.hf_config,
            dtype=self.dtype,
            max_shard_bytes=self.max_shard_bytes,
            writers=self._writers,
        )

    def deliver(self, version: int, timeout_s: float = 300.0) -> dict[str, float]:
        """Rank 0: make the consumer serve ``version``, a publication of this sync, wait for
        its acknowledgement, then prune what came before it. A no-op without a consumer,
        when it already serves ``version``, or for a version this sync has not published
        (the workers' start-up weights). Returns the seconds it took: ``ack_s`` and the
        workers' own share of it, ``verify_s`` and ``reload_s`` (the rest is messaging)."""
        if (
            self.consumer is None
            or version == self.acknowledged
            or self.written is None
            or version > self.written
        ):
            return {}
        t0 = time.perf_counter()
        if self.sync_dir is None:
            with self._lock:
                snapshot = self._snapshots.get(version)
                if snapshot is None:
                    raise PublicationError(
                        f"version {version}: no snapshot in memory (only the newest "
                        "published version can be delivered)"
                    )
                for v in [v for v in self._snapshots if v <= version]:
                    del self._snapshots[v]  # a newer one, being delivered later, stays
            self.consumer.load_state(version, snapshot)
            self.acknowledged = version
            return {"ack_s": time.perf_counter() - t0}
        self.consumer.load_weights(version, timeout_s)
        self.acknowledged = version
        timings = {"ack_s": time.perf_counter() - t0}
        timings.update(getattr(self.consumer, "last_load_timings", {}))
        with self._lock:
            if self._pruner is not None:
                self._pruner.join()
            self._pruner = threading.Thread(
                target=prune_versions, args=(self.sync_dir, version), daemon=True
            )
            self._pruner.start()
        return timings

    def _join_pruner(self) -> None:
        with self._lock:
            if self._pruner is not None:
                self._pruner.join()
                self._pruner = None

    def close(self) -> None:
        """Rank 0: wait for pruning; with ``remove_on_close`` remove every publication (the
        workers hold their weights in memory; nothing reads them after the run)."""
        if self.rank != 0:
            return
        self._snapshots.clear()
        if self.sync_dir is None:
            return
        self._join_pruner()
        if self.remove_on_close and self.sync_dir.is_dir():
            for p in self.sync_dir.iterdir():
                if _VERSION_DIR.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)
            try:
                self.sync_dir.rmdir()
            except OSError:
                pass  # something else lives there: leave it


def _agree_on_error(error: BaseException | None) -> bool:
    """Whether rank 0 hit ``error`` (a collective: the other ranks must not walk into the
    next gather while rank 0 raises)."""
    return bool(broadcast_object(error is not None))


def parse_weight_dtype(name: str | None, engine_kwargs: dict, hf_config: dict) -> torch.dtype:
    """The dtype publications are written in: ``name`` if given, else the generation
    engine's ``dtype`` (vLLM's ``auto``/unset means the checkpoint's ``torch_dtype``)."""
    name = name or engine_kwargs.get("dtype") or "auto"
    if name == "auto":
        name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    dtypes = {
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    }  # fmt: skip
    if name not in dtypes:
        raise ValueError(
            f"generation.weight_dtype: unknown dtype {name!r}; expected one of {sorted(dtypes)}"
        )
    return dtypes[name]
