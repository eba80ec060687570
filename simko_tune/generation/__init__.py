"""Generation service: vLLM worker processes (or an in-process torchtune fallback) that
sample completions with per-token log-probs, and the weight publication that keeps them in
step with the trainer."""

from simko_tune.generation.client import VLLMWorkers
from simko_tune.generation.native import NativeGenerator
from simko_tune.generation.types import (
    INITIAL_VERSION,
    Completion,
    GenerationError,
    Generator,
    SamplingConfig,
    StaleWeightsError,
    check_versions,
)
from simko_tune.generation.weights import (
    PublicationError,
    WeightSync,
    default_sync_dir,
    prune_versions,
    publish_weights,
    verify_publication,
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
    "check_versions",
    "default_sync_dir",
    "prune_versions",
    "publish_weights",
    "verify_publication",
]
