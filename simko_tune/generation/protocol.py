"""The wire protocol between the trainer's client and the generation workers (ZeroMQ REQ/REP).

A request is ONE frame holding a JSON object with an ``op``. A reply is a JSON header frame;
a ``generate`` reply adds two raw frames, every completion's token ids (int32) and sampled
log-probs (float32) back to back, whose lengths the header lists (JSON lists of numbers cost
more than the generation itself on small models, and a paper-scale step returns 25M tokens).
Nothing received is ever executed (no pickle), and every size is checked against the header
before use.

Security: a worker binds 127.0.0.1 unless told otherwise. Bound to any other interface it
requires CURVE (ZeroMQ's public-key authentication and encryption): it holds its own key pair
and accepts only the clients whose public keys are in a folder; an unauthorised peer never
gets past the handshake. Make keys with ``python -m simko_tune.generation.protocol DIR NAME``.
Each inbound frame is capped (``ZMQ_MAXMSGSIZE``: a larger one drops the connection before it
is buffered); the client refuses to send a request over the worker's announced limit.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import stat
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.auth

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
"""Largest request frame a worker accepts (1024 prompts of 1024 tokens are about 5 MB)."""
FINISH_REASONS = ("stop", "length")
LOOPBACK_NAMES = {"localhost"}


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the worker answers it with an error."""


# ---------------------------------------------------------------------------------- messages
def encode_request(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def decode_request(frames: list[bytes], max_bytes: int) -> dict[str, Any]:
    """The request object of a received message, or :class:`ProtocolError` saying what is
    wrong with it (several frames, too large, not a JSON object with a string ``op``)."""
    if len(frames) != 1:
        raise ProtocolError(f"a request is one frame, got {len(frames)}")
    raw = frames[0]
    if len(raw) > max_bytes:
        raise ProtocolError(f"request of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        msg = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"request is not JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("a request is a JSON object with a string 'op'")
    return msg


def encode_reply(reply: dict[str, Any]) -> list[bytes]:
    """Header frame, plus the token and log-prob frames when ``reply`` has ``completions``:
    ``[prompt][sample]`` of ``(token_ids, logprobs, finish_reason)``."""
    rows = reply.get("completions")
    if rows is None:
        return [json.dumps(reply).encode()]
    flat = [c for row in rows for c in row]
    lengths = [len(c[0]) for c in flat]
    total = sum(lengths)
    tokens = np.fromiter(chain.from_iterable(c[0] for c in flat), dtype=np.int32, count=total)
    logprobs = np.fromiter(chain.from_iterable(c[1] for c in flat), dtype=np.float32, count=total)
    header = dict(reply)
    header["completions"] = {
        "samples": [len(row) for row in rows],
        "lengths": lengths,
        "finish_reasons": [c[2] for c in flat],
    }
    return [json.dumps(header).encode(), tokens.tobytes(), logprobs.tobytes()]


def decode_reply(frames: list[bytes]) -> dict[str, Any]:
    """The reply object; a ``generate`` reply's ``completions`` become ``[prompt][sample]``
    dicts with ``token_ids``, ``logprobs`` and ``finish_reason``. Raises
    :class:`ProtocolError` when the frames disagree with the header."""
    try:
        reply = json.loads(frames[0])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"reply header is not JSON: {e}") from None
    if (
        not isinstance(reply, dict)
        or not isinstance(reply.get("ok"), bool)
        or not isinstance(reply.get("version"), int)
    ):
        raise ProtocolError("a reply is a JSON object with a boolean 'ok' and a 'version'")
    if "completions" not in reply:
        if len(frames) != 1:
            raise ProtocolError(f"a reply without completions is one frame, got {len(frames)}")
        return reply
    if len(frames) != 3:
        raise ProtocolError(f"a generate reply is three frames, got {len(frames)}")
    meta = reply["completions"]
    samples, lengths, reasons = meta["samples"], meta["lengths"], meta["finish_reasons"]
    if (
        sum(samples) != len(lengths)
        or len(reasons) != len(lengths)
        or any(not isinstance(n, int) or n < 0 for n in chain(samples, lengths))
    ):
        raise ProtocolError("generate reply: sample counts and lengths disagree")
    bad = sorted({r for r in reasons if r not in FINISH_REASONS})
    if bad:
        raise ProtocolError(f"generate reply: unknown finish reasons {bad}")
    total = sum(lengths)
    if len(frames[1]) != 4 * total or len(frames[2]) != 4 * total:
        raise ProtocolError(
            f"generate reply: {total} tokens announced, frames of {len(frames[1])} and "
            f"{len(frames[2])} bytes received"
        )
    tokens = np.frombuffer(frames[1], dtype=np.int32).tolist()
    logprobs = np.frombuffer(frames[2], dtype=np.float32).tolist()
    flat, start = [], 0
    for length, reason in zip(lengths, reasons):
        end = start + length
        flat.append(
            {
                "token_ids": tokens[start:end],
                "logprobs": logprobs[start:end],
                "finish_reason": reason,
            }
        )
        start = end
    it = iter(flat)
    reply["completions"] = [[next(it) for _ in range(n)] for n in samples]
    return reply


# ---------------------------------------------------------------------------------- sockets
def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a worker reachable from this machine only."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, "*" or an interface name: reachable from elsewhere


def address_host(address: str) -> str:
    """``tcp://host:port`` → ``host``."""
    if not address.startswith("tcp://") or ":" not in address[6:]:
        raise ValueError(f"worker address {address!r} is not tcp://host:port")
    return address[6:].rsplit(":", 1)[0]


def _load_key(path: str | Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CURVE key file {path} does not exist")
    if secret and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(
            f"CURVE secret key {path} is readable by other users: chmod 600 {path}"
        )
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except ValueError as e:
        raise ValueError(f"CURVE key file {path}: {e}") from None
    if secret and secret_key is None:
        raise ValueError(f"CURVE key file {path} holds no secret key (use the .key_secret file)")
    return public, secret_key


def bound_port(sock: zmq.Socket) -> int:
    """The TCP port a socket is bound to (its last endpoint, ``tcp://host:port``)."""
    return int(sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])


def bind_worker_socket(
    ctx: zmq.Context,
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    secret_key: str | Path | None = None,
    authorized_keys: str | Path | None = None,
) -> tuple[zmq.Socket, Any]:
    """The worker's REP socket and its authenticator (None without CURVE); ``port`` 0
    binds one the OS picks (read it back with :func:`bound_port`). Binding anything
    but loopback without CURVE keys is refused: anyone who can reach the port could make the
    worker load weights, shut it down or flood it."""
    if (secret_key is None) != (authorized_keys is None):
        raise ValueError("CURVE needs both the worker's secret key and the authorised keys folder")
    if secret_key is None and not is_loopback(host):
        raise ValueError(
            f"binding {host} makes the worker reachable from other machines: give it CURVE "
            "keys (--curve-secret-key, --curve-authorized-keys), or bind 127.0.0.1"
        )
    auth = None
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if secret_key is not None:
        from zmq.auth.thread import ThreadAuthenticator

        folder = Path(authorized_keys)
        if not folder.is_dir() or not any(folder.glob("*.key")):
            raise FileNotFoundError(
                f"CURVE authorised keys folder {folder} holds no public key file (*.key)"
            )
        public, secret = _load_key(secret_key, secret=True)
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(folder))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    sock.bind(f"tcp://{host}:{port or '*'}")  # 0: a port the OS picks (LAST_ENDPOINT)
    return sock, auth


