"""Resumable training checkpoints: model and optimizer through DCP, everything else beside.

Layout of ``<output_dir>/step_00000120/``::

    dcp/             model + optimizer, one shard file per rank (torch.distributed.checkpoint)
    extra.pt         rank 0: the caller's ``extra`` and the LR scheduler state
    rng_rank00000.pt one per rank: torch (CPU and CUDA), numpy and python RNG states
    COMPLETE         JSON {"step", "files"}, written last

A checkpoint is assembled in ``step_XXXXXXXX.tmp`` and published by one rename after its
``COMPLETE`` marker is written, so a crash at any point leaves either the previous complete
checkpoint or an ignorable ``.tmp`` directory (incomplete checkpoints taken as complete:
prime-rl #1805). ``save`` and ``load`` are collective: every rank calls them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from simko_tune.parallel.collectives import barrier

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _rng_states() -> dict[str, Any]:
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


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is."""
    if path.name.endswith(".tmp"):
        return "unpublished .tmp directory (its writer stopped before the rename)"
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker"
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} marker ({e})"
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        return f"files listed in {MARKER} are missing: {missing[:3]}"
    return None


class CheckpointManager:
    """Saves, finds and loads step checkpoints under ``output_dir``, keeping the last
    ``keep_last`` complete ones."""

    def __init__(self, output_dir: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last must be >= 1, got {keep_last}")
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last

    def step_dir(self, step: int) -> Path:
        return self.output_dir / f"step_{step:08d}"

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any | None = None,
        extra: dict[str, Any],
    ) -> Path:
        """Write checkpoint ``step`` (collective) and return its published directory.

        ``extra`` (data position, weight version, metrics, ...) holds plain Python values and
        tensors; it comes back from ``load`` as saved.
        """
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        rank = _rank()
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
        torch.save(_rng_states(), tmp / f"rng_rank{rank:05d}.pt")
        if rank == 0:
            scheduler_sd = lr_scheduler.state_dict() if lr_scheduler is not None else None
            torch.save({"extra": extra, "lr_scheduler": scheduler_sd}, tmp / "extra.pt")
        barrier()

        if rank == 0:
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            _fsync_write(tmp / MARKER, json.dumps({"step": step, "files": files}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
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
                None if _STEP_DIR.match(path.name) else "not a step_XXXXXXXX name"
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
        return the ``extra`` dict it was saved with."""
        path = Path(path)
        reason = incomplete_reason(path)
        if reason:
            raise ValueError(f"{path}: not a complete checkpoint: {reason}")
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
        rng_file = path / f"rng_rank{_rank():05d}.pt"
        if rng_file.is_file():
            _set_rng_states(torch.load(rng_file, weights_only=True))
        else:
            log.warning("%s: no RNG state for rank %d (saved by fewer ranks)", path, _rank())
        return saved["extra"]


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
