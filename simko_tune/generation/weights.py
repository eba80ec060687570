"""Weight publication from the trainer to the generation workers, through a sync directory.

A publication is ``sync_dir/v{version:06d}/``: safetensors shards in Hugging Face names plus
``manifest.json`` (version, files, sizes, checksums). It is assembled in
``v{version:06d}.tmp/``, the manifest written last, and published by renaming the folder,
so a reader never sees a partial publication under the final name. Workers still verify
sizes and checksums before loading, which also catches files damaged after publication.

Checksum: xxh3-64. It runs at memory bandwidth (tens of GB/s per core), so verifying a
15 GB bf16 7B publication costs well under a second, where SHA-256 (~1-2 GB/s) would add
several seconds per worker per step. The sync dir is written by our own trainer, so the
threat is truncation and corruption, not forgery: a non-cryptographic hash suffices.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import xxhash
from torch import nn

from simko_tune.generation.types import GenerationError
from simko_tune.models import tune_to_hf_converter
from simko_tune.parallel.collectives import full_tensor

MANIFEST = "manifest.json"
CHECKSUM = "xxh3_64"
_VERSION_DIR = re.compile(r"^v(\d{6,})(\.tmp)?$")
# Wrappers that prefix parameter names (activation checkpointing, torch.compile).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
# Names some checkpoints carry that are not weights (vLLM recomputes them).
IGNORED_NAMES = re.compile(r"rotary_emb\.inv_freq$")


class PublicationError(GenerationError):
    """A publication is missing, incomplete or corrupt; it must not be loaded."""


def default_sync_dir() -> Path:
    """A fresh sync dir in shared memory (no disk I/O for single-node runs); use a folder on
    a shared filesystem instead when workers run on other nodes."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="simko_sync_", dir=root))


def version_dir(sync_dir: str | Path, version: int) -> Path:
    return Path(sync_dir) / f"v{version:06d}"


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _checksum_file(path: Path) -> str:
    """xxh3-64 of a file, hashed through a memory map (no copy out of the page cache)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64_hexdigest(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return xxhash.xxh3_64_hexdigest(m)


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
    return {"name": path.name, "bytes": 8 + len(head) + offset, CHECKSUM: h.hexdigest()}


def publish_weights(
    model: nn.Module,
    version: int,
    sync_dir: str | Path,
    hf_config: dict,
    *,
    max_shard_bytes: int = 2**30,
) -> Path | None:
    """Publish ``model``'s weights as ``version`` for the generation workers.

    Every rank of a distributed run must call this (sharded FSDP2/TP parameters are
    gathered with ``DTensor.full_tensor()``, a collective); rank 0 writes and returns the
    publication's path, the other ranks return ``None``. Tensors are gathered, renamed to
    Hugging Face names and written one shard at a time, so rank 0 holds at most one shard
    (``max_shard_bytes``) besides the model.
    """
    if version <= 0:
        raise ValueError(
            f"published versions must be positive (0 is the initial checkpoint): {version}"
        )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    to_hf = tune_to_hf_converter(hf_config)
    final = version_dir(sync_dir, version)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    files: list[dict] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        files.append(_write_shard(shard, tmp / f"model-{len(files) + 1:05d}.safetensors"))
        shard, shard_bytes = {}, 0

    for name, value in model.state_dict().items():
        full = full_tensor(value)
        if rank != 0:
            continue
        for hf_name, t in to_hf({_clean_name(name): full}).items():
            t = t.to("cpu").contiguous()
            if shard and shard_bytes + t.nbytes > max_shard_bytes:
                flush()
            shard[hf_name] = t
            shard_bytes += t.nbytes
    if rank != 0:
        return None
    if shard or not files:
        flush()

    manifest = {"version": version, "checksum": CHECKSUM, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if final.exists():  # republishing a version (a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def verify_publication(sync_dir: str | Path, version: int) -> tuple[Path, dict[str, list[int]]]:
    """Check a publication before anything loads it: the manifest exists and names this
    version, every listed file has its size and checksum, and no unlisted shard is present
    (the loader would read it). Returns the folder and ``{tensor name: shape}``."""
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
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PublicationError(f"{manifest_path}: unreadable manifest ({e!r})") from e

    listed = {f["name"] for f in files}
    unlisted = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in listed)
    if unlisted:
        raise PublicationError(f"{folder}: shards not in the manifest: {unlisted}")
    shapes: dict[str, list[int]] = {}
    for f in files:
        path = folder / f["name"]
        if not path.is_file():
            raise PublicationError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != f["bytes"]:
            raise PublicationError(f"{path}: {size} bytes, manifest says {f['bytes']} (truncated?)")
        digest = _checksum_file(path)
        if digest != f[CHECKSUM]:
            raise PublicationError(
                f"{path}: {CHECKSUM} {digest} != manifest {f[CHECKSUM]} (corrupt)"
            )
        shapes.update(checkpoint_shapes([path]))
    return folder, shapes


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
