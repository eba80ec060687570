"""A generation worker: one process hosting one ``vllm.LLM`` engine, served over ZeroMQ.

Start it locally through :meth:`VLLMWorkers.start_local`, or on another node with::

    python -m simko_tune.generation.server --model /path/to/hf_model --host 0.0.0.0 \\
        --port 5555 --sync-dir /shared/fs/simko_sync --engine-kwargs '{"max_model_len": 4096}' \\
        --curve-secret-key keys/worker.key_secret --curve-authorized-keys keys/trainers/

and join it with ``VLLMWorkers.connect(["tcp://node:5555"], sync_dir=..., curve_server_key=
"keys/worker.key", curve_client_key="keys/trainer.key_secret")``. Bound to anything but
loopback, a worker requires CURVE keys (see :mod:`simko_tune.generation.protocol`).

Ops: ``ping``, ``generate``, ``load``, ``shutdown``. Every reply has ``ok`` and the
``version`` the worker serves; failures carry ``error``. A request that breaks the protocol
(several frames, not JSON, unknown op, wrong fields) gets an error reply and the worker goes
on serving. The worker serves one request at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simko_tune.fs import atomic_write
from simko_tune.generation.deltas import ServedWeights
from simko_tune.generation.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FINISH_REASONS,
    ProtocolError,
    bind_worker_socket,
    bound_port,
    decode_request,
    encode_reply,
    is_loopback,
    model_fingerprint,
)
from simko_tune.generation.shards import (
    checkpoint_shapes,
    compare_shapes,
    streamed_tensors,
    verified_tensors,
)
from simko_tune.generation.sync_dir import check_sync_dir
from simko_tune.generation.types import (
    INITIAL_VERSION,
    PublicationError,
    SamplingConfig,
    check_prompt_lengths,
)

CPU_KV_CACHE_BYTES = 1 << 30


class ReloadExtension:
    """Mixed into vLLM's worker class (engine arg ``worker_extension_cls``); runs in the
    process that holds the model.

    vLLM's in-place reload skips a tied output layer (its weight is the embedding's, which
    the checkpoint names only once). On CPU that layer keeps a *repacked copy* of the old
    embedding for its matmul, so without re-processing it the worker would serve the new
    embeddings with the old output projection: silently stale weights.
    """

    def simko_reload(
        self, weights_path: str, files: list[dict] | None = None, previous: dict | None = None
    ) -> str | None:
        """Reload from ``weights_path``; return an error if its checksums do not match.

        With ``files`` (a publication's manifest entries) the shards are checksummed here,
        in the process that loads them, on the very bytes the loader copies. With a
        ``previous`` publication to go back to (``simko_reload``'s own arguments), they are
        hashed as they are loaded, one pass over the page cache, and a damaged file puts
        the previous weights back; without one, all are verified before any weight moves.
        """
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        if files is None:
            self.reload_weights(weights_path=weights_path)
        elif previous is None:
            try:
                with verified_tensors(Path(weights_path), files) as tensors:
                    self.reload_weights(weights_iterator=tensors)
            except PublicationError as e:
                return str(e)
        else:
            errors: list[str] = []
            with streamed_tensors(Path(weights_path), files, errors) as tensors:
                self.reload_weights(weights_iterator=tensors)
            if errors:
                failed_again = self.simko_reload(**previous)
                if failed_again:  # the engine holds a partial load: it must not serve
                    raise RuntimeError(
                        f"{errors[0]}; restoring the previous weights: {failed_again}"
                    )
                return errors[0]
        if getattr(self.model_runner.model_config.hf_text_config, "tie_word_embeddings", False):
            for module in self.model_runner.get_model().modules():
                if isinstance(module, ParallelLMHead):
                    module.quant_method.process_weights_after_loading(module)
        return None


class Worker:
    """Request handlers around one engine. Kept free of sockets so the logic reads plainly."""

    def __init__(self, llm: Any, model_dir: str, sync_dir: str | None) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        self.llm = llm
        self.model_dir = model_dir
        self.sync_dir = sync_dir
        self.version = INITIAL_VERSION
        self.max_model_len = llm.llm_engine.model_config.max_model_len
        self.fingerprint = model_fingerprint(model_dir)
        # A dead engine never recovers: the worker exits, so the client restarts or reports it.
        self.fatal_errors: tuple[type[BaseException], ...] = (EngineDeadError,)
        # Every weight the engine loaded at start; a publication must carry all of them.
        self.expected_shapes = checkpoint_shapes(sorted(Path(model_dir).glob("*.safetensors")))
        # the files of the version served; the next delta is rebuilt while generating
        self.served = ServedWeights(sync_dir, prefetch=True, cores=bound_cores())

    def ping(self, msg: dict) -> dict:
        return {
            "ok": True,
            "version": self.version,
            "model": self.model_dir,
            "model_fingerprint": self.fingerprint,
            "pid": os.getpid(),
            "max_model_len": self.max_model_len,
        }

    def generate(self, msg: dict) -> dict:
        """``completions`` as ``[prompt][sample]`` of ``(token_ids, logprobs, finish_reason)``;
        :func:`~simko_tune.generation.protocol.encode_reply` sends them as raw arrays."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, seeds, sampling = parse_generate(msg)
        check_prompt_lengths(prompts, self.max_model_len)
        requests, params = [], []
        for prompt, prompt_seeds in zip(prompts, seeds):
            for seed in prompt_seeds:
                requests.append(TokensPrompt(prompt_token_ids=prompt))
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        max_tokens=sampling.max_tokens,
                        stop_token_ids=sampling.stop_token_ids,
                        ignore_eos=sampling.ignore_eos,
                        seed=seed,
                        logprobs=0,  # the sampled token's log-prob only
                        flat_logprobs=True,
                        detokenize=False,
                    )
                )
        t0 = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        engine_s = time.perf_counter() - t0
        flat = []
        for out in outputs:
            o = out.outputs[0]
            if o.finish_reason not in FINISH_REASONS:
                raise RuntimeError(f"request {out.request_id} finished with {o.finish_reason!r}")
            if list(o.logprobs.token_ids) != list(o.token_ids):
                raise RuntimeError(
                    f"request {out.request_id}: logprobs are not the sampled tokens'"
                )
            flat.append((o.token_ids, o.logprobs.logprobs, o.finish_reason))
        it = iter(flat)
        completions = [[next(it) for _ in prompt_seeds] for prompt_seeds in seeds]
        return {
            "ok": True,
            "version": self.version,
            "completions": completions,
            "engine_s": engine_s,  # the engine's share of the round trip
        }

    def _current(self) -> dict | None:
        """How to reload the weights served now (a damaged publication's rollback), or None
        when their files are gone (then the next one is fully verified before it loads)."""
        if self.version == INITIAL_VERSION:
            return {"weights_path": self.model_dir}
        folder, files = self.served.folder, self.served.files
        if folder is None or not all((folder / f["name"]).is_file() for f in files or []):
            return None
        return {"weights_path": str(folder), "files": files}

    def load(self, msg: dict) -> dict:
        """Verify, then reload in place. A publication that fails verification is refused
        and the previous weights keep serving; a failure during the reload itself leaves
        the engine half-updated, so the worker reports it and exits (``fatal``)."""
        version = msg.get("version")
        if not _is_int(version) or version < 0:
            raise ProtocolError(f"load: 'version' must be a non-negative integer, got {version!r}")
        t0 = time.perf_counter()
        files, rebuilt = None, {}
        if version == INITIAL_VERSION:
            folder = Path(self.model_dir)
        else:
            try:  # a delta publication is rebuilt (and verified) here, in the worker
                folder, files, rebuilt = self.served.prepare(version)
                shapes = checkpoint_shapes([folder / f["name"] for f in files])
                compare_shapes(self.expected_shapes, shapes, str(folder))
            except PublicationError as e:
                return {"ok": False, "version": self.version, "error": str(e)}
        t1 = time.perf_counter()
        try:
            errors = self.llm.collective_rpc(
                "simko_reload",
                kwargs={"weights_path": str(folder), "files": files, "previous": self._current()},
            )
            if any(errors):  # refused before any weight changed: keep serving
                self.served.discard(folder)
                return {"ok": False, "version": self.version, "error": next(filter(None, errors))}
            self.llm.reset_prefix_cache()
        except Exception:
            return {
                "ok": False,
                "fatal": True,
                "version": self.version,
                "error": f"reloading {folder} failed:\n{traceback.format_exc()}",
            }
        self.version = version
        if version != INITIAL_VERSION:
            self.served.served(version, folder, files)
        t2 = time.perf_counter()
        # checksums are verified inside the reload (same bytes): "verify_s" is the manifest's
        # and, for a delta, the rebuild's ("rebuild_s" of it)
        return {
            "ok": True,
            "version": version,
            "verify_s": t1 - t0,
            "reload_s": t2 - t1,
            **{k: rebuilt[k] for k in ("rebuild_s", "rebuild_work_s") if k in rebuilt},
        }


