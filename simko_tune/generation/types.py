"""The generation interface the trainer and the evaluator program against.

Every completion carries the weight version it was sampled with, so a consumer can prove
its rollouts came from the policy it thinks they came from (stale weights are the most
common silent failure in RL trainers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

INITIAL_VERSION = 0
"""``weight_version`` of the checkpoint the generators were started from (nothing published
yet). Published versions are positive integers chosen by the trainer (its step count)."""

LOAD_TIMEOUT_S = 1200.0
"""How long a weight load may take (``generation.load_timeout_s``'s default): a worker's
start, or a new version's verify and reload until every worker acknowledges. A 7B model's
load over a network filesystem takes minutes."""


@dataclass
class SamplingConfig:
    """How to sample. ``temperature == 0`` is greedy decoding.

    ``seed`` is a base seed for the whole request: sample ``j`` of prompt ``i`` is drawn with
    a seed derived from ``(seed, i, j)`` (see :func:`sample_seed`), so the samples do not
    depend on how prompts are batched or split across workers. ``None``: unseeded.
    ``ignore_eos`` keeps generating through the end-of-sequence token (fixed-length
    responses, for benchmarks); ``stop_token_ids`` are always honoured.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingConfig.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Completion:
    """One sampled response.

    ``logprobs[t]`` is the log-probability of ``token_ids[t]`` under the distribution it was
    sampled from: ``log_softmax(logits / temperature)``, restricted to the top-p nucleus and
    renormalised when ``top_p < 1`` (greedy: ``log_softmax(logits)``). With ``top_p == 1``
    this is exactly what the trainer recomputes as the old policy's log-prob at that
    temperature. A stop token that ended the response is included in ``token_ids``.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    weight_version: int


class GenerationError(RuntimeError):
    """Generation failed (a worker died, timed out, rejected a request or weights). The
    message names the worker and, where there is one, ends with the tail of its log."""


class PublicationError(GenerationError):
    """A publication is missing, incomplete or corrupt; it must not be loaded."""


class DeltaRefused(PublicationError):
    """A worker refused a delta publication (a gap in its chain, a wrong base, a corrupt
    delta) and keeps serving its previous version: the trainer republishes it whole."""

    def __init__(self, version: int, message: str) -> None:
        super().__init__(message)
        self.version = version


class StaleWeightsError(GenerationError):
    """Completions were sampled with another weight version than the caller expected."""


@runtime_checkable
class Generator(Protocol):
    """Anything that samples completions for token-id prompts and can switch weights."""

    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig
    ) -> list[list[Completion]]:
        """``n`` completions per prompt, as ``[prompt][sample]`` in input order."""
        ...

    def load_weights(self, version: int, timeout_s: float = LOAD_TIMEOUT_S) -> None:
        """Switch to the weights published as ``version`` in the sync dir; returns once every
        worker serves them, raises :class:`GenerationError` if any cannot."""
        ...

    @property
    def weight_version(self) -> int:
        """The version every worker serves; :data:`INITIAL_VERSION` (0) before any load."""
        ...

    def close(self) -> None: ...


def check_versions(
    completions: Sequence[Sequence[Completion]], expected: int, max_staleness: int = 0
) -> None:
    """Raise :class:`StaleWeightsError` unless every completion was sampled with a version in
    the window ``[expected - max_staleness, expected]`` (0: exactly ``expected``; one-step-off
    rollouts allow 1). A version outside it is never trained on: too old means the
    importance correction would be asked to bridge more than it was sized for, newer means
    the bookkeeping is wrong."""
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    oldest = expected - max_staleness
    bad = [
        (i, j, c.weight_version)
        for i, row in enumerate(completions)
        for j, c in enumerate(row)
        if not oldest <= c.weight_version <= expected
    ]
    if bad:
        i, j, v = bad[0]
        window = f"{expected}" if max_staleness == 0 else f"{oldest}..{expected}"
        raise StaleWeightsError(
            f"{len(bad)} completion(s) were not sampled with weight version {window}; "
            f"first: prompt {i} sample {j} has version {v}"
        )


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of prompt ``prompt_index`` under base ``seed``: a
    hash, so neighbouring (seed, i, j) give unrelated streams; 63 bits (vLLM takes int64)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def check_prompt_lengths(prompts: list[list[int]], max_model_len: int) -> None:
    """Refuse prompts that leave no room for a response, before any worker sees them."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty")
        if len(p) >= max_model_len:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens; the engine's max_model_len is {max_model_len} "
                "(prompt plus response), which leaves no room for a response"
            )
