"""In-process generation with the torchtune model and its KV cache: the CPU default's
generator (at tiny_cpu's 0.4M parameters a vLLM worker's fixed costs per step outweigh the
model's compute), the fallback where vLLM is not available, and the baseline the vLLM
workers are benchmarked against.

Same interface and semantics as :class:`VLLMWorkers`: seeds per (seed, prompt, sample),
log-probs of the distribution sampled from, the end-of-sequence token(s) of the model's
config as stop tokens, responses capped at the model's context length.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchtune.generation import (
    get_causal_mask_from_padding_mask,
    get_position_ids_from_padding_mask,
)
from torchtune.modules import KVCache
from torchtune.modules.common_utils import local_kv_cache

from simko_tune.generation.deltas import ServedWeights
from simko_tune.generation.shards import checkpoint_shapes, compare_shapes
from simko_tune.generation.types import (
    INITIAL_VERSION,
    LOAD_TIMEOUT_S,
    Completion,
    Generator,
    PublicationError,
    SamplingConfig,
    check_prompt_lengths,
    sample_seed,
)
from simko_tune.generation.weights import verified_shapes
from simko_tune.models import load_hf_weights, model_from_hf_config, read_hf_config


def _eos_ids(model_dir: Path, hf_config: dict) -> set[int]:
    ids: set[int] = set()
    sources = [hf_config]
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()))
    for src in sources:
        eos = src.get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return ids


def _apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """vLLM's rule: drop the least likely tokens whose total probability is <= 1 - top_p
    (always keeping the most likely one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _kv_caches(model: torch.nn.Module) -> list[KVCache]:
    """The model's decoder KV caches, one per attention layer, in layer order."""
    return [m for m in model.modules() if isinstance(m, KVCache)]


class NativeGenerator(Generator):
    """Generation with the torchtune model in this process (see :class:`Generator`).

    ``weight_version`` is :data:`INITIAL_VERSION` (0) until :meth:`load_weights`. Rows
    (prompt × sample) are decoded ``max_batch_size`` at a time, left-padded, with
    torchtune's static KV cache. The rows of one prompt share its prefill (as vLLM's prefix
    cache does): each distinct prompt of a batch goes through the model once.
    """

    def __init__(
        self,
        model_dir: str | Path,
        sync_dir: str | Path | None = None,
        *,
        device: str = "cpu",
        max_batch_size: int = 32,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.sync_dir = Path(sync_dir) if sync_dir is not None else None
        self.hf_config = read_hf_config(model_dir)
        self.max_batch_size = max_batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model_from_hf_config(model_dir)
        self.max_model_len = int(self.model.max_seq_len)  # its RoPE table's positions
        load_hf_weights(self.model, model_dir, self.hf_config)
        self.model.to(device=self.device, dtype=dtype).eval()
        self.eos_ids = _eos_ids(self.model_dir, self.hf_config)
        self._expected_shapes = checkpoint_shapes(sorted(self.model_dir.glob("*.safetensors")))
        self._version = INITIAL_VERSION
        self._served = ServedWeights(self.sync_dir)

    @property
    def weight_version(self) -> int:
        return self._version

    def load_weights(self, version: int, timeout_s: float = LOAD_TIMEOUT_S) -> None:
        """Verify and load a publication from the sync dir (``timeout_s`` is moot in-process)."""
        if self.sync_dir is None:
            raise ValueError("NativeGenerator was built without a sync_dir")
        folder, files, _ = self._served.prepare(version)  # a delta is rebuilt and verified
        try:
            compare_shapes(self._expected_shapes, verified_shapes(folder, files), str(folder))
        except PublicationError:
            self._served.discard(folder)
            raise
        load_hf_weights(self.model, folder, self.hf_config)
        self.model.to(device=self.device, dtype=self.dtype)
        self._served.served(version, folder, files)
        self._version = version

    def load_state(self, version: int, state: dict[str, torch.Tensor]) -> None:
        """Copy a one-rank trainer's weights (its ``state_dict``: torchtune names, the same
        model) into this model: the in-memory transfer (``WeightSync(None, ...)``), no files.
        Strict: a missing, unexpected or misshapen tensor raises, naming it."""
        self.model.load_state_dict(state, strict=True)
        self._version = version

    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig
    ) -> list[list[Completion]]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        check_prompt_lengths(prompts, self.max_model_len)
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        out: list[list[Completion | None]] = [[None] * n for _ in prompts]
        for start in range(0, len(rows), self.max_batch_size):
            batch = rows[start : start + self.max_batch_size]
            seeds = [
                None if sampling.seed is None else sample_seed(sampling.seed, i, j)
                for i, j in batch
            ]
            for (i, j), c in zip(
                batch, self._decode([prompts[i] for i, _ in batch], seeds, sampling)
            ):
                out[i][j] = c
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _decode(
        self, prompts: list[list[int]], seeds: list[int | None], sampling: SamplingConfig
    ) -> list[Completion]:
        model, dev = self.model, self.device
        bsz = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        prompt_len = int(lengths.max())
        # Each row may fill the context (vLLM's rule), so the longest prompt bounds the cache.
        budgets = [min(sampling.max_tokens, self.max_model_len - len(p)) for p in prompts]
        max_new = max(budgets)
        total = prompt_len + max_new
        tokens = torch.zeros(bsz, prompt_len, dtype=torch.long, device=dev)
        valid = torch.ones(bsz, total, dtype=torch.bool, device=dev)
        for b, p in enumerate(prompts):  # left padding
            tokens[b, prompt_len - len(p) :] = torch.tensor(p, device=dev)
            valid[b, : prompt_len - len(p)] = False
        # Every row stays in the batch (the static cache holds them all) until the last one
        # ends, so a row that ended is still fed; past its context its positions would leave
        # the model's RoPE table: they stay at the last one (its outputs are dropped).
        positions = get_position_ids_from_padding_mask(valid).clamp_(max=self.max_model_len - 1)
        stop_ids = set(sampling.stop_token_ids or ()) | (
            set() if sampling.ignore_eos else self.eos_ids
        )
        gens = [None if s is None else torch.Generator(device=dev).manual_seed(s) for s in seeds]
        mask = get_causal_mask_from_padding_mask(valid[:, :prompt_len], target_seq_len=total)
        # Rows that sample the same prompt (n per prompt; a whole batch in pass@K evaluation)
        # would each prefill it: one row per distinct prompt does, then every row copies its
        # prompt's keys and values. Left-padded to the same length, their prefills are equal.
        slot: dict[tuple[int, ...], int] = {}  # prompt -> its index among the distinct ones
        first_rows, slots = [], []
        for b, p in enumerate(prompts):
            if tuple(p) not in slot:
                slot[tuple(p)] = len(first_rows)
                first_rows.append(b)
            slots.append(slot[tuple(p)])
        distinct = torch.tensor(first_rows, device=dev)
        copy_from = torch.tensor(slots, device=dev)

        # torchtune's context puts the caches on the model's device (``setup_caches`` alone
        # builds them on the default device: CPU beside CUDA weights) and deletes them after.
        with local_kv_cache(
            model,
            batch_size=len(distinct),
            device=dev,
            dtype=self.dtype,
            decoder_max_seq_len=total,
        ):
            logits = model(
                tokens[distinct],
                input_pos=positions[distinct, :prompt_len],
                mask=mask[distinct],
            )[:, -1][copy_from]
            prefilled = [(c.k_cache, c.v_cache) for c in _kv_caches(model)]  # kept past exit
        with local_kv_cache(
            model, batch_size=bsz, device=dev, dtype=self.dtype, decoder_max_seq_len=total
        ):
            for cache, (k, v) in zip(_kv_caches(model), prefilled, strict=True):
                torch.index_select(k, 0, copy_from, out=cache.k_cache)
                torch.index_select(v, 0, copy_from, out=cache.v_cache)
                cache.cache_pos.add_(prompt_len)
            del prefilled
            out_tokens: list[list[int]] = [[] for _ in range(bsz)]
            out_lps: list[list[float]] = [[] for _ in range(bsz)]
            finish: list[str | None] = [None] * bsz
            cols = torch.arange(total, device=dev)
            for t in range(max_new):
                next_tok, next_lp = self._sample(logits.float(), sampling, gens)
                step_toks, step_lps = next_tok.tolist(), next_lp.tolist()  # one sync per step
                for b in range(bsz):
                    if finish[b] is not None:
                        continue
                    tok = step_toks[b]
                    out_tokens[b].append(tok)
                    out_lps[b].append(step_lps[b])
                    if tok in stop_ids:
                        finish[b] = "stop"
                    elif len(out_tokens[b]) >= budgets[b]:
                        finish[b] = "length"
                if all(f is not None for f in finish):
                    break
                pos = prompt_len + t
                step_mask = (valid & (cols <= pos))[:, None, :]
                logits = model(
                    next_tok[:, None], input_pos=positions[:, pos, None], mask=step_mask
                )[:, -1]
        return [
            Completion(token_ids=toks, logprobs=lps, finish_reason=f, weight_version=self._version)
            for toks, lps, f in zip(out_tokens, out_lps, finish)
        ]

    @staticmethod
    def _sample(
        logits: torch.Tensor, sampling: SamplingConfig, gens: list[torch.Generator | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token per row and its log-prob under the distribution sampled from."""
        if sampling.temperature == 0:
            logp = logits.log_softmax(dim=-1)
            tok = logp.argmax(dim=-1)
            return tok, logp.gather(-1, tok[:, None])[:, 0]
        scaled = logits / sampling.temperature
        if sampling.top_p < 1:
            scaled = _apply_top_p(scaled, sampling.top_p)
        logp = scaled.log_softmax(dim=-1)
        # Exponential race (Gumbel-max): argmax p / q with q ~ Exp(1) samples from p, and
        # lets each row draw its noise from its own seeded generator.
        q = torch.empty_like(logp)
        for b, g in enumerate(gens):
            q[b].exponential_(generator=g)
        tok = (logp.exp() / q).argmax(dim=-1)
        return tok, logp.gather(-1, tok[:, None])[:, 0]

    def close(self) -> None:
        self._served.close()

    def __enter__(self) -> NativeGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
