"""The worker's serve loop and the client's protocol against a real worker process with a
stub engine (tests/generation/stub_worker.py): abuse never stops the loop, remote mode
requires CURVE, and connect() refuses workers serving another model or version."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from simko_tune.generation import GenerationError, SamplingConfig, VLLMWorkers
from simko_tune.generation.protocol import decode_reply, make_keys

pytestmark = pytest.mark.slow

STUB = Path(__file__).with_name("stub_worker.py")
MAX_BYTES = 4096
PROMPTS = [[5, 17, 42, 9], [100, 3], [7, 8]]


def start_stub(model_dir, log_path, *args):
    """The stub worker on a port it binds itself (as the launcher starts workers): its
    process and that port, or None if it exited before binding."""
    port_file = Path(f"{log_path}.port")
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, str(STUB), "--model", str(model_dir), "--port", "0",
         "--port-file", str(port_file), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not port_file.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, int(port_file.read_text()) if port_file.is_file() else None


def listening_port(port, log_path):
    """``port``, failing the test with the stub's log when it exited before binding."""
    assert port is not None, f"the stub worker did not start:\n{Path(log_path).read_text()[-3000:]}"
    return port


def stop(proc):
    proc.kill()
    proc.wait()


def raw_call(port, frames, timeout_s=60.0, **curve):
    """Send ``frames`` as one message on a fresh REQ socket; the decoded reply, or None if
    none came within ``timeout_s``."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    for key, value in curve.items():
        setattr(sock, key, value)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send_multipart(frames)
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return decode_reply(sock.recv_multipart())
    finally:
        sock.close()


def expected_stub(prompts, seeds, max_tokens):
    """What the stub returns, computed plainly."""
    return [
        [[(t + s) % 1000 for t in p][:max_tokens] for s in row] for p, row in zip(prompts, seeds)
    ]


@pytest.fixture(scope="module")
def stub(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("stub") / "stub.log"
    proc, port = start_stub(tiny_model_dir, log, "--max-message-bytes", str(MAX_BYTES))
    workers = VLLMWorkers.connect(
        [f"tcp://127.0.0.1:{listening_port(port, log)}"],
        tmp_path_factory.mktemp("stub_sync"),
        request_timeout_s=60,
    )
    yield proc, port, workers, log
    workers.close()
    stop(proc)


def _serves_correctly(workers):
    sampling = SamplingConfig(max_tokens=3, seed=None)
    out = workers.generate(PROMPTS, 2, sampling)
    assert [[c.token_ids for c in row] for row in out] == [[p[:3]] * 2 for p in PROMPTS]
    assert [c.logprobs for c in out[0]] == [[-0.125, -0.25, -0.375]] * 2
    assert {c.finish_reason for row in out for c in row} == {"length"}


@pytest.mark.parametrize(
    "frames,error",
    [
        ([b"\xff\xfe not json"], "not JSON"),
        ([b"[1, 2, 3]"], "JSON object with a string 'op'"),
        ([b'{"op": "generate"}', b"second frame"], "one frame, got 2"),
        ([b'{"op": "ping"}', b"", b"x" * 100], "one frame, got 3"),
        ([b'{"op": "format_disk"}'], "unknown op 'format_disk'"),
        ([b'{"op": "generate", "prompts": "abc", "seeds": [], "sampling": {}}'], "'prompts'"),
        (
            [b'{"op": "generate", "prompts": [[1]], "seeds": [[1]], "sampling": {"top_p": 7}}'],
            "top_p must be in",
        ),
        (
            [b'{"op": "generate", "prompts": [[1]], "seeds": [[1]], "sampling": {"evil": 1}}'],
            "unexpected keyword argument 'evil'",
        ),
        ([b'{"op": "generate", "prompts": [[1], [2]], "seeds": [[1]], "sampling": {}}'], "seeds"),
    ],
)
def test_malformed_requests_get_an_error_reply_and_the_worker_keeps_serving(stub, frames, error):
    proc, port, workers, _ = stub
    reply = raw_call(port, frames)
    assert reply is not None and reply["ok"] is False and error in reply["error"]
    assert proc.poll() is None
    _serves_correctly(workers)


def test_oversized_message_is_dropped_and_the_worker_keeps_serving(stub):
    proc, port, workers, _ = stub
    big = json.dumps({"op": "ping", "pad": "x" * MAX_BYTES}).encode()
    assert raw_call(port, [big], timeout_s=3) is None  # ZMQ drops the connection: no buffering
    assert proc.poll() is None
    _serves_correctly(workers)
    # The client knows the limit from the health check and refuses before sending.
    with pytest.raises(
        GenerationError, match=r"generate request of \d+ bytes exceeds the worker's limit of 4096"
    ):
        workers.generate([[1] * 100] * 20, 1, SamplingConfig(max_tokens=2))
    _serves_correctly(workers)


def test_binary_replies_carry_every_value(stub):
    _, _, workers, _ = stub
    seeds_base = 11
    sampling = SamplingConfig(max_tokens=5, seed=seeds_base)
    out = workers.generate(PROMPTS, 3, sampling)
    from simko_tune.generation.types import sample_seed

    seeds = [[sample_seed(seeds_base, i, j) for j in range(3)] for i in range(len(PROMPTS))]
    assert [[c.token_ids for c in row] for row in out] == expected_stub(PROMPTS, seeds, 5)
    for row in out:
        for c in row:
            assert c.logprobs == [-(t + 1) / 8 for t in range(len(c.token_ids))]
            assert all(type(t) is int for t in c.token_ids)


def test_connect_refuses_another_model_or_version(stub, tiny_model_dir, gen_model_dir, tmp_path):
    _, port, workers, _ = stub
    address = f"tcp://127.0.0.1:{port}"
    ok = VLLMWorkers.connect([address], tmp_path, model_dir=tiny_model_dir, request_timeout_s=30)
    ok.close()
    with pytest.raises(GenerationError, match=rf"worker {address} serves .* not the trainer's"):
        VLLMWorkers.connect([address], tmp_path, model_dir=gen_model_dir, request_timeout_s=30)
    workers.load_weights(7)  # the stub takes any version
    try:
        with pytest.raises(
            GenerationError,
            match=rf"worker {address} serves weight version 7, the trainer expects 0",
        ):
            VLLMWorkers.connect([address], tmp_path, model_dir=tiny_model_dir, request_timeout_s=30)
        again = VLLMWorkers.connect([address], tmp_path, expected_version=7, request_timeout_s=30)
        assert again.weight_version == 7
        again.close()
    finally:
        workers.load_weights(0)


def test_remote_bind_without_keys_is_refused(tiny_model_dir, tmp_path):
    proc, _ = start_stub(tiny_model_dir, tmp_path / "log", "--host", "0.0.0.0")
    assert proc.wait(timeout=120) != 0
    assert "reachable from other machines" in (tmp_path / "log").read_text()
    with pytest.raises(ValueError, match="require CURVE"):
        VLLMWorkers.connect(["tcp://10.1.2.3:5555"], tmp_path)


def test_remote_worker_serves_only_authorised_clients(tiny_model_dir, tmp_path):
    keys = tmp_path / "keys"
    worker_public, worker_secret = make_keys(keys, "worker")
    trainer_public, trainer_secret = make_keys(keys, "trainer")
    _, stranger_secret = make_keys(keys, "stranger")
    (keys / "authorized").mkdir()
    (keys / "authorized" / "trainer.key").write_bytes(trainer_public.read_bytes())
    assert worker_secret.stat().st_mode & 0o777 == 0o600
    proc, port = start_stub(
        tiny_model_dir,
        tmp_path / "log",
        "--host", "0.0.0.0",
        "--curve-secret-key", str(worker_secret),
        "--curve-authorized-keys", str(keys / "authorized"),
    )  # fmt: skip
    address = f"tcp://127.0.0.1:{listening_port(port, tmp_path / 'log')}"
    try:
        trusted = VLLMWorkers.connect(
            [address],
            tmp_path,
            request_timeout_s=60,
            curve_server_key=worker_public,
            curve_client_key=trainer_secret,
        )
        _serves_correctly(trusted)
        # No keys at all, and a valid key pair the worker does not know: never answered.
        assert raw_call(port, [b'{"op": "shutdown"}'], timeout_s=3) is None
        with pytest.raises(GenerationError, match="no reply within 3s"):
            VLLMWorkers.connect(
                [address],
                tmp_path,
                request_timeout_s=3,
                curve_server_key=worker_public,
                curve_client_key=stranger_secret,
            )
        assert proc.poll() is None
        _serves_correctly(trusted)
        trusted.close()
    finally:
        stop(proc)
    assert "CURVE" in (tmp_path / "log").read_text()


def test_secret_key_readable_by_others_is_refused(tiny_model_dir, tmp_path):
    from simko_tune.generation.protocol import connect_client_socket

    worker_public, _ = make_keys(tmp_path, "worker")
    _, trainer_secret = make_keys(tmp_path, "trainer")
    trainer_secret.chmod(0o644)
    with pytest.raises(PermissionError, match=rf"{trainer_secret} is readable by other users"):
        connect_client_socket(
            zmq.Context.instance(),
            "tcp://127.0.0.1:1",
            server_key=worker_public,
            client_key=trainer_secret,
        )


def test_a_worker_binds_its_own_port_before_its_engine_starts(tmp_path):
    """``--port 0``: the worker binds a port the OS picks and publishes it in its port file
    before the (slow) engine is built, and a request sent meanwhile is answered once it is.
    A launcher never picks a port and frees it for the worker: another socket, even the
    launcher's own reconnecting one, could take it first ("Address already in use")."""
    import threading

    from simko_tune.generation.protocol import encode_request
    from simko_tune.generation.server import serve

    release, built = threading.Event(), []

    class Slow:
        model_dir, version, fatal_errors = "m", 0, ()

        def ping(self, msg):
            return {"ok": True, "version": self.version}

        generate = load = ping

    def make_worker():
        release.wait(30)
        built.append(True)
        return Slow()

    port_file = tmp_path / "w.port"
    thread = threading.Thread(
        target=serve, args=(make_worker, "127.0.0.1", 0), kwargs={"port_file": str(port_file)}
    )
    thread.start()
    try:
        for _ in range(500):  # the port file comes while the engine is still "starting"
            if port_file.is_file():
                break
            threading.Event().wait(0.01)
        assert port_file.is_file() and not built
        port = int(port_file.read_text())
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(encode_request({"op": "ping"}))
        assert not sock.poll(200)  # queued in the bound socket, unanswered while starting
        release.set()
        assert sock.poll(10_000) and decode_reply(sock.recv_multipart())["ok"]
        sock.send(encode_request({"op": "shutdown"}))
        assert sock.poll(10_000)
        sock.recv_multipart()
        sock.close()
    finally:
        release.set()
        thread.join(30)
    assert not thread.is_alive() and built == [True]


def test_closing_while_a_worker_is_still_starting_kills_it(tmp_path):
    """A pool that fails while another worker has not yet bound (no socket: start_local's
    clean-up after a first worker's failure) closes without error and kills it."""
    from simko_tune.generation.client import _Launch, _Worker

    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )  # its own process group, as the pool starts workers
    launch = _Launch("m", None, {}, {}, 1, tmp_path / "worker0.log")
    workers = VLLMWorkers(
        [_Worker("", launch, proc)], None, request_timeout_s=5, restart_on_failure=False
    )
    assert workers._workers[0].sock is None
    workers.close()
    assert proc.poll() is not None
