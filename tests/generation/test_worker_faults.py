"""Two real workers: data-parallel seeding, and workers that die or hang mid-request."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from simko_tune.generation import (
    GenerationError,
    SamplingConfig,
    VLLMWorkers,
    check_versions,
    publish_weights,
)
from simko_tune.models import read_hf_config

pytestmark = pytest.mark.slow

ENGINE_KWARGS = {"enforce_eager": True, "dtype": "float32", "max_model_len": 256}
PROMPTS = [[5, 17, 42, 9], [100, 3], [7, 8, 9, 10, 11, 12, 13], [21, 22], [60, 61, 62]]
# Long enough that a kill lands while the request is being served.
HEAVY = SamplingConfig(temperature=1.0, max_tokens=160, ignore_eos=True, seed=3)


@pytest.fixture(scope="module")
def pool(gen_model_dir, tmp_path_factory):
    workers = VLLMWorkers.start_local(
        gen_model_dir,
        num_workers=2,
        sync_dir=tmp_path_factory.mktemp("pool_sync"),
        engine_kwargs=ENGINE_KWARGS,
        log_dir=tmp_path_factory.mktemp("pool_logs"),
        request_timeout_s=300,
        restart_on_failure=True,
    )
    yield workers
    workers.close()


def _tokens(out):
    return [[c.token_ids for c in row] for row in out]


def test_seeded_samples_do_not_depend_on_the_worker_split(pool, vllm_worker):
    sampling = SamplingConfig(temperature=1.0, max_tokens=12, seed=7)
    vllm_worker.load_weights(0)
    single = vllm_worker.generate(PROMPTS, 3, sampling)
    split = pool.generate(PROMPTS, 3, sampling)  # prompts 0-2 on worker 0, 3-4 on worker 1
    assert _tokens(split) == _tokens(single)
    assert len({tuple(t) for t in _tokens(split)[0]}) > 1
    assert _tokens(
        pool.generate(PROMPTS, 3, SamplingConfig(temperature=1.0, max_tokens=12, seed=8))
    ) != _tokens(split)


def _kill_during(pool, sampling, prompts, n, delay_s):
    """Run a request and SIGKILL worker 0 ``delay_s`` into it; returns (result or error,
    kill time, end time)."""
    pid = pool.ping()[0]["pid"]
    killed = []
    timer = threading.Timer(
        delay_s, lambda: (os.kill(pid, signal.SIGKILL), killed.append(time.monotonic()))
    )
    timer.start()
    try:
        result = pool.generate(prompts, n, sampling)
    except GenerationError as e:
        result = e
    finally:
        timer.join()
    return result, killed[0], time.monotonic(), pid


def test_killed_worker_is_restarted_and_request_retried(pool, gen_model_dir, ref):
    publish_weights(
        ref.perturbed_model(gen_model_dir, seed=21), 1, pool.sync_dir, read_hf_config(gen_model_dir)
    )
    pool.load_weights(1)
    t0 = time.monotonic()
    expected = pool.generate(PROMPTS[:1], 48, HEAVY)  # one prompt: all on worker 0
    duration = time.monotonic() - t0

    out, killed_at, done_at, old_pid = _kill_during(pool, HEAVY, PROMPTS[:1], 48, duration / 6)
    assert not isinstance(out, Exception), out
    assert killed_at < done_at  # the kill landed while the request was in flight
    assert pool.ping()[0]["pid"] != old_pid  # a new worker served the retry...
    assert pool.weight_version == 1  # ...after loading the acknowledged version
    check_versions(out, 1)
    assert _tokens(out) == _tokens(expected)


def test_hung_remote_worker_times_out(pool):
    """A worker that stops answering (SIGSTOP) is reported after the timeout, not waited on."""
    info = pool.ping()[1]
    remote = VLLMWorkers.connect(
        [pool.addresses[1]], pool.sync_dir, expected_version=1, request_timeout_s=3
    )
    assert remote.weight_version == 1
    os.kill(info["pid"], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(GenerationError, match=r"no reply within 3s[\s\S]*remote worker"):
            remote.generate(PROMPTS[:1], 1, SamplingConfig(max_tokens=4))
        assert time.monotonic() - t0 < 30
    finally:
        os.kill(info["pid"], signal.SIGCONT)
        remote.close()
    assert pool.ping()[1]["pid"] == info["pid"]  # close() left the remote worker running


def test_killed_worker_is_reported_with_log_tail(pool):
    pool.restart_on_failure = False
    t0 = time.monotonic()
    pool.generate(PROMPTS[:1], 16, HEAVY)
    duration = time.monotonic() - t0  # the killed request is 4x this one
    err, killed_at, done_at, pid = _kill_during(pool, HEAVY, PROMPTS[:1], 64, duration / 4)
    assert isinstance(err, GenerationError)
    message = str(err)
    assert f"pid {pid}" in message and "exited with code -9" in message
    assert "--- tail of" in message and "worker0.log" in message
    assert done_at - killed_at < 10  # seen by the process watch, not by the 300 s timeout


def test_close_removes_what_the_workers_left_in_their_temp_dir(pool):
    """Each local worker's TMPDIR is the pool's own folder; vLLM's process-group file store
    lives there, and killed workers leave theirs behind (this module killed worker 0 twice).
    close() removes the folder, leftovers and all."""
    tmp_dirs = [Path(w.launch.env["TMPDIR"]) for w in pool._workers]
    root = tmp_dirs[0].parent
    assert root.name.startswith("simko_workers_") and [d.name for d in tmp_dirs] == [
        "worker0",
        "worker1",
    ]
    for d in tmp_dirs:
        assert list(d.glob("vllm_dist_*")), f"{d}: vLLM did not use the worker's TMPDIR"
    pool.close()
    assert not root.exists()
