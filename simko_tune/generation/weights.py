"""Weight publication from the trainer to the generators: one owner, two transports.

:class:`WeightSync` is what the recipe calls: ``publish(model, version)`` (collective), then
on rank 0 ``deliver(version)``, which returns once the generator serves that version (its
acknowledgement). It keeps the version bookkeeping; a transport moves the bytes:

- :class:`FileTransport` (every generator but the in-process one) writes a publication into
  the sync directory (``simko_tune.generation.sync_dir``): safetensors shards in Hugging Face
  names, in the generation engine's dtype (``simko_tune.generation.shards``), written by
  every trainer rank on rank 0's node, each its disjoint share, then ``manifest.json``
  (version, files, sizes, checksums) last and the folder published by rename, so a reader
  never sees a partial publication. Workers verify sizes and checksums before loading.
  Older versions are pruned only after the acknowledgement.
- :class:`MemoryTransport` (one trainer rank, the native generator in its own process) hands
  over an in-memory copy of the weights taken at publish time: the same versions and
  deferred delivery, no files.

Another transport (an NCCL broadcast into the engines, say) would be a third class with the
same three methods.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from simko_tune.fs import Manifest, ManifestError, checksum_file, replace_dir
from simko_tune.generation.deltas import DELTA_SUFFIX, DeltaSettings, DeltaWriter, publication_kind
from simko_tune.generation.shards import (
    CHECKSUM,
    _check_digest,
    _publication_writers,
    checkpoint_shapes,
    publication_bytes,
    write_shards,
)
from simko_tune.generation.sync_dir import (
    MANIFEST,
    prepare_sync_dir,
    prune_versions,
    remove_versions,
    spare_bytes,
    take_spare,
    version_dir,
)
from simko_tune.generation.types import (
    LOAD_TIMEOUT_S,
    DeltaRefused,
    GenerationError,
    PublicationError,
)
from simko_tune.parallel.collectives import (
    all_gather_object,
    barrier,
    broadcast_object,
    unshard,
    world_size,
)
from simko_tune.parallel.collectives import rank as process_rank

log = logging.getLogger(__name__)


def publish_weights(
    model: nn.Module,
    version: int,
    sync_dir: str | Path,
    hf_config: dict,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2**30,
    writers: list[int] | None = None,
    delta: DeltaWriter | None = None,
) -> Path | None:
    """Publish ``model``'s weights as ``version`` for the generation workers (collective;
    the shards are written as :func:`write_shards` says, through ``delta`` when given, after
    its ``begin``). A full publication is written over the spare, a pruned one, when there
    is one. Rank 0 then writes the manifest last and renames the folder into place; it
    returns the publication's path, the other ranks ``None``."""
    if version <= 0:
        raise ValueError(
            f"published versions must be positive (0 is the initial checkpoint): {version}"
        )
    rank = process_rank()
    final = version_dir(sync_dir, version)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if delta is None or delta.delta_base is None:  # a delta's files are small and new
            take_spare(sync_dir, tmp)
    kwargs = {} if delta is None else {"write": delta.write}
    files = write_shards(
        model,
        tmp,
        hf_config,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        writers=writers,
        **kwargs,
    )
    if rank != 0:
        return None
    base = delta.delta_base if delta is not None else None
    return _finish_publication(tmp, final, version, files, base)


def _finish_publication(
    tmp: Path, final: Path, version: int, files: list[dict], base: int | None
) -> Path:
    """Rank 0: the manifest last, then the folder renamed into place (a republished version,
    a resume or a refused delta, replaces the old one whole). Files of a recycled spare
    that this version did not write over go first."""
    written = {f["name"] for f in files}
    for p in tmp.iterdir():
        if p.name not in written:
            p.unlink()
    kind = publication_kind(files)
    fields = {"version": version, "kind": kind, **({"base": base} if kind == "delta" else {})}
    entries = {f["name"]: {k: v for k, v in f.items() if k != "name"} for f in files}
    Manifest(entries, fields).write(tmp / MANIFEST, fsync=False)
    replace_dir(tmp, final, fsync=False)
    return final


def read_manifest(sync_dir: str | Path, version: int) -> tuple[Path, list[dict]]:
    """:func:`read_publication` without the manifest's own fields."""
    folder, files, _ = read_publication(sync_dir, version)
    return folder, files


