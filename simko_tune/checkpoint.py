"""Resumable training checkpoints: model and optimizer through DCP, everything else beside.

Layout of ``<output_dir>/step_00000120/``::

    dcp/             model + optimizer, one shard file per rank (torch.distributed.checkpoint)
    extra.pt         rank 0: the caller's ``extra`` and the LR scheduler state
    rng_rank00000.pt one per rank: torch (CPU and CUDA), numpy and python RNG states
    hf/              optional: the caller's export (the policy as a Hugging Face directory)
    COMPLETE         the manifest (simko_tune.fs.Manifest: every file's bytes and xxh3, the step), last

A checkpoint is assembled in ``step_XXXXXXXX.tmp``; every file is fsynced, the
``COMPLETE`` marker written, and the folder published by one rename, so a crash at any
point leaves either the previous complete checkpoint or an ignorable ``.tmp`` directory
(incomplete checkpoints taken as complete: prime-rl #1805). The marker's checksums catch
what DCP would load silently (a flipped bit in a tensor): :meth:`CheckpointManager.resume`
then falls back to the previous complete checkpoint. ``save``, ``load`` and ``resume`` are
collective: every rank calls them.
"""

from __future__ import annotations

import io
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from simko_tune.fs import Manifest, ManifestError, checksum_file, replace_dir, write_synced
from simko_tune.parallel.collectives import (
    all_gather_object,
    barrier,
    broadcast_object,
    world_size,
)
from simko_tune.parallel.collectives import rank as process_rank
from simko_tune.paths import STEP_DIR, step_dir_name

log = logging.getLogger(__name__)

MARKER = "COMPLETE"


def rng_states() -> dict[str, Any]:
    """This rank's RNG states, as tensors and plain Python values (``weights_only`` loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_synced(obj: Any, path: Path) -> None:
    """``torch.save`` flushed to disk by the rank that wrote it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_synced(path, buffer.getvalue())


def _checksums(root: Path, names: list[str]) -> dict[str, str]:
    """xxh3 of each file, the files spread over the ranks (collective); every rank gets all."""
    rank, world = process_rank(), world_size()
    mine = {n: checksum_file(root / n) for i, n in enumerate(names) if i % world == rank}
    return {k: v for part in all_gather_object(mine) for k, v in part.items()}


