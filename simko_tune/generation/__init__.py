"""Generation service: vLLM worker processes (or an in-process torchtune fallback) that
sample completions with per-token log-probs, and the weight publication that keeps them in
step with the trainer."""

from pathlib import Path
from typing import Any

from simko_tune.generation.client import VLLMWorkers
from simko_tune.generation.native import NativeGenerator
from simko_tune.generation.sync_dir import default_sync_dir, prune_versions
from simko_tune.generation.types import (
    INITIAL_VERSION,
    Completion,
    GenerationError,
    Generator,
    PublicationError,
    SamplingConfig,
    StaleWeightsError,
    check_versions,
)
from simko_tune.generation.weights import WeightSync, publish_weights, verify_publication


def build_generator(
    g: Any,
    model_dir: str | Path,
    *,
    device: str,
    sync_dir: str | Path | None,
    log_dir: Path,
    trainer_devices: list[str] | None = None,
) -> Generator:
    """The generator a config's ``generation`` section asks for, as both recipes build it:
    the native generator in this process, remote workers by address, or local vLLM
    workers on ``model_dir`` (their logs in ``log_dir``, kept off ``trainer_devices``)."""
    from omegaconf import OmegaConf

    if g.backend == "native":
        return NativeGenerator(model_dir, sync_dir=sync_dir, device=device)
    if g.addresses:
        return VLLMWorkers.connect(
            list(g.addresses),
            sync_dir,
            model_dir=model_dir,
            request_timeout_s=g.request_timeout_s,
            load_timeout_s=g.load_timeout_s,
            curve_server_key=g.curve_server_key,
            curve_client_key=g.curve_client_key,
        )
    return VLLMWorkers.start_local(
        model_dir,
        num_workers=g.num_workers,
        sync_dir=sync_dir,
        engine_kwargs=OmegaConf.to_container(g.engine_kwargs, resolve=True),
        devices=list(g.devices) if g.devices else None,
        tensor_parallel_size=g.tensor_parallel_size,
        request_timeout_s=g.request_timeout_s,
        load_timeout_s=g.load_timeout_s,
        restart_on_failure=g.restart_on_failure,
        log_dir=log_dir,
        trainer_devices=trainer_devices,
    )


__all__ = [
    "INITIAL_VERSION",
    "Completion",
    "GenerationError",
    "Generator",
    "NativeGenerator",
    "PublicationError",
    "SamplingConfig",
    "StaleWeightsError",
    "VLLMWorkers",
    "WeightSync",
    "build_generator",
    "check_versions",
    "default_sync_dir",
    "prune_versions",
    "publish_weights",
    "verify_publication",
]