def read_publication(sync_dir: str | Path, version: int) -> tuple[Path, list[dict], dict]:
    """Everything about a publication but its checksums: the manifest exists and names
    this version, its names and delta targets are plain file names of the publication's
    folder, every listed file has its size, and no unlisted shard is present (the
    loader would read it). Returns the folder, the file entries (``name`` included), in
    the order they were written, and the manifest's fields (``kind``, a delta's ``base``)."""
    folder = version_dir(sync_dir, version)
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".tmp")
        hint = " (only a partial .tmp folder exists)" if partial.exists() else ""
        raise PublicationError(f"{folder}: weight version {version} is not published{hint}")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise PublicationError(f"{manifest_path}: manifest missing; publication is incomplete")
    try:
        manifest = Manifest.read(manifest_path, plain=True, name_fields=("target",))
    except ManifestError as e:
        raise PublicationError(str(e)) from e
    if manifest.fields.get("version") != version:
        raise PublicationError(
            f"{manifest_path}: names version {manifest.fields.get('version')}, expected {version}"
        )
    unlisted = sorted(
        p.name
        for pattern in ("*.safetensors", f"*{DELTA_SUFFIX}")
        for p in folder.glob(pattern)
        if p.name not in manifest.files
    )
    if unlisted:
        raise PublicationError(f"{folder}: shards not in the manifest: {unlisted}")
    problems = manifest.size_problems(folder)
    if problems:
        raise PublicationError(problems[0])
    files = [{"name": name, **entry} for name, entry in manifest.files.items()]
    return folder, files, manifest.fields


def verify_publication(sync_dir: str | Path, version: int) -> tuple[Path, dict[str, list[int]]]:
    """Check a publication before anything loads it (:func:`read_manifest`, then every
    file's checksum). Returns the folder and ``{tensor name: shape}``."""
    folder, files = read_manifest(sync_dir, version)
    return folder, verified_shapes(folder, files)


def verified_shapes(folder: Path, files: list[dict]) -> dict[str, list[int]]:
    """Every file's checksum against its entry, then ``{tensor name: shape}``."""
    for f in files:
        path = folder / f["name"]
        _check_digest(path, checksum_file(path), f[CHECKSUM])
    return checkpoint_shapes([folder / f["name"] for f in files])


class WeightConsumer(Protocol):
    """What receives publications: a generator whose ``load_weights`` returns once every
    worker serves ``version`` (its acknowledgement) or raises."""

    def load_weights(self, version: int, timeout_s: float = ...) -> None: ...


class InMemoryConsumer(Protocol):
    """What receives in-memory publications: a generator in the trainer's own process that
    copies ``state`` (the trainer's ``state_dict`` names) into its model."""

    def load_state(self, version: int, state: dict[str, torch.Tensor]) -> None: ...


