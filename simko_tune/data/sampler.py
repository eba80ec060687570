"""Deterministic, resumable prompt order: which dataset items each RL step uses."""

from __future__ import annotations

from typing import Any

import numpy as np


class PromptBatches:
    """Batches of dataset indices, epoch after epoch. Each epoch is a fresh permutation
    drawn from ``(seed, epoch)``, so the order is a pure function of the position
    ``(epoch, offset)``: saving that position and loading it into a new instance continues
    with exactly the batch that would have come next, skipping and repeating nothing.

    With ``drop_last`` every batch is full and the last ``num_items % batch_size`` items of
    each epoch's permutation are left out (different ones each epoch); without it the last
    batch of an epoch may be short.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_items < (batch_size if drop_last else 1):
            raise ValueError(
                f"{num_items} items cannot fill one batch of {batch_size}"
                + (" (drop_last=True)" if drop_last else "")
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.offset = 0
        self._order = self._epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def next_batch(self) -> list[int]:
        """The next batch of indices; moves on to a new epoch when this one is used up."""
        if self._epoch_finished():
            self.epoch += 1
            self.offset = 0
            self._order = self._epoch_order(self.epoch)
        batch = self._order[self.offset : self.offset + self.batch_size]
        self.offset += len(batch)
        return batch.tolist()

    def peek_batch(self) -> list[int]:
        """The batch :meth:`next_batch` will return, without moving the position: what a
        prefetched rollout draws, so that a checkpoint saved meanwhile still counts that
        batch as unseen (a resumed run neither loses nor repeats it)."""
        ahead = PromptBatches(
            self.num_items, self.batch_size, self.seed, self.shuffle, self.drop_last
        )
        ahead.load_state_dict(self.state_dict())
        return ahead.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position, plus the settings the position is only meaningful with."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. Settings that differ would silently change which
        items come next, so they raise ``ValueError``."""
        for key in ("num_items", "batch_size", "seed", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r}, "
                    f"this sampler has {key}={getattr(self, key)!r}"
                )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset <= self.num_items:
            raise ValueError(f"invalid sampler position epoch={epoch}, offset={offset}")
        self.epoch, self.offset = epoch, offset
        self._order = self._epoch_order(epoch)

    def _epoch_finished(self) -> bool:
        remaining = self.num_items - self.offset
        return remaining < self.batch_size if self.drop_last else remaining == 0

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