def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is (cheap: the marker,
    every listed file present with its size; checksums are verified when loading)."""
    if path.name.endswith(".tmp"):
        return "unpublished .tmp directory (its writer stopped before the rename)"
    if not (path / MARKER).is_file():
        return f"no {MARKER} marker"
    try:
        problems = Manifest.read(path / MARKER).size_problems(path)
    except ManifestError as e:
        return f"unreadable {MARKER} marker ({e})"
    return f"{problems[0]} (and {len(problems) - 1} more)" if problems else None


def corrupt_files(path: Path) -> list[str]:
    """Files whose checksum differs from the marker's (collective: the hashing is spread
    over the ranks). The marker must be readable (:func:`incomplete_reason` is None)."""
    manifest = Manifest.read(path / MARKER)
    return manifest.corrupt(_checksums(path, sorted(manifest.files)))


class CheckpointLoadError(RuntimeError):
    """A checkpoint that looked complete could not be loaded (corrupt or unreadable)."""


class CheckpointManager:
    """Saves, finds and loads step checkpoints under ``output_dir``, keeping the last
    ``keep_last`` complete ones."""

    def __init__(self, output_dir: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last must be >= 1, got {keep_last}")
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last

    def step_dir(self, step: int) -> Path:
        return self.output_dir / step_dir_name(step)

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any | None = None,
        extra: dict[str, Any],
        write_more: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` (collective) and return its published directory.

        ``extra`` (data position, weight version, metrics, ...) holds plain Python values and
        tensors; it comes back from ``load`` as saved. ``write_more(folder)`` is called on
        every rank to add files (the Hugging Face export) before the marker, so they are
        inside the checkpoint's atomic publication and its checksums.
        """
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        rank = process_rank()
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save(
            {"model": model_sd, "optim": optim_sd},
            checkpoint_id=tmp / "dcp",
            no_dist=not dist.is_initialized(),
        )
        _save_synced(rng_states(), tmp / f"rng_rank{rank:05d}.pt")
        if rank == 0:
            scheduler_sd = lr_scheduler.state_dict() if lr_scheduler is not None else None
            _save_synced({"extra": extra, "lr_scheduler": scheduler_sd}, tmp / "extra.pt")
        if write_more is not None:
            write_more(tmp)
        barrier()

        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        names = broadcast_object(names)  # every rank hashes its share of rank 0's listing
        digests = _checksums(tmp, names)
        if rank == 0:
            Manifest.of(tmp, digests, step=step).write(tmp / MARKER, fsync=True)
            replace_dir(tmp, final, fsync=True)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints, and stale ``.tmp``
        directories (only rank 0 of one run writes here, so none is in progress)."""
        for stale in self.output_dir.glob("step_*.tmp"):
            shutil.rmtree(stale)
        for old in self._complete()[: -self.keep_last]:
            shutil.rmtree(old)

    def _complete(self) -> list[Path]:
        """Complete checkpoints, oldest first; incomplete ones are logged and skipped."""
        found = []
        if not self.output_dir.is_dir():
            return found
        for path in sorted(self.output_dir.iterdir()):
            if not path.name.startswith("step_") or not path.is_dir():
                continue
            reason = incomplete_reason(path) or (
                None if STEP_DIR.match(path.name) else "not a step_XXXXXXXX name"
            )
            if reason:
                log.warning("ignoring checkpoint %s: %s", path, reason)
            else:
                found.append(path)
        return found

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        complete = self._complete()
        return complete[-1] if complete else None

    def load(
        self,
        path: str | Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any | None = None,
    ) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and this rank's RNG from ``path`` (collective);
        return the ``extra`` dict it was saved with. Every file's checksum is verified
        first: :class:`CheckpointLoadError` names the corrupt ones."""
        path = Path(path)
        reason = incomplete_reason(path)
        if reason:
            raise ValueError(f"{path}: not a complete checkpoint: {reason}")
        corrupt = corrupt_files(path)
        if corrupt:
            raise CheckpointLoadError(
                f"{path}: {len(corrupt)} file(s) differ from their {MARKER} checksum "
                f"(corrupt): {corrupt[:3]}"
            )
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path / "dcp", no_dist=not dist.is_initialized())
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        saved = torch.load(path / "extra.pt", weights_only=True)
        if lr_scheduler is not None:
            if saved["lr_scheduler"] is None:
                raise ValueError(f"{path}: saved without an lr_scheduler state")
            lr_scheduler.load_state_dict(saved["lr_scheduler"])
        rng_file = path / f"rng_rank{process_rank():05d}.pt"
        if rng_file.is_file():
            set_rng_states(torch.load(rng_file, weights_only=True))
        else:
            log.warning("%s: no RNG state for rank %d (saved by fewer ranks)", path, process_rank())
        return saved["extra"]

    def resume(
        self,
        resume: str | bool | None,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any | None = None,
    ) -> tuple[Path, dict[str, Any]] | None:
        """Load the checkpoint ``resume`` asks for (see :func:`resolve_resume`) and return
        ``(path, extra)``, or None when there is none. With ``"auto"``, a newest checkpoint
        that fails to load (corrupt files, an unreadable shard) is skipped with a warning
        and the previous complete one is taken; a named checkpoint that fails raises."""
        if resume is None or resume is False:
            return None
        auto = resume is True or resume == "auto"
        candidates = list(reversed(self._complete())) if auto else [resolve_resume(resume, "")]
        failures = []
        for path in candidates:
            try:
                return path, self.load(
                    path, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler
                )
            except Exception as e:
                if not auto:
                    raise
                log.warning("resume: skipping checkpoint %s, it failed to load: %s", path, e)
                failures.append(f"{path}: {e}")
        if failures:  # never restart from scratch silently over checkpoints that exist
            raise CheckpointLoadError(
                "resume=auto: no complete checkpoint loads:\n  " + "\n  ".join(failures)
            )
        return None


def resolve_resume(resume: str | bool | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``"auto"`` (or True) → the newest complete one under
    ``output_dir`` or None; a path → that checkpoint, which must be complete; False/None → None."""
    if resume is None or resume is False:
        return None
    if resume is True or resume == "auto":
        return CheckpointManager(output_dir).latest()
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume: checkpoint directory {path} does not exist")
    reason = incomplete_reason(path)
    if reason:
        raise ValueError(f"resume: {path} is not a complete checkpoint: {reason}")
    return path
