"""generation.load_timeout_s reaches every wait for a weight load: the trainer's delivery
(WeightSync), the workers' load requests, a worker's start and restart, and the generator
both recipes build from the config."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from simko_tune.config import check_schema, resolve_config_path
from simko_tune.generation import GenerationError, VLLMWorkers, WeightSync, build_generator
from simko_tune.generation.client import _Launch, _Worker
from simko_tune.models import read_hf_config

STUB = Path(__file__).with_name("stub_worker.py")


class RecordingConsumer:
    """A generator that records the timeout each load was given."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def load_weights(self, version: int, timeout_s: float = 300.0) -> None:
        self.timeouts.append(timeout_s)


def test_weight_sync_delivers_with_its_configured_timeout(gen_model_dir, ref, tmp_path):
    """The recipe builds WeightSync with generation.load_timeout_s and then calls publish and
    deliver without a timeout: both must wait that long, not a built-in 300 s."""
    sync = WeightSync(tmp_path / "sync", read_hf_config(gen_model_dir), timeout_s=1234.0)
    consumer = RecordingConsumer()
    sync.attach(consumer)
    model = ref.trainer_model(gen_model_dir)
    sync.publish(model, 1)  # delivers at once
    sync.publish(model, 2, deliver=False)
    sync.deliver(2)  # one-step-off: the rollout thread delivers
    assert consumer.timeouts == [1234.0, 1234.0]
    sync.close()


def _slow_stub(tmp_path: Path, load_s: float) -> Path:
    """The stub worker whose loads take ``load_s`` seconds (a large model over NFS)."""
    script = tmp_path / "slow_stub.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import argparse, sys, time
            sys.path.insert(0, {str(STUB.parent)!r})
            from stub_worker import StubWorker
            from simko_tune.generation.server import add_serving_args, serve, serving_kwargs

            class SlowLoads(StubWorker):
                def load(self, msg):
                    time.sleep({load_s})
                    return super().load(msg)

            parser = argparse.ArgumentParser()
            parser.add_argument("--model", required=True)
            add_serving_args(parser)
            args = parser.parse_args()
            serve(lambda: SlowLoads(args.model), **serving_kwargs(args))
            """
        )
    )
    return script


@pytest.mark.slow
def test_loads_wait_the_load_timeout_not_the_request_timeout(tiny_model_dir, tmp_path):
    """A real worker process whose load takes 2 s: with a 1 s request timeout (generate
    calls) and a 10 s load timeout it loads; with a 1 s load timeout it is reported."""
    import subprocess

    log = tmp_path / "stub.log"
    port_file = tmp_path / "stub.port"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(_slow_stub(tmp_path, 2.0)), "--model", str(tiny_model_dir),
             "--port", "0", "--port-file", str(port_file)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not port_file.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert port_file.is_file(), f"the stub did not start:\n{log.read_text()[-3000:]}"
        address = [f"tcp://127.0.0.1:{int(port_file.read_text())}"]
        patient = VLLMWorkers.connect(address, tmp_path, request_timeout_s=1, load_timeout_s=10)
        t0 = time.monotonic()
        patient.load_weights(1)
        assert patient.weight_version == 1 and time.monotonic() - t0 >= 2.0
        patient.close()
        hasty = VLLMWorkers.connect(
            address, tmp_path, expected_version=1, request_timeout_s=30, load_timeout_s=1
        )
        with pytest.raises(GenerationError, match=r"no reply within 1s"):
            hasty.load_weights(2)
        hasty.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_restarted_worker_waits_the_load_timeout_for_its_start_and_reload(tmp_path):
    """A local worker's start (its engine reads model_dir) and its reload of the acknowledged
    version after a restart both wait load_timeout_s, not the start-up or request default."""
    launch = _Launch("m", None, {}, {}, 1, tmp_path / "worker0.log")
    workers = VLLMWorkers(
        [_Worker("", launch, None)], None, request_timeout_s=5, restart_on_failure=True,
        load_timeout_s=4321.0,
    )  # fmt: skip
    waits: list[tuple[str, float]] = []
    workers._kill = lambda w: None
    workers._spawn = lambda w: None
    workers._await_port = lambda k, timeout_s: waits.append(("listen", timeout_s))

    def request(k, msg, timeout_s, recover=True):
        waits.append((msg["op"], timeout_s))
        return {"ok": True, "version": 3}

    workers._request = request
    workers._acked = 3
    workers._restart(0)
    assert waits == [("listen", 4321.0), ("ping", 4321.0), ("load", 4321.0)]
    workers._ctx.term()


@pytest.mark.parametrize("addresses", [None, ["tcp://127.0.0.1:5555"]])
def test_both_recipes_build_generators_with_the_configured_load_timeout(
    addresses, tmp_path, monkeypatch
):
    """build_generator (the training recipe's and the eval recipe's) hands
    generation.load_timeout_s to local and remote workers."""
    raw = OmegaConf.load(resolve_config_path("eval_tiny_cpu"))
    OmegaConf.update(raw, "model_dir", str(tmp_path))
    OmegaConf.update(raw, "generation.load_timeout_s", 77.0)
    OmegaConf.update(raw, "generation.addresses", addresses)
    from simko_tune.config import EvalRecipeConfig

    g = check_schema(raw, EvalRecipeConfig).generation
    seen = {}
    monkeypatch.setattr(VLLMWorkers, "start_local", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(VLLMWorkers, "connect", lambda *a, **kw: seen.update(kw))
    build_generator(g, tmp_path, device="cpu", sync_dir=tmp_path, log_dir=tmp_path)
    assert seen["load_timeout_s"] == 77.0
