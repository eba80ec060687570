"""RewardPool: real spawned workers, real SIGKILLs, hostile inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import child_env

from simko_tune.rewards import RewardPool, answers_match

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers inherit sys.path
import group_signal_child  # noqa: E402
import reward_scripts  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT_S = 1.5


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def pool():
    with RewardPool(
        num_workers=2, timeout_s=TIMEOUT_S, reward_fn=reward_scripts.scripted_reward
    ) as p:
        yield p


def _delta(pool: RewardPool, before) -> dict:
    after = dataclasses.asdict(pool.stats)
    return {k: after[k] - v for k, v in dataclasses.asdict(before).items()}


NORMAL = [
    ("so \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("so \\boxed{2}", "\\frac{1}{2}", 0.0),
    ("The final answer is $204$.", "204", 0.0),  # boxed mode: no box, no reward
    ("\\boxed{(2,1)}", "(1,2)", 0.0),
    ("\\boxed{1, -2}", "-2,1", 1.0),
    ("nothing", "3", 0.0),
    ("\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", "(1,2)", 1.0),
]


def _check_normal(pool: RewardPool) -> None:
    responses, golds, expected = zip(*NORMAL)
    assert pool.score(list(responses), list(golds)) == list(expected)


def test_order_preserved_across_many_checks(pool):
    responses, golds, expected = zip(*(NORMAL * 6))
    before = dataclasses.replace(pool.stats)
    assert pool.score(list(responses), list(golds)) == list(expected)
    assert _delta(pool, before) == dict(
        checks=len(expected), timeouts=0, crashes=0, rescored=0, errors=0, worker_restarts=0
    )
    assert pool.score([], []) == []


def test_workers_are_reused_across_calls(pool):
    pids = pool.worker_pids()
    first = pool.score(["pid"] * 4, ["0"] * 4)
    second = pool.score(["pid"] * 4, ["0"] * 4)
    assert set(first) | set(second) <= {float(p) for p in pids}
    assert pool.worker_pids() == pids


def test_timeout_kills_and_replaces_worker(pool):
    before = dataclasses.replace(pool.stats)
    pids = set(pool.worker_pids())
    start = time.monotonic()
    scores = pool.score(["\\boxed{1}", "sleep", "\\boxed{3}"], ["1", "1", "3"])
    elapsed = time.monotonic() - start
    assert scores == [1.0, 0.0, 1.0]
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 10
    assert _delta(pool, before)["timeouts"] == 1
    assert _delta(pool, before)["worker_restarts"] == 1
    killed = pids - set(pool.worker_pids())
    assert len(killed) == 1 and not _alive(killed.pop())
    _check_normal(pool)


def test_failures_inside_a_chunk_requeue_the_rest(pool):
    """Big batches go out in chunks: a hang or crash mid-chunk scores only that check 0
    (the crash after its rescore); the checks queued behind it are rerun elsewhere and
    keep their order."""
    batch = NORMAL * 6
    batch[5] = ("sleep", "1", 0.0)
    batch[20] = ("crash", "1", 0.0)
    responses, golds, expected = zip(*batch)
    before = dataclasses.replace(pool.stats)
    assert pool.score(list(responses), list(golds)) == list(expected)
    delta = _delta(pool, before)
    assert (delta["timeouts"], delta["crashes"], delta["checks"]) == (1, 1, len(batch))
    assert delta["rescored"] == 1


def test_a_check_that_kills_its_worker_twice_scores_zero(pool):
    """Each crashing check is scored again on a fresh worker, crashes again, scores 0."""
    before = dataclasses.replace(pool.stats)
    assert pool.score(["crash", "\\boxed{5}", "crash"], ["5", "5", "5"]) == [0.0, 1.0, 0.0]
    delta = _delta(pool, before)
    assert (delta["crashes"], delta["rescored"], delta["worker_restarts"]) == (2, 2, 4)
    assert delta["timeouts"] == 0 and delta["checks"] == 3
    _check_normal(pool)


def test_a_worker_killed_from_outside_mid_check_is_rescored():
    """The OOM killer or a stray signal is not the check's fault: its check is scored again
    on the fresh worker, and every answer keeps its right score."""
    with RewardPool(num_workers=2, timeout_s=30.0, reward_fn=group_signal_child.slow_reward) as p:
        p.score(["\\boxed{1}"], ["1"])
        victim = p.worker_pids()[0]
        killer = threading.Timer(
            3 * group_signal_child.SLOW_S / 2, os.kill, (victim, signal.SIGKILL)
        )
        killer.start()
        scores = p.score([f"\\boxed{{{i}}}" for i in range(6)], [str(i) for i in range(6)])
        killer.join()
        assert scores == [1.0] * 6
        assert (p.stats.rescored, p.stats.crashes, p.stats.worker_restarts) == (1, 0, 1)
        assert victim not in p.worker_pids()


def test_raising_reward_scores_zero_and_worker_survives(pool):
    before = dataclasses.replace(pool.stats)
    pids = pool.worker_pids()
    assert pool.score(["raise", "\\boxed{5}"], ["5", "5"]) == [0.0, 1.0]
    assert _delta(pool, before)["errors"] == 1
    assert pool.worker_pids() == pids


def test_address_space_limit_stops_memory_hog(pool):
    before = dataclasses.replace(pool.stats)
    assert pool.score(["hog"], ["1"]) == [0.0]
    delta = _delta(pool, before)
    assert delta["errors"] + delta["crashes"] == 1
    _check_normal(pool)


def test_mismatched_lengths_rejected(pool):
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        pool.score(["a", "b"], ["a"])


def test_sympy_hang_is_killed_at_the_limit(pool):
    """Passes every guard, but simplify() on degree-900 polynomials next to an undefined
    function (so sampling cannot decide) runs for minutes: the wall clock must end it."""
    hang = "\\boxed{f(x)+\\frac{(x+1)^{900}-(x-1)^{900}}{(x^{2}+1)^{449}}}"
    before = dataclasses.replace(pool.stats)
    start = time.monotonic()
    assert pool.score([hang], ["f(x)"]) == [0.0]
    assert time.monotonic() - start < TIMEOUT_S + 10
    delta = _delta(pool, before)
    assert delta["timeouts"] == 1 and delta["worker_restarts"] == 1
    _check_normal(pool)


HOSTILE = [
    "__import__('os').system('touch X')",
    "eval(\"__import__('os').system('touch X')\")",
    "9**9**9**9",
    "9^9^9^9",
    "10^{10^{10^{10}}}",
    "\\frac{1}{0}",
    "{" * 100 + "1" + "}" * 100,
    "(" * 5000 + "1" + ")" * 5000,
    "1" * (1 << 20),
    "2^{2^{2^{2^{2^{2}}}}}",
    "(10^{6})!",
    "\\sum_{k=1}^{10^{9}} k",
    "\\int_0^1 x dx",
]
# Free-form responses for the math_verify mode, whose plain-expression extractor hands
# regex-limited text to sympy's parse_expr.
HOSTILE_RESPONSES = [f"The answer is {h}" for h in HOSTILE] + [
    f"The answer is ${h}$" for h in HOSTILE if len(h) < 1000
]


@pytest.mark.parametrize("pred", HOSTILE, ids=[repr(h)[:30] for h in HOSTILE])
def test_hostile_prediction_in_process(pred, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert answers_match(pred, "7") is False
    assert answers_match(pred, "2.5") is False  # a decimal gold evaluates the prediction
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize("mode", ["boxed", "math_verify"])
def test_hostile_inputs_in_pool(mode, tmp_path, monkeypatch):
    """Raw, boxed and free-form hostile answers score 0 within the limit, run nothing, and
    leave the pool healthy."""
    monkeypatch.chdir(tmp_path)  # workers inherit the cwd: `touch X` would land here
    with (
        RewardPool(num_workers=2, timeout_s=5.0, mode=mode) as pool,
        RewardPool(
            num_workers=1, timeout_s=5.0, reward_fn=reward_scripts.prediction_reward
        ) as raw_pool,
    ):
        responses = [f"The result is $\\boxed{{{h}}}$." for h in HOSTILE] + HOSTILE_RESPONSES
        start = time.monotonic()
        assert pool.score(responses, ["7"] * len(responses)) == [0.0] * len(responses)
        # each check ends by itself or at the limit: never later than the limit (+ slack)
        assert time.monotonic() - start < len(responses) * (5.0 + 2.0) / 2
        assert raw_pool.score(HOSTILE, ["7"] * len(HOSTILE)) == [0.0] * len(HOSTILE)
        for p in (pool, raw_pool):
            assert p.stats.crashes == 0 and p.stats.errors == 0
        if mode == "boxed":  # our size guards refuse them before any parsing
            assert pool.stats.timeouts == 0
        assert pool.score(["So $\\boxed{4}$.", "\\boxed{5}"], ["4", "4"]) == [1.0, 0.0]
    assert not (tmp_path / "X").exists()


def test_math_verify_mode_in_pool():
    with RewardPool(num_workers=1, timeout_s=5.0, mode="math_verify") as pool:
        assert pool.mode == "math_verify"
        responses = ["The final answer is $204$.", "Answer \\[ 9 \\]", "so 1,000.99€", "nothing"]
        assert pool.score(responses, ["204", "9", "1000.99", "3"]) == [1.0, 1.0, 1.0, 0.0]


def test_close_leaves_no_processes():
    pool = RewardPool(num_workers=2, timeout_s=TIMEOUT_S)
    assert pool.score(["\\boxed{4}"], ["4"]) == [1.0]
    pids = pool.worker_pids()
    assert all(_alive(p) for p in pids)
    pool.close()
    pool.close()  # idempotent
    assert not any(_alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="after close"):
        pool.score(["1"], ["1"])


GROUP_CHILD = Path(__file__).with_name("group_signal_child.py")


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signal_to_the_whole_process_group_spares_the_workers(signum):
    """SLURM's ``--signal`` and ``scancel`` signal every process of the job step: the
    trainer records a preemption, its reward workers score on, every answer correctly."""
    proc = subprocess.Popen(
        [sys.executable, str(GROUP_CHILD), "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, env=child_env(),
    )  # fmt: skip
    try:
        assert proc.stdout.readline() == "scoring\n"
        for _ in range(3):  # mid-check (each check takes SLOW_S), more than once
            time.sleep(0.3)
            os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-4000:]
    result = json.loads(out.splitlines()[-1])
    assert result["signal"] == signum.name
    assert result["scores"] == [1.0] * 8
    assert result["stats"]["crashes"] == 0 and result["stats"]["worker_restarts"] == 0


def test_a_stop_signal_while_workers_start_does_not_kill_them():
    """Blocked from the spawn until the worker ignores it: a signal that comes while the
    interpreter starts (before any handler could be installed) is dropped too."""
    with RewardPool(num_workers=2, timeout_s=30.0) as p:
        pids = p.worker_pids()
        for _ in range(20):
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGUSR1)
            time.sleep(0.05)
        assert p.score(["\\boxed{4}", "\\boxed{5}"], ["4", "4"]) == [1.0, 0.0]
        assert p.worker_pids() == pids and p.stats.worker_restarts == 0