def connect_client_socket(
    ctx: zmq.Context,
    address: str,
    *,
    server_key: str | Path | None = None,
    client_key: str | Path | None = None,
) -> zmq.Socket:
    """A REQ socket to a worker; with CURVE when the worker's public key and this client's
    secret key are given. Closed again if a key or the address is refused: a socket left
    open would block the context's ``term()`` forever."""
    if (server_key is None) != (client_key is None):
        raise ValueError("CURVE needs both the worker's public key and the client's secret key")
    sock = ctx.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        if server_key is not None:
            server_public, _ = _load_key(server_key, secret=False)
            public, secret = _load_key(client_key, secret=True)
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_serverkey = server_public
        try:
            sock.connect(address)
        except zmq.ZMQError as e:
            raise ValueError(f"worker address {address!r}: {e.strerror}") from None
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def make_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """A CURVE key pair ``NAME.key`` (public) and ``NAME.key_secret`` (mode 600) in
    ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old)
    Path(public).chmod(0o644)
    return Path(public), Path(secret)


# ---------------------------------------------------------------------------------- identity
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "use_cache"}


def model_fingerprint(model_dir: str | Path) -> str:
    """A digest of a model directory's config and tensor names, shapes and dtypes (headers
    only, no weights read): equal for the same model on two nodes, different for another
    architecture or size. Two checkpoints of one architecture are not told apart."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tensors = []
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                s = f.get_slice(name)
                tensors.append((name, list(s.get_shape()), s.get_dtype()))
    identity = {
        "config": {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS},
        "tensors": sorted(tensors),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Make a CURVE key pair for workers/trainers.")
    parser.add_argument("folder")
    parser.add_argument("name", help="e.g. worker or trainer")
    args = parser.parse_args(argv)
    public, secret = make_keys(args.folder, args.name)
    print(f"public key {public} (share it), secret key {secret} (keep it)")


if __name__ == "__main__":
    main()
