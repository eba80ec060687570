"""Client for the generation workers: data-parallel generation over several vLLM processes.

Failure handling is the point of this module. Every wait is a ZeroMQ poll with a deadline
(never a blocking receive), local workers are also watched through their process handle so
a crash is seen within a second, and a failure either restarts the worker (which then loads
the last acknowledged weights and retries the request) or raises
:class:`GenerationError` with the tail of the worker's log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

from simko_tune.generation.protocol import (
    ProtocolError,
    address_host,
    connect_client_socket,
    decode_reply,
    encode_request,
    is_loopback,
    model_fingerprint,
)
from simko_tune.generation.types import (
    INITIAL_VERSION,
    LOAD_TIMEOUT_S,
    Completion,
    GenerationError,
    Generator,
    SamplingConfig,
    check_prompt_lengths,
    sample_seed,
)

_POLL_MS = 200
_LOG_TAIL_BYTES = 4000
_SHUTDOWN_GRACE_S = 10.0


@dataclass
class _Launch:
    """How to (re)start a local worker."""

    model_dir: str
    sync_dir: str | None
    engine_kwargs: dict
    env: dict[str, str]
    tensor_parallel_size: int
    log_path: Path


def _port_file(launch: _Launch) -> Path:
    """Where a spawned worker writes the port it bound (beside its log)."""
    return launch.log_path.with_suffix(".port")


@dataclass
class _Worker:
    address: str
    launch: _Launch | None = None  # None: a remote worker we only connect to
    proc: subprocess.Popen | None = None
    sock: zmq.Socket | None = None
    info: dict = field(default_factory=dict)
    version: int = INITIAL_VERSION
    restarts: int = 0

    def name(self, index: int) -> str:
        pid = f", pid {self.proc.pid}" if self.proc else ""
        return f"worker {index} ({self.address or 'not listening yet'}{pid})"

    def dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self) -> str:
        if self.launch is None:
            return "(remote worker: see its log on its node)"
        try:
            with open(self.launch.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                tail = f.read().decode(errors="replace")
        except OSError as e:
            return f"(log {self.launch.log_path} unreadable: {e})"
        return f"--- tail of {self.launch.log_path} ---\n{tail}"


def visible_cuda_devices() -> list[str]:
    """This process's GPUs as ``CUDA_VISIBLE_DEVICES`` entries (what a worker's own
    ``CUDA_VISIBLE_DEVICES`` is written in)."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def trainer_cuda_devices() -> list[str]:
    """The GPUs the trainer ranks of this node use (rank ``r`` takes visible device ``r``),
    as ``CUDA_VISIBLE_DEVICES`` entries; needs no GPU, so a dry run can check a config."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(local)]
    return [d.strip() for d in visible.split(",") if d.strip()][:local]


def check_device_overlap(
    worker_devices: list[str], trainer_devices: list[str], kind: str = "GPU"
) -> None:
    """Refuse generation workers on the trainer's GPUs (both would claim the memory, and the
    trainer would run out of it mid-step) or, ``kind="core"``, its CPU cores (both run at
    once one-step-off)."""
    trainer = set(trainer_devices)
    for k, entry in enumerate(worker_devices):
        shared = [d for d in entry.split(",") if d.strip() in trainer]
        if shared:
            raise ValueError(
                f"generation.devices[{k}]={entry!r} uses {kind} {', '.join(shared)}, which the "
                f"trainer's ranks use ({', '.join(trainer_devices)}): give the workers other "
                f"{kind}s"
            )


def _default_devices(
    num_workers: int, tensor_parallel_size: int, trainer_devices: list[str]
) -> list[str]:
    """GPUs: ``tensor_parallel_size`` consecutive free devices per worker, after the
    trainer's. CPU: the cores this process may use, less the trainer's (``trainer_devices``
    as core ids: see the recipe's one-step-off split), split evenly (each worker's OpenMP
    threads bind to its own cores)."""
    import torch

    if torch.cuda.is_available():
        free = [d for d in visible_cuda_devices() if d not in set(trainer_devices)]
        need = num_workers * tensor_parallel_size
        if need > len(free):
            raise ValueError(
                f"{num_workers} workers x TP {tensor_parallel_size} need {need} GPUs, "
                f"{len(free)} visible besides the trainer's {trainer_devices}: set "
                "generation.devices"
            )
        return [
            ",".join(free[k * tensor_parallel_size : (k + 1) * tensor_parallel_size])
            for k in range(num_workers)
        ]
    taken = set(trainer_devices)
    cores = [c for c in sorted(os.sched_getaffinity(0)) if str(c) not in taken]
    per = len(cores) // num_workers
    if per == 0:  # fewer cores than workers: they share all of them
        return [",".join(map(str, cores))] * num_workers
    return [",".join(map(str, cores[k * per : (k + 1) * per])) for k in range(num_workers)]


def _worker_env(device: str, tensor_parallel_size: int = 1) -> dict[str, str]:
    """A worker's environment: its devices, caches and, on CPU, its threads.

    On CPU with one core list (TP 1) the engine runs inside the worker process: vLLM's
    multiprocess executor, its default there, busy-polls its shared-memory queue for a second
    after every message (``SpinCondition.busy_loop_s``), which after each generate call takes
    a core from the trainer: on 2 cores the forward pass that follows ran 10x slower. The
    OpenMP set-up that executor would do (thread count, affinity) is done here instead,
    before the process starts, as OpenMP needs."""
    import torch

    from simko_tune.paths import cache_dir

    env = dict(os.environ)
    env.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = device
    else:
        env["VLLM_CPU_OMP_THREADS_BIND"] = device
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        if tensor_parallel_size == 1:
            cores = [c.strip() for c in device.split(",") if c.strip()]
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            env["OMP_NUM_THREADS"] = str(len(cores))
            env["GOMP_CPU_AFFINITY"] = " ".join(cores)
        else:
            env.pop("OMP_NUM_THREADS", None)  # vLLM's executor sizes its pools from the binding
    return env


class VLLMWorkers(Generator):
    """Data-parallel generation over vLLM worker processes (see :class:`Generator`).

    ``weight_version`` is :data:`INITIAL_VERSION` (0) until the first :meth:`load_weights`.
    Prompts are split into contiguous blocks, one per worker; with a seed, each sample's
    seed depends only on (seed, prompt index, sample index), so results do not depend on
    the split.
    """

    def __init__(
        self,
        workers: list[_Worker],
        sync_dir: str | Path | None,
        *,
        request_timeout_s: float,
        restart_on_failure: bool,
        load_timeout_s: float = LOAD_TIMEOUT_S,
        curve_server_key: str | Path | None = None,
        curve_client_key: str | Path | None = None,
    ) -> None:
        self.sync_dir = Path(sync_dir) if sync_dir is not None else None
        self.request_timeout_s = request_timeout_s
        self.restart_on_failure = restart_on_failure
        # a load's wait: a worker's start (its engine reads the weights) and each version
        self.load_timeout_s = load_timeout_s
        self._workers = workers
        self._ctx = zmq.Context()
        self._curve = {"server_key": curve_server_key, "client_key": curve_client_key}
        self._acked = INITIAL_VERSION
        self._closed = False
        # local workers' TMPDIR, removed on close (see start_local)
        self._tmp_root: Path | None = None
        # Slowest worker's seconds to verify and to reload the last loaded version (metrics).
        self.last_load_timings: dict[str, float] = {}
        # Slowest worker's seconds inside its engine for the last generate call (metrics).
        self.last_generate_timings: dict[str, float] = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def start_local(
        cls,
        model_dir: str | Path,
        num_workers: int = 1,
        sync_dir: str | Path | None = None,
        *,
        engine_kwargs: dict | None = None,
        devices: list[str] | None = None,
        tensor_parallel_size: int = 1,
        request_timeout_s: float = 600.0,
        restart_on_failure: bool = True,
        log_dir: str | Path | None = None,
        load_timeout_s: float = LOAD_TIMEOUT_S,
        trainer_devices: list[str] | None = None,
    ) -> VLLMWorkers:
        """Start ``num_workers`` worker processes on this node and wait until all answer.

        ``devices[k]`` is worker ``k``'s ``CUDA_VISIBLE_DEVICES`` on GPU, or its
        ``VLLM_CPU_OMP_THREADS_BIND`` core list on CPU (default: an even split).
        ``sync_dir`` is where a :class:`~simko_tune.generation.weights.WeightSync` publishes
        (workers only read it); without one, only the initial weights (version 0) load.
        Worker logs go to ``log_dir`` (default: a fresh folder under the project cache).
        ``trainer_devices``: the GPUs this node's trainer ranks use (see
        :func:`trainer_cuda_devices`); workers placed on any of them are refused.
        ``load_timeout_s``: each worker's start (its engine reads ``model_dir``), a
        restart's, and each version's load. Local workers bind 127.0.0.1.
        """
        import torch

        trainer_devices = list(trainer_devices or [])
        devices = devices or _default_devices(num_workers, tensor_parallel_size, trainer_devices)
        if len(devices) != num_workers:
            raise ValueError(f"{len(devices)} device entries for {num_workers} workers")
        check_device_overlap(
            devices, trainer_devices, "GPU" if torch.cuda.is_available() else "core"
        )
        if log_dir is None:
            from simko_tune.paths import cache_dir

            (cache_dir() / "worker_logs").mkdir(exist_ok=True)
            log_dir = tempfile.mkdtemp(
                prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=cache_dir() / "worker_logs"
            )
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        # Each worker's TMPDIR is a folder of ours: vLLM puts its process-group file store
        # and IPC sockets in the temp dir and leaves them behind when a worker is killed;
        # close() removes them all.
        tmp_root = Path(tempfile.mkdtemp(prefix="simko_workers_"))
        workers = []
        for k in range(num_workers):
            (tmp_root / f"worker{k}").mkdir()
            env = {
                **_worker_env(devices[k], tensor_parallel_size),
                "TMPDIR": str(tmp_root / f"worker{k}"),
            }
            launch = _Launch(
                model_dir=str(model_dir),
                sync_dir=None if sync_dir is None else str(sync_dir),
                engine_kwargs=dict(engine_kwargs or {}),
                env=env,
                tensor_parallel_size=tensor_parallel_size,
                log_path=log_dir / f"worker{k}.log",
            )
            workers.append(_Worker(address="", launch=launch))
        self = cls(
            workers,
            sync_dir,
            request_timeout_s=request_timeout_s,
            restart_on_failure=restart_on_failure,
            load_timeout_s=load_timeout_s,
        )
        self._tmp_root = tmp_root
        try:
            for w in workers:  # start all first: engines initialise in parallel
                self._spawn(w)
            for k in range(num_workers):
                self._await_ready(k)
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def connect(
        cls,
        addresses: list[str],
        sync_dir: str | Path,
        *,
        model_dir: str | Path | None = None,
        expected_version: int = INITIAL_VERSION,
        request_timeout_s: float = 600.0,
        curve_server_key: str | Path | None = None,
        curve_client_key: str | Path | None = None,
        load_timeout_s: float = LOAD_TIMEOUT_S,
    ) -> VLLMWorkers:
        """Join workers already running elsewhere (``tcp://host:port``, one per worker).
        They must read the same ``sync_dir`` (a shared filesystem). They are not restarted
        on failure, and :meth:`close` leaves them running.

        Each worker must serve ``expected_version``, and, when ``model_dir`` is given, the
        same model (config and tensor shapes, see :func:`model_fingerprint`): a worker left
        over from another run is refused rather than adopted. Workers off this machine are
        reached with CURVE: ``curve_server_key`` is the workers' public key file,
        ``curve_client_key`` this trainer's secret key file (authorised on the workers)."""
        if curve_server_key is None:
            remote = [a for a in addresses if not is_loopback(address_host(a))]
            if remote:
                raise ValueError(
                    f"workers {remote} are on other machines, where they require CURVE: set "
                    "generation.curve_server_key and generation.curve_client_key"
                )
        workers = [_Worker(address=a) for a in addresses]
        self = cls(
            workers,
            sync_dir,
            request_timeout_s=request_timeout_s,
            restart_on_failure=False,
            load_timeout_s=load_timeout_s,
            curve_server_key=curve_server_key,
            curve_client_key=curve_client_key,
        )
        expected_model = model_fingerprint(model_dir) if model_dir is not None else None
        try:
            for k, w in enumerate(workers):
                self._reset_socket(w)
                self._await_ready(k, timeout_s=request_timeout_s)
                served = w.info.get("model_fingerprint")
                if expected_model is not None and served != expected_model:
                    raise GenerationError(
                        f"worker {w.address} serves {w.info.get('model')} (fingerprint "
                        f"{served}), not the trainer's {model_dir} ({expected_model})"
                    )
                if w.version != expected_version:
                    raise GenerationError(
                        f"worker {w.address} serves weight version {w.version}, the trainer "
                        f"expects {expected_version} (left over from another run? restart it)"
                    )
        except BaseException:
            self.close()
            raise
        self._acked = expected_version
        return self

    def _spawn(self, w: _Worker) -> None:
        """Start a local worker on a port it binds itself (``--port 0``) and reports in its
        port file (see :func:`~simko_tune.generation.server.serve`); ``_await_ready``
        connects once it is there."""
        launch = w.launch
        assert launch is not None
        w.address = ""
        _port_file(launch).unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "simko_tune.generation.server",
            "--model", launch.model_dir,
            "--port", "0", "--port-file", str(_port_file(launch)),
            *(["--sync-dir", launch.sync_dir] if launch.sync_dir else []),
            "--tensor-parallel-size", str(launch.tensor_parallel_size),
            "--engine-kwargs", json.dumps(launch.engine_kwargs),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        with open(launch.log_path, "ab") as log:
            # Own process group: the engine's helper processes are killed with the worker.
            w.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=launch.env, start_new_session=True
            )
        w.version = INITIAL_VERSION

    def _reset_socket(self, w: _Worker) -> None:
        """A REQ socket that missed a reply cannot be reused: replace it (none while a
        spawned worker has not yet said where it listens)."""
        if w.sock is not None:
            w.sock.close(linger=0)
        w.sock = connect_client_socket(self._ctx, w.address, **self._curve) if w.address else None

    def _await_port(self, k: int, timeout_s: float) -> None:
        """Wait for a spawned worker's port file (written once its socket is bound, before
        its engine starts), then connect."""
        w = self._workers[k]
        assert w.launch is not None
        deadline = time.monotonic() + timeout_s
        while not _port_file(w.launch).is_file():
            if w.dead():
                raise GenerationError(
                    f"{w.name(k)} exited with code {w.proc.returncode} before listening\n"
                    f"{w.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise GenerationError(f"{w.name(k)}: not listening within {timeout_s:.0f}s")
            time.sleep(0.02)
        w.address = f"tcp://127.0.0.1:{int(_port_file(w.launch).read_text())}"
        self._reset_socket(w)

    def _await_ready(self, k: int, timeout_s: float | None = None) -> None:
        w = self._workers[k]
        timeout_s = timeout_s or self.load_timeout_s
        try:
            if w.launch is not None and not w.address:
                self._await_port(k, timeout_s)
            reply = self._request(k, {"op": "ping"}, timeout_s, recover=False)
        except GenerationError as e:
            raise GenerationError(f"{w.name(k)} did not start: {e}") from None
        w.info = reply

    def _kill(self, w: _Worker) -> None:
        if w.proc is None:
            return
        try:
            os.killpg(w.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        w.proc.wait()

    def _restart(self, k: int) -> None:
        """Replace a failed local worker and bring it to the acknowledged weights."""
        w = self._workers[k]
        self._kill(w)
        w.restarts += 1
        self._spawn(w)
        self._await_ready(k)
        if self._acked != INITIAL_VERSION:
            reply = self._request(
                k, {"op": "load", "version": self._acked}, self.load_timeout_s, recover=False
            )
            if not reply["ok"]:
                raise GenerationError(
                    f"restarted {w.name(k)} could not load acknowledged version {self._acked}: "
                    f"{reply['error']}"
                )
            w.version = reply["version"]

    # ----------------------------------------------------------------- messaging
    def _request(self, k: int, msg: dict, timeout_s: float, recover: bool = True) -> dict:
        return self._call({k: msg}, timeout_s, recover=recover)[k]

    def _call(
        self, msgs: dict[int, dict], timeout_s: float, recover: bool = True
    ) -> dict[int, dict]:
        """Send each worker its message and wait for every reply, polling with a deadline
        and watching local processes. A worker that dies or times out is restarted and sent
        its message again (requests are idempotent) when ``recover`` and
        ``restart_on_failure`` allow, at most once per call; otherwise
        :class:`GenerationError` is raised with the tail of its log."""
        poller = zmq.Poller()
        deadline: dict[int, float] = {}
        pending: set[int] = set()

        def send(k: int) -> None:
            w = self._workers[k]
            data = encode_request(msgs[k])
            limit = w.info.get("max_message_bytes")
            if limit is not None and len(data) > limit:
                raise GenerationError(
                    f"{w.name(k)}: a {msgs[k]['op']} request of {len(data)} bytes exceeds the "
                    f"worker's limit of {limit} (--max-message-bytes): send fewer prompts"
                )
            w.sock.send(data)
            poller.register(w.sock, zmq.POLLIN)
            deadline[k] = time.monotonic() + timeout_s
            pending.add(k)

        replies: dict[int, dict] = {}
        restarted: set[int] = set()
        try:
            for k in msgs:
                send(k)
            while pending:
                ready = dict(poller.poll(_POLL_MS))
                for k in sorted(pending):
                    w = self._workers[k]
                    if w.sock in ready:
                        try:
                            reply = decode_reply(w.sock.recv_multipart())
                        except ProtocolError as e:
                            reply = {"fatal": True, "error": f"malformed reply: {e}"}
                        if not reply.get("fatal"):
                            replies[k] = reply
                            w.version = reply["version"]
                            pending.discard(k)
                            poller.unregister(w.sock)
                            continue
                        problem = f"{w.name(k)} failed and is exiting: {reply['error']}"
                    elif w.dead():
                        problem = f"{w.name(k)} exited with code {w.proc.returncode}"
                    elif time.monotonic() > deadline[k]:
                        problem = f"{w.name(k)}: no reply within {timeout_s:.0f}s"
                    else:
                        continue
                    pending.discard(k)
                    poller.unregister(w.sock)
                    tail = w.log_tail()
                    if not (recover and self.restart_on_failure and w.launch) or k in restarted:
                        self._kill(w)
                        self._reset_socket(w)
                        raise GenerationError(f"{problem}\n{tail}")
                    print(f"[simko] {problem}; restarting it\n{tail}", file=sys.stderr, flush=True)
                    restarted.add(k)
                    self._restart(k)
                    send(k)
        finally:
            for k in pending:  # abandoned mid-request: their sockets cannot be reused
                self._reset_socket(self._workers[k])
        return replies

    # ----------------------------------------------------------------- Generator
    @property
    def weight_version(self) -> int:
        versions = {w.version for w in self._workers}
        if len(versions) != 1:
            raise GenerationError(f"workers serve different weight versions: {sorted(versions)}")
        return versions.pop()

    @property
    def max_model_len(self) -> int:
        return min(w.info["max_model_len"] for w in self._workers)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def addresses(self) -> list[str]:
        """The workers' ZeroMQ addresses (what :meth:`connect` takes)."""
        return [w.address for w in self._workers]

    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig
    ) -> list[list[Completion]]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return []
        check_prompt_lengths(prompts, self.max_model_len)
        seeds = [
            [None if sampling.seed is None else sample_seed(sampling.seed, i, j) for j in range(n)]
            for i in range(len(prompts))
        ]
        bounds = _split(len(prompts), len(self._workers))
        s = asdict(sampling)
        msgs = {
            k: {"op": "generate", "prompts": prompts[a:b], "seeds": seeds[a:b], "sampling": s}
            for k, (a, b) in enumerate(bounds)
            if b > a
        }
        replies = self._call(msgs, self.request_timeout_s)
        self.last_generate_timings = {
            "engine_s": max(r.get("engine_s", 0.0) for r in replies.values())
        }
        out: list[list[Completion]] = []
        for k in sorted(replies):
            reply = replies[k]
            if not reply["ok"]:
                raise GenerationError(f"{self._workers[k].name(k)}: {reply['error']}")
            version = reply["version"]
            out.extend(
                [Completion(**c, weight_version=version) for c in row]
                for row in reply["completions"]
            )
        return out

    def load_weights(self, version: int, timeout_s: float | None = None) -> None:
        """All workers load ``version`` and acknowledge it within ``timeout_s`` (default:
        ``load_timeout_s``). If any worker refuses (a bad publication), the others go back
        to the previous version and :class:`GenerationError` says why: the pool never
        serves mixed weights."""
        timeout_s = self.load_timeout_s if timeout_s is None else timeout_s
        previous = self._acked
        replies = self._call(
            {k: {"op": "load", "version": version} for k in range(len(self._workers))}, timeout_s
        )
        failed = {k: r for k, r in replies.items() if not r["ok"]}
        if failed:
            errors = "; ".join(
                f"{self._workers[k].name(k)}: {r['error']}" for k, r in failed.items()
            )
            moved = [k for k, r in replies.items() if r["ok"]]
            if moved and version != previous:
                back = self._call(
                    {k: {"op": "load", "version": previous} for k in moved}, timeout_s
                )
                if not all(r["ok"] for r in back.values()):
                    errors += f"; rolling workers {moved} back to version {previous} failed too"
            raise GenerationError(f"loading weight version {version} failed: {errors}")
        self._acked = version
        self.last_load_timings = {
            key: max(r.get(key, 0.0) for r in replies.values())
            for key in ("verify_s", "reload_s", "rebuild_s", "rebuild_work_s")
            if any(key in r for r in replies.values())
        }

    def ping(self) -> list[dict]:
        """Health check: each worker's version, model, pid and ``max_model_len``."""
        replies = self._call({k: {"op": "ping"} for k in range(len(self._workers))}, 30.0)
        return [replies[k] for k in range(len(self._workers))]

    def close(self) -> None:
        """Stop local workers (politely, then by force); leave remote ones running."""
        if self._closed:
            return
        self._closed = True
        # a worker still starting has no socket yet: it is killed below
        local = [w for w in self._workers if w.proc is not None and not w.dead() and w.sock]
        for w in local:
            try:
                w.sock.send(encode_request({"op": "shutdown"}), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + _SHUTDOWN_GRACE_S
        for w in local:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for w in self._workers:
            self._kill(w)
            if w.sock is not None:
                w.sock.close(linger=0)
        self._ctx.term()
        if self._tmp_root is not None:
            shutil.rmtree(self._tmp_root, ignore_errors=True)

    def __enter__(self) -> VLLMWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _split(num_items: int, num_parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal blocks ``[a, b)`` covering ``range(num_items)``."""
    base, extra = divmod(num_items, num_parts)
    bounds, a = [], 0
    for k in range(num_parts):
        b = a + base + (k < extra)
        bounds.append((a, b))
        a = b
    return bounds
