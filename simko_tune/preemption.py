"""Preemption: a SIGTERM (or SLURM's early SIGUSR1) becomes a stop every rank agrees on.

Schedulers signal a job and kill it a grace period later; torchrun forwards the signal to
its ranks and SIGKILLs them ``--shutdown-timeout`` seconds after (30 by default). The
handler only sets a flag: a rank never leaves from inside a handler, where it could abandon
its peers in a collective. The training loop asks :meth:`PreemptionWatch.agreed` at fixed
points of each step; every rank asks at the same points, the answer is reduced over all of
them (any rank's flag stops them all), and the loop then writes a normal checkpoint and
leaves with :data:`EXIT_CODE`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence

import torch

from simko_tune.parallel.collectives import all_reduce_max

log = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): a temporary failure, the run asks to be started again. Schedulers
# requeue on a non-zero code; `resume=auto` then continues from the checkpoint just written.
EXIT_CODE = 75


class Preempted(Exception):
    """Raised by the loop once the preemption checkpoint is written."""


class PreemptionWatch:
    """Signal handlers that record a preemption request, and the collective check of it.

    ``signals``: names such as ``"SIGTERM"``, ``"SIGUSR1"``. Handlers can only be installed
    from the main thread; elsewhere (a test driving the recipe from a thread) the watch
    stays passive and :meth:`request` is the only way in."""

    def __init__(self, signals: Sequence[str]) -> None:
        self._event = threading.Event()
        self.requested_at: float | None = None
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in signals:
            number = signal_number(name)
            self._previous[number] = signal.signal(number, self._handle)

    @staticmethod
    def check_names(signals: Sequence[str]) -> list[str]:
        """Config errors: names that are not signals of this platform."""
        bad = []
        for name in signals:
            try:
                signal_number(name)
            except ValueError as e:
                bad.append(str(e))
        return bad

    def _handle(self, number: int, frame) -> None:
        if not self._event.is_set():
            self.request(signal.Signals(number).name)

    def request(self, reason: str) -> None:
        """Record a preemption request (what a handled signal does)."""
        self.signal_name = reason
        self.requested_at = time.monotonic()
        self._event.set()
        log.warning("preemption requested (%s): stopping at the next agreed point", reason)

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (collective over the default group: every rank
        calls it at the same points; a single process just reads its flag)."""
        flag = torch.tensor(1.0 if self._event.is_set() else 0.0)
        return bool(all_reduce_max(flag) > 0)

    def seconds_since_request(self) -> float | None:
        return None if self.requested_at is None else time.monotonic() - self.requested_at

    def close(self) -> None:
        """Put the previous handlers back."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def signal_number(name: str) -> int:
    """``"SIGTERM"`` (or ``"TERM"``) → its number on this platform; ValueError otherwise."""
    key = name if name.startswith("SIG") else f"SIG{name}"
    number = getattr(signal.Signals, key, None) if hasattr(signal.Signals, key) else None
    if number is None or key in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"checkpoint.preempt_signals: {name!r} is not a signal that can be caught")
    return int(number)
