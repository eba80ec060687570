"""The wire format and the protocol's checks, in process (no worker needed)."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

from simko_tune.generation.client import check_device_overlap, trainer_cuda_devices
from simko_tune.generation.protocol import (
    ProtocolError,
    address_host,
    bind_worker_socket,
    connect_client_socket,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    is_loopback,
    model_fingerprint,
)
from simko_tune.generation.server import parse_generate


def _random_rows(rng, prompts, max_samples, max_len):
    rows = []
    for _ in range(prompts):
        row = []
        for _ in range(rng.randint(1, max_samples)):
            n = rng.randint(0, max_len)
            tokens = [rng.randrange(0, 2**31 - 1) for _ in range(n)]
            # values a float32 holds exactly: what vLLM's float32 log-probs are
            logprobs = [float(np.float32(-rng.random() * 20)) for _ in range(n)]
            row.append((tokens, logprobs, rng.choice(["stop", "length"])))
        rows.append(row)
    return rows


def test_generate_reply_round_trips_exactly():
    rng = random.Random(0)
    rows = _random_rows(rng, prompts=7, max_samples=5, max_len=40)
    frames = encode_reply({"ok": True, "version": 3, "completions": rows})
    assert len(frames) == 3 and len(frames[1]) == 4 * sum(len(c[0]) for r in rows for c in r)
    reply = decode_reply(frames)
    naive = [
        [{"token_ids": t, "logprobs": lp, "finish_reason": f} for t, lp, f in row] for row in rows
    ]
    assert reply["completions"] == naive
    assert reply["ok"] is True and reply["version"] == 3


def test_replies_without_completions_are_one_json_frame():
    frames = encode_reply({"ok": False, "version": 2, "error": "boom"})
    assert frames == [json.dumps({"ok": False, "version": 2, "error": "boom"}).encode()]
    assert decode_reply(frames) == {"ok": False, "version": 2, "error": "boom"}


def _good_frames():
    return encode_reply(
        {"ok": True, "version": 0, "completions": [[([1, 2], [-0.5, -1.0], "stop")]]}
    )


@pytest.mark.parametrize(
    "tamper,error",
    [
        (lambda f: [f[0], f[1][:-4], f[2]], "2 tokens announced, frames of 4 and 8"),
        (lambda f: f[:2], "three frames, got 2"),
        (lambda f: [b"nope", *f[1:]], "not JSON"),
        (lambda f: [f[0].replace(b'"stop"', b'"eaten"'), *f[1:]], "unknown finish reasons"),
        (lambda f: [f[0].replace(b'"samples": [1]', b'"samples": [2]'), *f[1:]], "disagree"),
        (lambda f: [b'{"ok": true}'], "'version'"),
        (lambda f: [b'{"ok": true, "version": 1}', b"x"], "one frame, got 2"),
    ],
)
def test_malformed_replies_are_refused(tamper, error):
    with pytest.raises(ProtocolError, match=error):
        decode_reply(tamper(_good_frames()))


def test_request_checks():
    msg = {"op": "ping"}
    assert decode_request([encode_request(msg)], 100) == msg
    with pytest.raises(ProtocolError, match="one frame, got 2"):
        decode_request([b"{}", b"{}"], 100)
    with pytest.raises(ProtocolError, match="one frame, got 0"):
        decode_request([], 100)
    with pytest.raises(ProtocolError, match="101 bytes exceeds the limit of 100"):
        decode_request([b" " * 101], 100)
    for bad in (b"\x00\x01", b'"ping"', b'{"op": 3}', b"{}"):
        with pytest.raises(ProtocolError):
            decode_request([bad], 100)


@pytest.mark.parametrize(
    "msg,error",
    [
        ({"prompts": [[1, -2]], "seeds": [[1]], "sampling": {}}, "'prompts'"),
        ({"prompts": [[1, True]], "seeds": [[1]], "sampling": {}}, "'prompts'"),
        ({"prompts": [[1]], "seeds": [[]], "sampling": {}}, "'seeds'"),
        ({"prompts": [[1]], "seeds": [["7"]], "sampling": {}}, "'seeds'"),
        ({"prompts": [[1]], "seeds": [[1]], "sampling": []}, "'sampling' must be an object"),
        ({"prompts": [[1]], "seeds": [[1]], "sampling": {"max_tokens": 0}}, "max_tokens"),
    ],
)
def test_generate_requests_are_checked_field_by_field(msg, error):
    with pytest.raises(ProtocolError, match=error):
        parse_generate(msg)


def test_parse_generate_accepts_a_valid_request():
    prompts, seeds, sampling = parse_generate(
        {"prompts": [[1, 2]], "seeds": [[None, 5]], "sampling": {"temperature": 0.5}}
    )
    assert prompts == [[1, 2]] and seeds == [[None, 5]] and sampling.temperature == 0.5


def test_loopback_detection():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "*", "10.0.0.1", "gen-node", "eth0", "::"):
        assert not is_loopback(host), host
    assert address_host("tcp://gen:5555") == "gen"
    with pytest.raises(ValueError, match="not tcp://host:port"):
        address_host("ipc:///tmp/x")


def test_remote_bind_needs_keys():
    import zmq

    ctx = zmq.Context()
    try:
        with pytest.raises(ValueError, match="reachable from other machines"):
            bind_worker_socket(ctx, "0.0.0.0", 1, max_message_bytes=10)
        with pytest.raises(ValueError, match="needs both"):
            bind_worker_socket(ctx, "0.0.0.0", 1, max_message_bytes=10, secret_key="x")
    finally:
        ctx.term()


def test_model_fingerprint(tiny_model_dir, gen_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["_name_or_path"] = "/somewhere/else"
    (copy / "config.json").write_text(json.dumps(config, indent=4))
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    assert model_fingerprint(gen_model_dir) != model_fingerprint(tiny_model_dir)
    config["rope_theta"] = 1.0 + config.get("rope_theta", 0)
    (copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)


def test_generation_devices_must_not_overlap_the_trainers(monkeypatch):
    check_device_overlap(["4", "5,6"], ["0", "1", "2", "3"])
    with pytest.raises(ValueError, match=r"generation.devices\[1\]='3,4' uses GPU 3"):
        check_device_overlap(["5", "3,4"], ["0", "1", "2", "3"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert trainer_cuda_devices() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6,7")
    assert trainer_cuda_devices() == ["4", "6"]


def test_cpu_worker_env_runs_the_engine_in_process_with_its_threads(monkeypatch):
    from simko_tune.generation.client import _worker_env

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the trainer's: never the worker's
    env = _worker_env("2,3")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "2,3"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # no busy-polling executor process
    assert env["OMP_NUM_THREADS"] == "2" and env["GOMP_CPU_AFFINITY"] == "2 3"
    tp2 = _worker_env("0,1", tensor_parallel_size=2)  # TP needs vLLM's executor processes
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in tp2 and "OMP_NUM_THREADS" not in tp2


def test_cpu_workers_default_to_the_cores_the_trainer_does_not_keep(monkeypatch):
    from simko_tune.generation.client import _default_devices

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert _default_devices(1, 1, []) == ["0,1,2,3,4,5"]  # synchronous: every core
    assert _default_devices(1, 1, ["0", "1", "2"]) == ["3,4,5"]  # one-step-off: the rest
    assert _default_devices(2, 1, ["0", "1"]) == ["2,3", "4,5"]
    with pytest.raises(ValueError, match=r"generation.devices\[0\]='2,3' uses core 3"):
        check_device_overlap(["2,3"], ["3"], "core")


def test_start_local_refuses_the_trainers_gpus(tmp_path):
    from simko_tune.generation import VLLMWorkers

    kind = "GPU" if torch.cuda.is_available() else "core"  # the trainer's GPUs, or its cores
    with pytest.raises(ValueError, match=rf"generation.devices\[0\]='1,2' uses {kind} 1"):
        VLLMWorkers.start_local(
            tmp_path, num_workers=1, devices=["1,2"], trainer_devices=["0", "1"], log_dir=tmp_path
        )
    assert list(tmp_path.iterdir()) == []  # refused before anything was started or created


@pytest.mark.parametrize("bad", ["address", "key"])
def test_a_refused_connection_leaves_no_socket_open(bad, tmp_path):
    """A malformed worker address or a missing key file raises an error naming it, and the
    socket made for it is closed: an open one would block the context's ``term()``, which
    ``VLLMWorkers.close`` calls, forever (a trainer that hangs instead of failing)."""
    import threading

    import zmq

    ctx = zmq.Context()
    address, keys = "tcp://127.0.0.1:1", {}
    if bad == "address":
        address = "tcp://127.0.0.1:None"  # what a worker's missing port makes
    else:
        keys = {"server_key": tmp_path / "w.key", "client_key": tmp_path / "t.key_secret"}
    with pytest.raises((ValueError, FileNotFoundError), match="None|w.key does not exist") as e:
        connect_client_socket(ctx, address, **keys)
    # term while the error's traceback is alive, as a caller cleaning up before re-raising
    # does (the traceback holds the frames, so garbage collection cannot close the socket)
    done = threading.Event()
    threading.Thread(target=lambda: (ctx.term(), done.set()), daemon=True).start()
    assert done.wait(10), "a socket was left open: Context.term() blocks"
    assert e.tb is not None