def bound_cores() -> frozenset[int] | None:
    """The cores a CPU worker was given (``VLLM_CPU_OMP_THREADS_BIND``, set by the client as
    a comma list or ranges; several TP lists joined by '|'), for threads that OpenMP does
    not start: the delta rebuild's. None on GPUs or when unset."""
    spec = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
    cores: set[int] = set()
    for item in spec.replace("|", ",").split(","):
        lo, _, hi = item.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None  # "auto", "nobind" or anything else: leave threads where they are
        cores.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(cores) or None


def build_engine(model_dir: str, engine_kwargs: dict, tensor_parallel_size: int) -> Any:
    from vllm import LLM
    from vllm.platforms import current_platform

    kwargs = dict(engine_kwargs)
    mode = kwargs.pop("logprobs_mode", "processed_logprobs")
    if mode != "processed_logprobs":
        raise ValueError(
            "logprobs_mode must be 'processed_logprobs' (log-probs of the distribution "
            f"actually sampled from, temperature applied), got {mode!r}"
        )
    if current_platform.is_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # vLLM's CPU default reserves a fraction of all host memory; a worker needs far less.
        kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
    return LLM(
        model=model_dir,
        tensor_parallel_size=tensor_parallel_size,
        logprobs_mode=mode,
        worker_extension_cls="simko_tune.generation.server.ReloadExtension",
        **kwargs,
    )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_generate(msg: dict) -> tuple[list[list[int]], list[list[int | None]], SamplingConfig]:
    """A generate request's prompts, per-sample seeds and sampling settings, checked field by
    field (:class:`ProtocolError` names the first bad one) before the engine sees them."""
    prompts, seeds, sampling = msg.get("prompts"), msg.get("seeds"), msg.get("sampling")
    if not isinstance(prompts, list) or not all(
        isinstance(p, list) and all(_is_int(t) and t >= 0 for t in p) for p in prompts
    ):
        raise ProtocolError("generate: 'prompts' must be lists of non-negative token ids")
    if (
        not isinstance(seeds, list)
        or len(seeds) != len(prompts)
        or not all(
            isinstance(row, list) and row and all(s is None or _is_int(s) for s in row)
            for row in seeds
        )
    ):
        raise ProtocolError("generate: 'seeds' must hold one non-empty list per prompt")
    if not isinstance(sampling, dict):
        raise ProtocolError("generate: 'sampling' must be an object")
    try:
        config = SamplingConfig(**sampling)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"generate: 'sampling': {e}") from None
    return prompts, seeds, config