class FileTransport:
    """Publications in a sync directory, loaded by worker processes (see the module doc)."""

    def __init__(
        self,
        sync_dir: str | Path,
        hf_config: dict,
        dtype: torch.dtype | None,
        max_shard_bytes: int,
        remove_on_close: bool,
        delta: DeltaSettings | None = None,
    ) -> None:
        self.sync_dir = Path(sync_dir)
        self.hf_config = hf_config
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self.remove_on_close = remove_on_close
        self._pruner: threading.Thread | None = None
        self._lock = threading.Lock()  # the pruner hand-over (the rollout thread delivers too)
        error = None
        if process_rank() == 0:
            try:
                prepare_sync_dir(self.sync_dir)
            except (OSError, PublicationError) as e:
                error = e
        if _agree_on_error(error):
            raise error or PublicationError(
                f"sync dir {self.sync_dir}: rank 0 could not prepare it"
            )
        self._writers = _publication_writers()
        self.delta = DeltaWriter(delta) if delta is not None else None
        self._kinds: dict[int, str] = {}  # rank 0: version -> "full" | "delta"
        self.last_stats: dict[str, float] = {}

    def publish(self, model: nn.Module, version: int) -> Path | None:
        """Check free space (rank 0, agreed by all), then write the publication: whole, or
        with deltas as :class:`~simko_tune.generation.deltas.DeltaWriter` decides."""
        error = None
        if process_rank() == 0:
            self._join_pruner()
            need = publication_bytes(model, self.dtype)
            free = shutil.disk_usage(self.sync_dir).free + spare_bytes(self.sync_dir)
            if free < need:
                error = PublicationError(
                    f"sync dir {self.sync_dir}: {free / 2**30:.2f} GiB free, publishing "
                    f"version {version} needs {need / 2**30:.2f} GiB; free space there, or "
                    "point generation.sync_dir at a larger filesystem"
                )
        if _agree_on_error(error):
            raise error or PublicationError(f"sync dir {self.sync_dir}: not enough free space")
        if self.delta is not None:
            self.delta.begin(version)
        ok = False
        try:
            path = publish_weights(
                model,
                version,
                self.sync_dir,
                self.hf_config,
                dtype=self.dtype,
                max_shard_bytes=self.max_shard_bytes,
                writers=self._writers,
                delta=self.delta,
            )
            ok = True
        finally:
            if self.delta is not None:
                self.delta.end(ok)
        if path is not None:
            self._record(version, path)
        return path

    def _record(self, version: int, path: Path) -> None:
        """Rank 0: the publication's kind (a refused delta is republished whole) and what it
        moved: ``bytes`` written, ``bytes_frac`` of a full publication, ``delta`` 1/0."""
        files = Manifest.read(path / MANIFEST).files.values()
        written = sum(f["bytes"] for f in files)
        full = sum(f.get("target_bytes", f["bytes"]) for f in files)
        kind = publication_kind(list(files))
        self._kinds[version] = kind
        self.last_stats = {
            "bytes": float(written),
            "bytes_frac": written / max(full, 1),
            "delta": float(kind == "delta"),
        }
        if self.delta is not None:
            self.last_stats["encode_s"] = self.delta.stats.get("encode_s", 0.0)
            if kind == "full" and self.delta.delta_base is not None:
                log.info(
                    "weight version %d published whole: its deltas were not smaller than "
                    "%.0f%% of the shards (large updates)",
                    version,
                    100 * self.delta.settings.max_ratio,
                )

    def republish_full(self, version: int) -> None:
        """Write ``version``, the last publication, whole from the bytes the writers hold
        (collective): what a worker that refused its delta loads instead."""
        final = version_dir(self.sync_dir, version)
        tmp = final.with_name(final.name + ".tmp")
        if process_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if not take_spare(self.sync_dir, tmp):
                tmp.mkdir(parents=True)
        barrier()
        entries = self.delta.write_full(version, tmp) if self.delta is not None else []
        files = [f for rank_files in all_gather_object(entries) for f in rank_files]
        if process_rank() == 0:
            self._record(version, _finish_publication(tmp, final, version, files, None))

    def deliver(self, consumer: WeightConsumer, version: int, timeout_s: float) -> dict:
        """The workers load ``version`` and acknowledge; then older versions are pruned in
        the background. Returns the workers' own ``verify_s`` and ``reload_s``."""
        try:
            consumer.load_weights(version, timeout_s)
        except GenerationError as e:
            if self._kinds.get(version) == "delta":
                raise DeltaRefused(version, f"weight version {version}, a delta: {e}") from e
            raise
        with self._lock:
            if self._pruner is not None:
                self._pruner.join()
            self._pruner = threading.Thread(
                target=prune_versions, args=(self.sync_dir, version), daemon=True
            )
            self._pruner.start()
        return dict(getattr(consumer, "last_load_timings", {}))

    def _join_pruner(self) -> None:
        with self._lock:
            if self._pruner is not None:
                self._pruner.join()
                self._pruner = None

    def close(self) -> None:
        """Wait for pruning; with ``remove_on_close`` remove every publication (the workers
        hold their weights in memory; nothing reads them after the run)."""
        self._join_pruner()
        if self.remove_on_close and self.sync_dir.is_dir():
            remove_versions(self.sync_dir)
            try:
                self.sync_dir.rmdir()
            except OSError:
                pass  # something else lives there: leave it


