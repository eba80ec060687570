"""Score responses in worker processes, each check under a hard wall-clock limit.

A check that runs past the limit has its worker killed (SIGKILL) and replaced, and scores
0. A worker that dies mid-check is replaced and its check scored again on the new one (a
worker can be killed from outside: the OOM killer, a stray signal); only a check that kills
its worker a second time scores 0. Both zeros are counted. Workers are started with "spawn"
(the trainer holds torch threads, so forking it is unsafe), are reused across calls, and cap
their own address space (RLIMIT_AS) as a second fence against memory blow-ups.

Workers ignore the signals that stop a whole job (:data:`PARENT_STOPS`): schedulers send a
preemption signal to every process of a job step (SLURM's ``--signal``, ``scancel``), and
the trainer, which handles it, stops its workers itself (``close``). They are blocked from
before the spawn until the worker has ignored them, so one that arrives while a worker
starts does not kill it either.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from simko_tune.rewards.grader import reward_fn_for_mode

_STARTUP_TIMEOUT_S = 120.0
_MAX_CHUNK = 16
# What a scheduler or a terminal sends to every process of a job to stop it: the trainer's
# to handle (simko_tune.preemption), never its workers'.
PARENT_STOPS = frozenset(
    {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}
)


@dataclass
class RewardPoolStats:
    """Running counters; the recipe logs them."""

    checks: int = 0
    timeouts: int = 0  # checks killed at the wall-clock limit (scored 0)
    crashes: int = 0  # checks whose worker died twice, on the first try and on the rescore (0)
    rescored: int = 0  # checks scored again on a fresh worker after theirs died
    errors: int = 0  # reward_fn raised (worker survives)
    worker_restarts: int = 0


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _limit_memory(memory_limit_mb: int) -> None:
    """Cap the address space at what the worker already maps (interpreter, sympy) plus
    `memory_limit_mb`, so the cap constrains the checks, not the imports."""
    try:
        base = _address_space_bytes()
    except OSError:
        base = 0
    limit = base + memory_limit_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main(
    conn: Connection, reward_fn: Callable[[str, str], float], memory_limit_mb: int | None
) -> None:
    """Worker loop: receive a chunk of (response, gold) pairs, send back (score, error
    flag) after each one, so the parent can time every check separately."""
    for number in PARENT_STOPS:  # blocked since the spawn (_Worker): ignore, then unblock
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PARENT_STOPS)
    if memory_limit_mb is not None:
        _limit_memory(memory_limit_mb)
    # One untimed check first: it builds the reward's lazy state (Math-Verify's ANTLR
    # parser and regexes, about a second), which would otherwise be charged to a fresh
    # worker's first real check and could time it out.
    try:
        reward_fn("\\boxed{0}", "0")
    except Exception:
        pass
    conn.send("ready")
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for response, gold in chunk:
            try:
                score, failed = float(reward_fn(response, gold)), False
            except Exception:
                score, failed = 0.0, True
            conn.send((score, failed))


class _Worker:
    def __init__(self, ctx, reward_fn, memory_limit_mb) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main, args=(child, reward_fn, memory_limit_mb), daemon=True
        )
        # The child inherits this thread's signal mask: blocked, a stop signal waits in it
        # until _worker_main ignores it. Here it waits for the unblock, or another thread
        # of the trainer takes it meanwhile: the trainer's request is never lost.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_STOPS)
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        child.close()
        self.ready = False
        self.tasks: deque[int] = deque()  # indices sent, in order; the first is running
        self.deadline = 0.0  # for the running check
        self.started = time.monotonic()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class RewardPool:
    """Process pool for reward checks; use as a context manager or call `close()`.

    `mode` picks the math reward (``boxed``: the paper's last-box rule; ``math_verify``:
    Math-Verify's extraction, see `simko_tune.rewards.grader`); a custom
    `reward_fn(response, gold) -> float` (a picklable top-level function) replaces it.
    """

    @classmethod
    def from_config(cls, r: Any) -> RewardPool:
        """The pool a config's ``rewards`` section asks for, as both recipes build it:
        ``fn`` (a dotted path) replaces the ``mode``'s reward."""
        reward_fn = None
        if r.fn:
            module, _, name = str(r.fn).rpartition(".")
            reward_fn = getattr(importlib.import_module(module), name)
        return cls(
            num_workers=r.num_workers, timeout_s=r.timeout_s, reward_fn=reward_fn, mode=str(r.mode)
        )

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        reward_fn: Callable[[str, str], float] | None = None,
        memory_limit_mb: int | None = 1024,
        mode: str = "boxed",
    ) -> None:
        if reward_fn is None:
            reward_fn = reward_fn_for_mode(mode)
        self.mode = mode
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.stats = RewardPoolStats()
        self._reward_fn = reward_fn
        self._memory_limit_mb = memory_limit_mb
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = [self._spawn() for _ in range(num_workers)]
        self._closed = False

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._reward_fn, self._memory_limit_mb)

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = self._spawn()
        self.stats.worker_restarts += 1

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def score(self, responses: Sequence[str], golds: Sequence[str]) -> list[float]:
        """Scores in input order; a check that times out, or kills its worker twice, scores 0.

        Work goes out in small chunks (IPC per check would cost as much as a simple check);
        each result resets the clock, so every single check gets the full `timeout_s`."""
        if self._closed:
            raise RuntimeError("RewardPool.score called after close()")
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        tasks = [(str(r), str(g)) for r, g in zip(responses, golds)]
        scores = [0.0] * len(tasks)
        crashed: set[int] = set()  # checks whose worker died under them once
        pending = deque(range(len(tasks)))
        done = 0
        while done < len(tasks):
            self._dispatch(tasks, pending)
            now = time.monotonic()
            waits = [w.deadline for w in self._workers if w.tasks]
            waits += [w.started + _STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
            ready = wait([w.conn for w in self._workers], max(0.0, min(waits) - now))
            for i in range(len(self._workers)):
                if self._workers[i].conn in ready:
                    done += self._receive(i, scores, pending, crashed)
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.tasks and now >= w.deadline:
                    self.stats.timeouts += 1
                    done += self._fail_running(i, scores, pending)
                elif not w.ready and now >= w.started + _STARTUP_TIMEOUT_S:
                    raise RuntimeError(f"reward worker did not start within {_STARTUP_TIMEOUT_S} s")
        return scores

    def _dispatch(self, tasks: list[tuple[str, str]], pending: deque[int]) -> None:
        idle = [i for i, w in enumerate(self._workers) if w.ready and not w.tasks]
        for i in idle:
            if not pending:
                return
            size = max(1, min(_MAX_CHUNK, len(pending) // (2 * len(self._workers))))
            chunk = [pending.popleft() for _ in range(min(size, len(pending)))]
            w = self._workers[i]
            try:
                w.conn.send([tasks[j] for j in chunk])
            except (BrokenPipeError, OSError):  # died while idle: not these checks' fault
                pending.extendleft(reversed(chunk))
                self._replace(i)
                continue
            w.tasks.extend(chunk)
            w.deadline = time.monotonic() + self.timeout_s

    def _fail_running(
        self, i: int, scores: list[float], pending: deque[int], rescore: bool = False
    ) -> int:
        """Score worker i's running check 0, or with ``rescore`` queue it again first;
        requeue the rest of its chunk, replace the worker. Returns the checks finished."""
        w = self._workers[i]
        task = w.tasks.popleft()
        pending.extendleft(reversed(w.tasks))
        w.tasks.clear()
        self._replace(i)
        if rescore:
            pending.appendleft(task)
            return 0
        scores[task] = 0.0
        self.stats.checks += 1
        return 1

    def _receive(self, i: int, scores: list[float], pending: deque[int], crashed: set[int]) -> int:
        """Handle one message from worker i; returns how many checks it finished."""
        w = self._workers[i]
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            if not w.ready:
                w.process.join()
                raise RuntimeError(
                    f"reward worker failed to start (exit code {w.process.exitcode}); "
                    "a script that creates a RewardPool needs an `if __name__ == '__main__':` guard"
                ) from None
            if not w.tasks:  # died between checks: not a check's fault
                self._replace(i)
                return 0
            task = w.tasks[0]
            if task not in crashed:  # maybe killed from outside: one more try
                crashed.add(task)
                self.stats.rescored += 1
                return self._fail_running(i, scores, pending, rescore=True)
            self.stats.crashes += 1
            return self._fail_running(i, scores, pending)
        if msg == "ready":
            w.ready = True
            return 0
        score, failed = msg
        scores[w.tasks.popleft()] = score
        self.stats.checks += 1
        self.stats.errors += int(failed)
        w.deadline = time.monotonic() + self.timeout_s
        return 1

    def close(self) -> None:
        """Stop every worker (politely, then SIGKILL) and wait for it to exit."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            w.kill()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