def serve(
    make_worker: Callable[[], Any],
    host: str,
    port: int,
    parent_pid: int | None = None,
    *,
    port_file: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    curve_secret_key: str | None = None,
    curve_authorized_keys: str | None = None,
) -> None:
    """Bind, then build the worker (``make_worker``: the engine's start can take minutes),
    then answer requests until ``shutdown``, or until the launching process is gone (a local
    worker must not outlive a crashed trainer). The worker has ``ping``, ``generate`` and
    ``load`` handlers, ``version``, ``model_dir`` and the ``fatal_errors`` after which it
    must exit. No request, however malformed, ends the loop.

    ``port`` 0 binds a port the OS picks, written to ``port_file`` (by rename) once bound:
    how a launcher learns it. A port picked by the launcher and freed for the worker could
    be taken first, even by the launcher's own socket reconnecting to it (a TCP
    self-connection); requests sent while the engine starts wait in the bound socket."""
    import zmq

    ctx = zmq.Context()
    sock, auth = bind_worker_socket(
        ctx,
        host,
        port,
        max_message_bytes=max_message_bytes,
        secret_key=curve_secret_key,
        authorized_keys=curve_authorized_keys,
    )
    port = bound_port(sock)
    if port_file is not None:  # read by the launcher on this node, now: no fsync needed
        atomic_write(port_file, str(port), fsync=False)
    tag = f"[simko worker {os.getpid()}]"
    worker = None
    try:
        worker = make_worker()
        print(
            f"{tag} serving {worker.model_dir} on tcp://{host}:{port}"
            + (" (CURVE)" if auth is not None else ""),
            flush=True,
        )
        handlers = {"ping": worker.ping, "generate": worker.generate, "load": worker.load}
        while True:
            if not sock.poll(1000):
                if parent_pid is not None and os.getppid() != parent_pid:
                    print(f"{tag} launcher {parent_pid} is gone; exiting", flush=True)
                    return
                continue
            frames = sock.recv_multipart()
            try:
                msg = decode_request(frames, max_message_bytes)
                op = msg["op"]
                if op == "shutdown":
                    sock.send_multipart(encode_reply({"ok": True, "version": worker.version}))
                    return
                if op not in handlers:
                    raise ProtocolError(f"unknown op {op!r}")
                reply = handlers[op](msg)
                if op == "ping":
                    reply["max_message_bytes"] = max_message_bytes
                out = encode_reply(reply)
            except ProtocolError as e:
                print(f"{tag} refused a request: {e}", flush=True)
                reply = {"ok": False, "version": worker.version, "error": f"ProtocolError: {e}"}
                out = encode_reply(reply)
            except Exception as e:
                traceback.print_exc()
                reply = {
                    "ok": False,
                    "version": worker.version,
                    "error": f"{type(e).__name__}: {e}",
                    "fatal": isinstance(e, worker.fatal_errors),
                }
                out = encode_reply(reply)
            sock.send_multipart(out)
            if reply.get("fatal"):
                print(f"{tag} fatal: {reply['error']}", flush=True)
                sys.exit(1)
    finally:
        if worker is not None and hasattr(worker, "served"):
            worker.served.close()
        sock.close()
        if auth is not None:
            auth.stop()
        ctx.term()