class MemoryTransport:
    """Publications as in-memory copies for a generator in the trainer's own process: a copy
    taken when the trainer publishes, so a deferred delivery hands over exactly that
    version's weights while the trainer goes on updating its own. No files, no checksums:
    the bytes never leave the process."""

    sync_dir = None

    def __init__(self, dtype: torch.dtype | None) -> None:
        if world_size() > 1:
            raise ValueError(
                "in-memory weight transfer needs one trainer rank: the consumer holds a "
                "whole, unsharded copy (use a sync dir with several ranks)"
            )
        self.dtype = dtype
        self._lock = threading.Lock()  # the trainer publishes while the rollout thread delivers
        # version -> its snapshot, until delivered (two at most: one-step-off)
        self._snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def publish(self, model: nn.Module, version: int) -> None:
        """A copy of the weights as they are now. A model sharded on a one-rank mesh
        (torchrun with one process) holds DTensors: the consumer gets their whole values."""
        snapshot = {
            name: unshard(t).detach().to(self.dtype or t.dtype, copy=True)
            for name, t in model.state_dict().items()
        }
        with self._lock:
            self._snapshots[version] = snapshot

    def deliver(self, consumer: InMemoryConsumer, version: int, timeout_s: float) -> dict:
        with self._lock:
            snapshot = self._snapshots.get(version)
            if snapshot is None:
                raise PublicationError(
                    f"version {version}: no snapshot in memory (only the newest "
                    "published version can be delivered)"
                )
            for v in [v for v in self._snapshots if v <= version]:
                del self._snapshots[v]  # a newer one, being delivered later, stays
        consumer.load_state(version, snapshot)
        return {}

    def close(self) -> None:
        self._snapshots.clear()