def add_serving_args(parser: argparse.ArgumentParser) -> None:
    """The socket options of a worker's command line (shared with test workers)."""
    parser.add_argument("--port", type=int, required=True, help="0: one the OS picks")
    parser.add_argument("--port-file", help="write the bound port here (local workers: --port 0)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="anything but loopback needs the CURVE keys"
    )
    parser.add_argument(
        "--parent-pid", type=int, help="exit when this process is gone (local workers)"
    )
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument("--curve-secret-key", help="this worker's NAME.key_secret file")
    parser.add_argument(
        "--curve-authorized-keys", help="folder of the public keys (*.key) of allowed clients"
    )


def serving_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "host": args.host,
        "port": args.port,
        "port_file": args.port_file,
        "parent_pid": args.parent_pid,
        "max_message_bytes": args.max_message_bytes,
        "curve_secret_key": args.curve_secret_key,
        "curve_authorized_keys": args.curve_authorized_keys,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--sync-dir", help="where the trainer publishes weights (none: only v0)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--engine-kwargs", default="{}", help="JSON: extra vllm.LLM arguments")
    add_serving_args(parser)
    args = parser.parse_args(argv)
    engine_kwargs = json.loads(args.engine_kwargs)
    # Refuse an unauthenticated remote bind before the engine spends a minute starting.
    if args.curve_secret_key is None and not is_loopback(args.host):
        parser.error(
            f"--host {args.host} is reachable from other machines: give --curve-secret-key "
            "and --curve-authorized-keys (make keys: python -m simko_tune.generation.protocol)"
        )
    # Likewise a sync dir others may write (checked again before each publication is read;
    # one the trainer has not made yet is left to that check).
    if args.sync_dir is not None and os.path.lexists(args.sync_dir):
        try:
            check_sync_dir(args.sync_dir)
        except PublicationError as e:
            parser.error(str(e))
    serve(
        lambda: Worker(
            build_engine(args.model, engine_kwargs, args.tensor_parallel_size),
            args.model,
            args.sync_dir,
        ),
        **serving_kwargs(args),
    )


if __name__ == "__main__":
    main()