class WeightSync:
    """Publishes the trainer's weights as numbered versions and delivers them to the
    generator (see the module doc). ``sync_dir=None`` selects the in-memory transport.

    One-step-off, the rollout thread delivers a version just before it generates with it,
    so the workers' reload overlaps the trainer's next update instead of stalling it; that
    thread and the trainer's may then publish and deliver at once (each transport guards
    its own state), and up to three versions can be in the sync dir.

    With deltas (``delta``), a worker may refuse one (:class:`DeltaRefused`); the writers
    then republish that version whole from the bytes they hold, at once when the delivery
    is the trainer's own, else at the start of the next publication (every rank is there),
    while the rollout thread waits for it. A version is therefore always delivered before
    the next one is written: the writers hold only the last one's bytes."""

    def __init__(
        self,
        sync_dir: str | Path | None,
        hf_config: dict,
        *,
        dtype: torch.dtype | None = None,
        max_shard_bytes: int = 2**30,
        remove_on_close: bool = False,
        delta: DeltaSettings | None = None,
        timeout_s: float = LOAD_TIMEOUT_S,
    ) -> None:
        if sync_dir is None and delta is not None:
            raise ValueError("weight deltas need a sync dir (in-memory transfer copies nothing)")
        self.transport: FileTransport | MemoryTransport = (
            MemoryTransport(dtype)
            if sync_dir is None
            else FileTransport(sync_dir, hf_config, dtype, max_shard_bytes, remove_on_close, delta)
        )
        self.sync_dir = self.transport.sync_dir
        self.deltas = delta is not None
        self.timeout_s = timeout_s
        self.rank = process_rank()
        self.consumer: WeightConsumer | InMemoryConsumer | None = None
        self.written: int | None = None  # the newest version this sync published
        self.acknowledged: int | None = None  # the version the consumer serves
        # seconds of the last publish: "write" and, when it delivered, "ack" (until the
        # generator serves it) with the workers' "verify" and "reload"; logged as metrics
        self.last_timings: dict[str, float] = {}
        # rank 0, file transport: what the last publication wrote (``bytes``, ``bytes_frac``
        # of a full one, ``delta`` 1/0, ``encode_s``), logged as weights/<key>
        self.last_stats: dict[str, float] = {}
        # rank 0, deltas: the version another thread will deliver, a refused one, and the
        # condition the rollout thread and the trainer wait on for each other
        self._reserved: int | None = None
        self._refused: int | None = None
        self._settled = threading.Condition()

    def attach(self, consumer: WeightConsumer | InMemoryConsumer) -> None:
        """Rank 0: the generator every publication is delivered to."""
        if isinstance(self.transport, MemoryTransport) and not hasattr(consumer, "load_state"):
            raise TypeError(
                f"{type(consumer).__name__} loads weights from files: in-memory weight "
                "transfer needs a generator in this process (generation.backend=native)"
            )
        self.consumer = consumer

    def publish(
        self,
        model: nn.Module,
        version: int,
        timeout_s: float | None = None,
        *,
        deliver: bool = True,
    ) -> Path | None:
        """Write ``model`` as ``version`` (collective), then on rank 0, with ``deliver``,
        hand it to the consumer at once (:meth:`deliver`; ``timeout_s`` default: this sync's).
        Returns the publication's path on rank 0, None elsewhere and in memory."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        t0 = time.perf_counter()
        if self.deltas:
            self._republish_refused()
        path = self.transport.publish(model, version)
        self.written = version
        self.last_timings = {"write_s": time.perf_counter() - t0}
        self.last_stats = dict(getattr(self.transport, "last_stats", {}))
        if not deliver:
            return path
        refused = None
        if self.rank == 0:
            try:
                self.last_timings.update(self._deliver(version, timeout_s))
            except DeltaRefused as e:
                refused = e
        if self.deltas and broadcast_object(refused is not None):  # every rank rewrites it
            log.warning("%s; republishing it whole", refused)
            self.transport.republish_full(version)
            if self.rank == 0:
                self.last_timings.update(self._deliver(version, timeout_s))
        return path

    def reserve(self, version: int) -> None:
        """Rank 0: another thread (the rollout thread, one-step-off) is about to deliver
        ``version``. With deltas, the next publication waits until that delivery settled,
        so a refused delta is republished before the writers replace its bytes."""
        with self._settled:
            self._reserved = version

    def deliver(self, version: int, timeout_s: float | None = None) -> dict[str, float]:
        """Rank 0: make the consumer serve ``version``, a publication of this sync, and wait
        for its acknowledgement (at most ``timeout_s``; default: this sync's, which the
        recipe sets to generation.load_timeout_s). A no-op without a consumer, when it
        already serves ``version``, or for a version this sync has not published (the
        start-up weights).
        Returns the seconds it took: ``ack_s`` and the workers' own share of it,
        ``verify_s`` and ``reload_s`` (the rest is messaging).

        A refused delta, delivered from another thread than the trainer's, waits for the
        trainer's next publication to republish it whole, then delivers that."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            try:
                return self._deliver(version, timeout_s)
            except DeltaRefused as e:
                if threading.current_thread() is threading.main_thread():
                    raise  # the trainer's own thread: only publish() can republish
                if self._reserved != version or self.written != version:
                    raise DeltaRefused(
                        version, f"{e}; not reserved (WeightSync.reserve), cannot be republished"
                    ) from e
                log.warning("%s; waiting for the trainer to republish it whole", e)
                with self._settled:
                    self._refused = version
                    self._settled.notify_all()
                    if not self._settled.wait_for(lambda: self._refused is None, timeout_s):
                        raise DeltaRefused(
                            version, f"{e}; the trainer did not republish it in {timeout_s:.0f} s"
                        ) from e
                return self._deliver(version, timeout_s)
        finally:
            with self._settled:
                if self._reserved == version:
                    self._reserved = None
                    self._settled.notify_all()

    def _deliver(self, version: int, timeout_s: float) -> dict[str, float]:
        if (
            self.consumer is None
            or version == self.acknowledged
            or self.written is None
            or version > self.written
        ):
            return {}
        t0 = time.perf_counter()
        timings = self.transport.deliver(self.consumer, version, timeout_s)
        with self._settled:
            self.acknowledged = version
            self._settled.notify_all()
        return {"ack_s": time.perf_counter() - t0, **timings}

    def _republish_refused(self) -> None:
        """Collective, with deltas: rank 0 waits until a reserved delivery settled (the
        rollout thread's: delivered, refused or failed), all ranks agree on a refusal,
        and the writers republish that version whole before they write the next."""
        refused = None
        if self.rank == 0:
            with self._settled:
                self._settled.wait_for(
                    lambda: self._reserved is None or self._refused is not None, self.timeout_s
                )
                refused = self._refused
        refused = broadcast_object(refused)
        if refused is None:
            return
        self.transport.republish_full(refused)
        if self.rank == 0:
            with self._settled:
                self._refused = None
                self._settled.notify_all()

    def close(self) -> None:
        """Rank 0: release the transport (see its ``close``)."""
        if self.rank == 0:
            self.transport.close()


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
