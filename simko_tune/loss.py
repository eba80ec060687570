"""SimKO and GRPO-family policy losses, computed chunk by chunk from final hidden states.

The loss never holds the full ``[tokens, vocab]`` logits. Valid response tokens are packed
and walked in chunks of whole responses (the entropy gate needs each response's own
quantile before any of its tokens is weighted). For each chunk the logits are projected,
the per-token statistics and loss are computed, and the gradient of the loss with respect
to that chunk's logits is written in place over them and immediately contracted into the
gradients of the hidden states and the output weight, as Liger's fused linear
cross-entropy does. Backward is then only a scale, the matmul count stays at the plain
path's three, and one chunk's ``[C, V]`` fp32 buffer lives at a time (the per-chunk kernels,
compiled, update it in place). Chunks hold whole responses, so a response longer than
``chunk_size`` tokens is a chunk of its own: the bound is max(chunk_size, longest
response) × V × 4 bytes, plus an fp32 [V, D] weight-gradient accumulator.

The math follows docs/design.md §1 (SimKO, arXiv 2510.14807, and its official verl code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from simko_tune.parallel.collectives import unshard

MODES = ("simko", "grpo", "dr_grpo", "psr", "nsr", "w_reinforce", "forking_only")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_TYPES = ("k1", "k2", "k3")
# PSR / NSR: "kept" trains on the kept responses only (correct ones for PSR, incorrect ones
# for NSR), so the token mean is over them, as the official code does by dropping the rest
# of the batch; "all" keeps every response, the others with advantage 0, in the normaliser.
PSR_NSR_NORMS = ("kept", "all")


@dataclass
class LossConfig:
    """Policy-loss settings. Defaults are the SimKO paper's (K=3, α=0.01, λ=1.1, τ=0.8).

    Modes: ``simko``; ``grpo``; ``dr_grpo`` (advantages not divided by the group std, with
    ``agg=seq_mean_token_sum_norm`` over a constant length); ``psr`` / ``nsr`` (correct /
    incorrect responses only, A = +1 / -1); ``w_reinforce`` (A = ``positive_weight`` for
    correct, -1 for incorrect); ``forking_only`` (GRPO on the entropy-gated tokens alone).
    """

    mode: str = "simko"
    top_k: int = 3
    alpha: float = 0.01
    lam: float = 1.1
    tau: float = 0.8
    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: str = "token_mean"
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    # The sampling temperature of the rollout (the recipe requires rollout.temperature).
    temperature: float = 1.0
    chunk_size: int = 1024
    compile: bool = True
    # Constant divisor of each response's token sum for seq_mean_token_sum_norm (Dr. GRPO:
    # the maximum response length; the recipe fills in rollout.max_response_tokens).
    max_response_len: int | None = None
    positive_weight: float = 0.1  # w_reinforce: the advantage of a correct response
    psr_nsr_norm: str = "kept"  # see PSR_NSR_NORMS

    def __post_init__(self) -> None:
        problems = loss_config_problems(self)
        if problems:
            raise ValueError("\n".join(problems))


def loss_config_problems(c: Any) -> list[str]:
    """Every invalid field of ``c`` (a LossConfig, or the config section with its fields),
    one message each: all of them, not just the first."""
    out = []
    for field, value, allowed in (
        ("mode", c.mode, MODES),
        ("agg", c.agg, AGGREGATIONS),
        ("kl_type", c.kl_type, KL_TYPES),
        ("psr_nsr_norm", c.psr_nsr_norm, PSR_NSR_NORMS),
    ):
        if value not in allowed:
            out.append(f"LossConfig.{field}={value}: expected one of [{', '.join(allowed)}]")
    for field, ok in (
        ("top_k", c.top_k >= 1),
        ("alpha", 0.0 <= c.alpha <= 1.0),
        ("lam", c.lam > 0.0),
        ("tau", 0.0 <= c.tau <= 1.0),
        ("clip_low", 0.0 <= c.clip_low < 1.0),
        ("clip_high", c.clip_high >= 0.0),
        ("kl_coef", c.kl_coef >= 0.0),
        ("entropy_coef", c.entropy_coef >= 0.0),
        ("temperature", c.temperature > 0.0),
        ("chunk_size", c.chunk_size >= 1),
        ("max_response_len", c.max_response_len is None or c.max_response_len >= 1),
        ("positive_weight", c.positive_weight >= 0.0),
    ):
        if not ok:
            out.append(f"LossConfig.{field}={getattr(c, field)} is out of range")
    if c.mode == "dr_grpo" and c.agg != "seq_mean_token_sum_norm":
        out.append(
            f"LossConfig.agg={c.agg}: mode dr_grpo normalises by a constant length, "
            "agg must be seq_mean_token_sum_norm"
        )
    return out


# --------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages: ``(r - mean_group) / (std_group + eps)`` (GRPO, unbiased
    std as ``torch.std``) or ``r - mean_group`` (Dr. GRPO, ``scale_by_std=False``).

    ``rewards`` is ``[num_prompts * group_size]`` with each group contiguous. A group whose
    rewards are all equal carries no signal and gets exact zeros (never NaN, also for
    ``group_size == 1``).
    """
    _check_groups(rewards, group_size)
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    identical = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return torch.where(identical, torch.zeros_like(centered), centered).view(-1)


def mode_advantages(
    rewards: Tensor, group_size: int, mode: str, positive_weight: float = 0.1
) -> Tensor:
    """Advantages each mode trains with (a response is correct when its reward is 1).

    simko / grpo / forking_only: :func:`group_advantages`; dr_grpo: the same without the
    std scaling; psr: +1 correct, 0 else; nsr: -1 incorrect, 0 else; w_reinforce:
    ``positive_weight`` correct, -1 incorrect (the official code's ``weighted`` advantage).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if mode in ("simko", "grpo", "forking_only", "dr_grpo"):
        return group_advantages(rewards, group_size, scale_by_std=mode != "dr_grpo")
    _check_groups(rewards, group_size)
    correct = rewards == 1
    zeros = torch.zeros_like(rewards, dtype=torch.float32)
    if mode == "psr":
        return torch.where(correct, 1.0, zeros)
    if mode == "nsr":
        return torch.where(correct, zeros, -1.0)
    return torch.where(correct, positive_weight, -torch.ones_like(zeros))


def kept_responses(rewards: Tensor, cfg: LossConfig) -> Tensor:
    """[B] bool: the responses a mode trains on. PSR keeps the correct ones and NSR the
    incorrect ones (with ``psr_nsr_norm="kept"``); every other mode keeps all. The caller
    drops the rest before the update, so normalisers and mini-batches count kept rows only."""
    correct = rewards == 1
    if cfg.mode == "psr" and cfg.psr_nsr_norm == "kept":
        return correct
    if cfg.mode == "nsr" and cfg.psr_nsr_norm == "kept":
        return ~correct
    return torch.ones_like(correct)


def _check_groups(rewards: Tensor, group_size: int) -> None:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of {group_size}"
        )


# --------------------------------------------------------------------------- chunk math


def _chunk_stats(z: Tensor, targets: Tensor, num_ranks: int) -> tuple[Tensor, ...]:
    """Per-token statistics of one chunk of fp32 logits ``z`` [C, V] (not modified):
    log-normaliser, sampled-token log-prob, entropy, top-``num_ranks`` log-probs and ids."""
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    entropy = -(logp.exp() * logp).sum(dim=-1)
    sampled = z.gather(1, targets[:, None]).squeeze(1) - lse
    top_z, top_ids = z.topk(num_ranks, dim=-1)
    return lse, sampled, entropy, top_z - lse[:, None], top_ids


def _chunk_grad_(
    z: Tensor, lse: Tensor, entropy: Tensor, dense: Tensor, entropy_grad: Tensor
) -> None:
    """Overwrite ``z`` with the dense part of dLoss/dz.

    With ``d log p_j / dz = e_j - p`` and ``dH/dz = -p * (log p + H)``, a loss whose
    per-token gradient is ``Σ_j a_j ∇log p_j + a_H ∇H`` has the dense part
    ``-p * (Σ_j a_j + a_H (log p + H))``; ``dense`` is ``Σ_j a_j``, ``entropy_grad`` is
    ``a_H``. The sparse ``a_j e_j`` terms are scattered in afterwards.
    """
    z.sub_(lse[:, None])  # log p
    probs = z.exp()
    z.add_(entropy[:, None]).mul_(entropy_grad[:, None]).add_(dense[:, None]).mul_(probs).neg_()


_COMPILED: dict[str, object] = {}


def _chunk_fns(compile: bool):
    """The per-chunk kernels, compiled once per process with a dynamic token dimension."""
    if not compile:
        return _chunk_stats, _chunk_grad_
    if not _COMPILED:
        _COMPILED["stats"] = torch.compile(_chunk_stats, dynamic=True)
        _COMPILED["grad"] = torch.compile(_chunk_grad_, dynamic=True)
    return _COMPILED["stats"], _COMPILED["grad"]


def _segment_quantile(values: Tensor, counts: list[int], q: float) -> Tensor:
    """``torch.quantile(segment, q)`` (linear interpolation) of each contiguous segment of
    ``values``; ``counts`` are the segment lengths, all >= 1, known on the host (no device
    sync). Same arithmetic as ATen's quantile, so gates agree bit for bit with a per-row
    ``torch.quantile``."""
    device, dtype = values.device, values.dtype
    lengths = torch.tensor(counts, device=device)
    rows = torch.repeat_interleave(
        torch.arange(len(counts), device=device), lengths, output_size=values.numel()
    )
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(values.numel(), device=device) - starts[rows]
    padded = values.new_full((len(counts), max(counts)), float("inf"))
    padded[rows, cols] = values
    ordered = padded.sort(dim=1).values
    ranks = torch.tensor(q, dtype=dtype, device=device) * (lengths - 1).to(dtype)
    below = ranks.long()
    low = ordered.gather(1, below[:, None]).squeeze(1)
    high = ordered.gather(1, ranks.ceil().long()[:, None]).squeeze(1)
    return low.lerp(high, ranks - below.to(dtype)), rows


def _kl(logp: Tensor, ref_logp: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Per-token KL estimate to the reference policy and its derivative in ``logp``."""
    diff = logp - ref_logp
    if kind == "k1":
        return diff, torch.ones_like(diff)
    if kind == "k2":
        return 0.5 * diff * diff, diff
    # k3: exp(ref - logp) - (ref - logp) - 1 cancels to second order near the reference:
    # in fp32 it rounds to zero or below there. expm1 in fp64 (a [C] vector) keeps it exact.
    wide = diff.double()
    inv_minus_1 = torch.expm1(-wide)
    return (inv_minus_1 + wide).to(diff.dtype), (-inv_minus_1).to(diff.dtype)


# --------------------------------------------------------------------------- the loss


# The policy's shape where SimKO acts and over every token, side by side: "_gated" means over
# the entropy-gated tokens (the top 1 - τ of each response), "_all" over every valid token.
# Λ(n) of the paper is logprob_rank{n}: the mean log-prob of the rank-n candidate;
# mass_rank2_to_k is the probability the ranks 2..K hold together (K = top_k).
_NUM_LOGGED_RANKS = 3
_SHAPE_STATS = (
    "entropy",
    *(f"logprob_rank{n}" for n in range(1, _NUM_LOGGED_RANKS + 1)),
    "mass_rank2_to_k",
)
GATED_METRICS = tuple(f"policy/{name}_gated" for name in _SHAPE_STATS)
_METRIC_SUMS = (
    *(f"policy/{name}_all" for name in _SHAPE_STATS),
    "gated_frac",
    "sampled_top1_frac",  # sampled tokens that are the argmax of the current logits
    "logprob_sampled_mean",  # Λ_sample: mean log-prob of the sampled token
    "clip_frac_low",
    "clip_frac_high",
    "ratio_mean",
    "approx_kl",
    "kl_ref",
    "logprob_mismatch_mean_abs",  # |current - sampler| log-prob, when sampler_logprobs given
)


def _shape_stats(entropy: Tensor, top_logp: Tensor, top_k: int) -> dict[str, Tensor]:
    """Per-token entropy, rank-n log-probs and rank-2..K mass, keyed as in ``_SHAPE_STATS``."""
    out = {"entropy": entropy}
    for n in range(_NUM_LOGGED_RANKS):
        out[f"logprob_rank{n + 1}"] = top_logp[:, n]
    out["mass_rank2_to_k"] = top_logp[:, 1:top_k].exp().sum(dim=1)
    return out


def _token_terms(
    logp: Tensor,
    entropy: Tensor,
    gated: Tensor,
    is_top1: Tensor,
    t: dict[str, Tensor],
    cfg: LossConfig,
) -> dict[str, Tensor]:
    """Per-token loss and its derivatives for one chunk ([C]-sized tensors).

    ``loss``: ℓ_t before the aggregation weight; ``d_sampled``: dℓ/d log p(y);
    ``d_top``: dℓ/d log p(v_n) for the top-K (simko), per candidate; ``d_entropy``: dℓ/dH.
    """
    adv = t["adv"]
    simko = cfg.mode == "simko"
    if simko:  # λ scales the advantage (official code), not the ratio (paper pseudo-code)
        adv = torch.where(gated & is_top1 & (adv < 0), adv * cfg.lam, adv)
    log_ratio = logp - t["old"]
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = torch.maximum(unclipped, clipped)
    # torch.maximum's tie rule gives the full unclipped gradient whenever the branches are
    # equal, zero when the clipped branch strictly wins.
    d_pg = torch.where(unclipped >= clipped, -adv * ratio, torch.zeros_like(adv))
    if cfg.mode == "forking_only":
        loss, d_pg = loss * gated, d_pg * gated
    terms = {"ratio": ratio, "log_ratio": log_ratio, "clip_active": clipped > unclipped}
    d_sampled = d_pg
    if simko:  # γ⁺: value γ, gradient sg(γ)[(1 - αw) ∇log p(y) + αw/K Σ_n ∇log p(v_n)]
        boost = cfg.alpha * (gated & t["correct"])
        d_sampled = d_pg * (1.0 - boost)
        terms["d_top"] = d_pg * boost / cfg.top_k
    if "ref" in t:
        kl, d_kl = _kl(logp, t["ref"], cfg.kl_type)
        terms["kl"] = kl
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl
            d_sampled = d_sampled + cfg.kl_coef * d_kl
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * entropy
    terms.update(loss=loss, d_sampled=d_sampled, d_entropy=torch.full_like(loss, -cfg.entropy_coef))
    return terms


def _row_chunks(counts: list[int], chunk_size: int) -> list[tuple[int, int, int, int]]:
    """Group whole rows into ``(row_start, row_end, token_start, token_end)`` chunks of at
    most ``chunk_size`` valid tokens; a row longer than that is a chunk on its own."""
    chunks, row0, tok0, size = [], 0, 0, 0
    for row, n in enumerate(counts):
        if size and size + n > chunk_size:
            chunks.append((row0, row, tok0, tok0 + size))
            row0, tok0, size = row, tok0 + size, 0
        size += n
    if size:
        chunks.append((row0, len(counts), tok0, tok0 + size))
    return chunks


class _PrecomputedGrad(torch.autograd.Function):
    """Attach gradients computed during the forward pass to a loss value.

    The gradients are kept on ``ctx`` (not ``save_for_backward``) and handed over in
    backward, so autograd owns the only reference and accumulates the [V, D] weight
    gradient without copying it. Hence one backward per loss, like ``retain_graph=False``.
    """

    @staticmethod
    def forward(ctx, loss, hidden, weight, grad_hidden, grad_weight):
        ctx.grads = [grad_hidden, grad_weight]
        return loss.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("policy_loss supports a single backward pass per call")
        grads, ctx.grads = ctx.grads, None
        for i, grad in enumerate(grads):
            if grad is not None and ctx.needs_input_grad[i + 1]:
                grads[i] = grad.mul_(grad_out.to(grad.dtype))
            else:
                grads[i] = None
        return None, grads[0], grads[1], None, None


def policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    correct: Tensor,
    cfg: LossConfig,
    ref_logprobs: Tensor | None = None,
    normalizer: Tensor | float | None = None,
    is_weights: Tensor | None = None,
    sampler_logprobs: Tensor | None = None,
    is_cap: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy loss of ``cfg.mode`` from final hidden states, with its diagnostics.

    Args:
        hidden: [B, T, D] final hidden states (after the final norm) at response positions.
        weight: [V, D] output projection (a DTensor is gathered by ``unshard``).
        targets: [B, T] sampled token ids. old_logprobs: [B, T] their log-probs under the
            policy the PPO ratio is taken against; ``None`` means the current policy,
            detached (ratio exactly 1: a rollout consumed by one optimizer step needs no
            separate old-log-prob pass, as in TRL and verl).
        advantages: [B] per-response advantages (see :func:`mode_advantages`).
        mask: [B, T] bool, valid response tokens, best on the host (its row lengths and
            positions are read there without a device sync). correct: [B] bool, reward == 1.
        ref_logprobs: [B, T] reference-policy log-probs, needed when ``cfg.kl_coef > 0``.
        normalizer: denominator of the aggregation over the WHOLE batch, all micro-batches
            and data-parallel ranks together, supplied (all-reduced) by the caller: the
            number of valid tokens for ``token_mean``; the number of sequences with at least
            one valid token for the ``seq_mean_*`` aggregations. ``None`` uses the local
            batch's own count. With it, summing the losses (gradients) of N micro-batches on
            R ranks gives exactly the gradient of the one big batch.
        is_weights: [B, T] per-token importance weights the caller computed (a correction
            other than ``is_cap``'s), constants multiplied into each token's loss and hence
            its gradient; ``None`` means 1.
        sampler_logprobs: [B, T] the generator's log-probs of ``targets``: the behaviour
            policy of ``is_cap``, and a diagnostic (no effect on the loss without
            ``is_cap``): the metrics gain ``logprob_mismatch_mean_abs`` and
            ``logprob_mismatch_max_abs``, |current − sampler| over the valid tokens. With
            ``old_logprobs=None`` the current log-probs are the pre-update ones, so this is
            the generator-vs-trainer mismatch without a separate old-log-prob pass.
        is_cap: decoupled PPO's off-policy correction computed here: per token the
            truncated importance weight ``min(exp(proximal - sampler), is_cap)``, multiplied
            into its loss and gradient. The proximal log-probs are ``old_logprobs``, or with
            ``old_logprobs=None`` the current ones, detached (the policy before this
            optimizer step needs no separate pass). Needs ``sampler_logprobs`` (the
            behaviour policy's) and no ``is_weights``. The metrics gain ``is_weight_mean``,
            ``is_weight_max`` and ``is_weight_capped_frac`` (the fraction the cap truncated).

    Aggregation: ``token_mean`` = Σ_tokens ℓ / normalizer; ``seq_mean_token_mean`` =
    Σ_rows mean_tokens(ℓ) / normalizer; ``seq_mean_token_sum_norm`` (Dr. GRPO) =
    Σ_rows (Σ_tokens ℓ / L) / normalizer with the constant L = ``cfg.max_response_len``.
    In forking_only mode non-gated tokens contribute zero but still count in the normaliser.
    λ (simko) scales the advantage where the token is gated, A < 0 and the sampled token is
    the argmax of the current logits; the top-K boost applies to gated tokens of ``correct``
    responses. Gradients are computed during this call (fused); the loss supports one
    backward (no double backward). Returns the scalar loss and detached metrics: means over
    the local valid tokens, the ``GATED_METRICS`` over the local gated tokens,
    ``gate_threshold_mean`` over local non-empty responses, and ``num_tokens`` and
    ``num_gated`` to weight them when reducing across ranks.
    """
    hidden, weight = unshard(hidden), unshard(weight)
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be [B, T, D] and weight {tuple(weight.shape)} [V, D]"
        )
    batch, seq_len, dim = hidden.shape
    for name, tensor, shape in (
        ("targets", targets, (batch, seq_len)),
        ("old_logprobs", old_logprobs, (batch, seq_len)),
        ("mask", mask, (batch, seq_len)),
        ("advantages", advantages, (batch,)),
        ("correct", correct, (batch,)),
        ("ref_logprobs", ref_logprobs, (batch, seq_len)),
        ("is_weights", is_weights, (batch, seq_len)),
        ("sampler_logprobs", sampler_logprobs, (batch, seq_len)),
    ):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("LossConfig.kl_coef > 0 needs ref_logprobs")
    if is_cap is not None and (sampler_logprobs is None or is_weights is not None):
        raise ValueError(
            "is_cap computes the importance weights against sampler_logprobs: it needs them, "
            "and no is_weights"
        )
    if is_cap is not None and is_cap < 1.0:
        raise ValueError(f"is_cap={is_cap} must be >= 1 (1 would discard the correction)")
    num_ranks = max(cfg.top_k, _NUM_LOGGED_RANKS)
    if weight.shape[0] < num_ranks:
        raise ValueError(f"vocabulary of {weight.shape[0]} is smaller than top_k={num_ranks}")

    # The row lengths and valid positions are worked out where the mask lives: a host mask
    # (the recipe's) costs no device sync, where a device one needs several per call.
    mask = mask.bool()
    counts = mask.sum(dim=1)
    valid = mask.reshape(-1).nonzero().squeeze(1)  # row-major: each row's tokens contiguous
    rows = torch.repeat_interleave(torch.arange(batch, device=mask.device), counts)
    host_counts = counts.tolist()
    counts, valid, rows = (t.to(hidden.device) for t in (counts, valid, rows))
    h = hidden.reshape(batch * seq_len, dim).index_select(0, valid)
    tokens = {
        "targets": targets.reshape(-1)[valid].long(),
        "adv": advantages.float()[rows],
        "correct": correct.bool()[rows],
    }
    if old_logprobs is not None:
        tokens["old"] = old_logprobs.reshape(-1)[valid].float()
    if ref_logprobs is not None:
        tokens["ref"] = ref_logprobs.reshape(-1)[valid].float()
    if sampler_logprobs is not None:
        tokens["sampler"] = sampler_logprobs.detach().reshape(-1)[valid].float()

    # Per-token weight ω of the aggregation: loss = Σ_t ω_t ℓ_t.
    if cfg.agg == "token_mean":
        local_count, per_row = valid.numel(), torch.ones_like(counts, dtype=torch.float32)
    else:
        local_count = sum(1 for n in host_counts if n)
        if cfg.agg == "seq_mean_token_mean":
            divisor = counts
        elif cfg.max_response_len is None:
            raise ValueError(
                "LossConfig.max_response_len is needed by agg='seq_mean_token_sum_norm': a "
                "constant (the recipe uses rollout.max_response_tokens), not the batch's width"
            )
        else:
            divisor = cfg.max_response_len
        divisor = torch.as_tensor(divisor, dtype=torch.float32, device=hidden.device)
        per_row = (1.0 / divisor.clamp_min(1.0)).expand(batch)
    if normalizer is None:
        normalizer = max(local_count, 1)
    elif not isinstance(normalizer, Tensor) and normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    norm = torch.as_tensor(normalizer, dtype=torch.float32, device=hidden.device)
    tokens["omega"] = per_row[rows] / norm
    if is_weights is not None:  # a constant per token: scales its loss and gradient alike
        tokens["omega"] = tokens["omega"] * is_weights.detach().reshape(-1)[valid].float()

    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.no_grad():
        loss, grad_h, grad_w, metrics = _fused_forward(
            h.detach(),
            weight.detach(),
            tokens,
            host_counts,
            cfg,
            num_ranks,
            grad_hidden=needs_grad and hidden.requires_grad,
            grad_weight=needs_grad and weight.requires_grad,
            is_cap=is_cap,
        )
    if needs_grad:
        loss = _PrecomputedGrad.apply(loss, h, weight, grad_h, grad_w)
    return loss, metrics


def _fused_forward(
    h: Tensor,
    weight: Tensor,
    tokens: dict[str, Tensor],
    counts: list[int],
    cfg: LossConfig,
    num_ranks: int,
    grad_hidden: bool,
    grad_weight: bool,
    is_cap: float | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, Tensor]]:
    """Loss, gradients w.r.t. ``h`` [N, D] and ``weight``, and metric sums, chunk by chunk."""
    stats_fn, grad_fn = _chunk_fns(cfg.compile)
    device, dtype = h.device, h.dtype
    # Temperature folded into the hidden states: z = (h / T) Wᵀ, so no pass over [C, V].
    h = h / cfg.temperature if cfg.temperature != 1.0 else h
    grad_h = torch.zeros_like(h) if grad_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if grad_weight else None
    total = torch.zeros((), dtype=torch.float32, device=device)
    sums = dict.fromkeys(_METRIC_SUMS + GATED_METRICS, total)
    num_gated = total
    thresholds_sum, ratio_max, mismatch_max = total, total, total
    is_sum, is_capped, is_max = total, total, total

    for row0, row1, tok0, tok1 in _row_chunks(counts, cfg.chunk_size):
        t = {k: v[tok0:tok1] for k, v in tokens.items()}
        hc = h[tok0:tok1]
        z = hc @ weight.t()
        z = z.float() if z.dtype != torch.float32 else z
        lse, logp, entropy, top_logp, top_ids = stats_fn(z, t["targets"], num_ranks)
        if "old" not in t:  # old = current policy, detached (we are under no_grad)
            t["old"] = logp
        if is_cap is not None:  # proximal = old (or current), behaviour = the sampler
            raw = torch.exp(t["old"] - t["sampler"])
            is_weight = raw.clamp(max=is_cap)
            t["omega"] = t["omega"] * is_weight
            is_sum = is_sum + is_weight.sum()
            is_capped = is_capped + (raw > is_cap).sum()
            is_max = torch.maximum(is_max, is_weight.max())

        # Entropy gate: above the response's own τ-quantile over its valid tokens.
        lengths = [n for n in counts[row0:row1] if n]
        thresholds, local_rows = _segment_quantile(entropy, lengths, cfg.tau)
        gated = entropy > thresholds[local_rows]
        is_top1 = logp >= top_logp[:, 0]
        terms = _token_terms(logp, entropy, gated, is_top1, t, cfg)
        omega = t["omega"]
        total = total + (omega * terms["loss"]).sum()

        if grad_h is not None or grad_w is not None:
            a_sampled = omega * terms["d_sampled"]
            dense = a_sampled
            if "d_top" in terms:
                a_top = (omega * terms["d_top"])[:, None].expand(-1, cfg.top_k)
                dense = dense + cfg.top_k * a_top[:, 0]
            grad_fn(z, lse, entropy, dense, omega * terms["d_entropy"])
            z.scatter_add_(1, t["targets"][:, None], a_sampled[:, None])
            if "d_top" in terms:
                z.scatter_add_(1, top_ids[:, : cfg.top_k], a_top)
            g = z.to(dtype)
            if grad_h is not None:
                grad_h[tok0:tok1] = g @ weight
            if grad_w is not None:
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc)
                else:
                    grad_w += g.t() @ hc
            del g  # with z: frees this chunk's [C, V] buffer before the next is allocated
        del z

        ratio = terms["ratio"]
        clip_active = terms["clip_active"]
        for name, per_token in _shape_stats(entropy, top_logp, cfg.top_k).items():
            sums[f"policy/{name}_all"] = sums[f"policy/{name}_all"] + per_token.sum()
            sums[f"policy/{name}_gated"] = sums[f"policy/{name}_gated"] + (per_token * gated).sum()
        num_gated = num_gated + gated.sum()
        sums["gated_frac"] = sums["gated_frac"] + gated.sum()
        sums["sampled_top1_frac"] = sums["sampled_top1_frac"] + is_top1.sum()
        sums["logprob_sampled_mean"] = sums["logprob_sampled_mean"] + logp.sum()
        sums["clip_frac_low"] = sums["clip_frac_low"] + (clip_active & (ratio < 1.0)).sum()
        sums["clip_frac_high"] = sums["clip_frac_high"] + (clip_active & (ratio > 1.0)).sum()
        sums["ratio_mean"] = sums["ratio_mean"] + ratio.sum()
        sums["approx_kl"] = sums["approx_kl"] + (ratio - 1.0 - terms["log_ratio"]).sum()
        if "kl" in terms:
            sums["kl_ref"] = sums["kl_ref"] + terms["kl"].sum()
        ratio_max = torch.maximum(ratio_max, ratio.max())
        if "sampler" in t:
            mismatch = (logp - t["sampler"]).abs()
            key = "logprob_mismatch_mean_abs"
            sums[key] = sums[key] + mismatch.sum()
            mismatch_max = torch.maximum(mismatch_max, mismatch.max())
        thresholds_sum = thresholds_sum + thresholds.sum()

    num_tokens = sum(counts)
    num_rows = sum(1 for n in counts if n)
    metrics = {k: v.float() / max(num_tokens, 1) for k, v in sums.items()}
    for key in GATED_METRICS:  # means over the gated tokens (0 when none is gated)
        metrics[key] = sums[key].float() / num_gated.clamp_min(1)
    metrics["num_gated"] = num_gated.float()
    if "ref" not in tokens:
        del metrics["kl_ref"]
    if "sampler" in tokens:
        metrics["logprob_mismatch_max_abs"] = mismatch_max
    else:
        del metrics["logprob_mismatch_mean_abs"]
    metrics["ratio_max"] = ratio_max
    if is_cap is not None:
        metrics["is_weight_mean"] = is_sum / max(num_tokens, 1)
        metrics["is_weight_capped_frac"] = is_capped.float() / max(num_tokens, 1)
        metrics["is_weight_max"] = is_max
    metrics["gate_threshold_mean"] = thresholds_sum / max(num_rows, 1)
    metrics["num_tokens"] = torch.tensor(float(num_tokens), device=device)
    if grad_h is not None and cfg.temperature != 1.0:
        grad_h /= cfg.temperature
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    return total, grad_h, grad_w, metrics


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    mask: Tensor | None = None,
) -> Tensor:
    """[B, T] fp32 log-probs of ``targets`` under ``hidden @ weight.T / temperature``, without
    gradient and chunked over tokens (old-policy and reference log-probs in the recipe).

    ``mask`` [B, T]: only these positions are projected to the vocabulary, the others (a
    rollout's prompt and padding: a third or more of its positions) get 0. Pass it on the
    host, as the rollout holds it, and finding the positions costs no device sync. Without
    it every position is projected and the caller masks the result."""
    hidden, weight = unshard(hidden), unshard(weight)
    batch, seq_len, dim = hidden.shape
    flat_h = hidden.reshape(-1, dim)
    flat_t = targets.reshape(-1).long()
    positions = None
    if mask is not None:
        positions = mask.reshape(-1).bool().nonzero().squeeze(1).to(hidden.device)
        flat_h, flat_t = flat_h.index_select(0, positions), flat_t.index_select(0, positions)
    picked_logp = torch.empty(flat_t.shape, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, flat_t.numel(), chunk_size):
            end = min(start + chunk_size, flat_t.numel())
            z = (flat_h[start:end] / temperature) @ weight.detach().t()
            z = z.float() if z.dtype != torch.float32 else z
            picked = z.gather(1, flat_t[start:end, None]).squeeze(1)
            picked_logp[start:end] = picked - torch.logsumexp(z, dim=-1)
    if positions is None:
        return picked_logp.view(batch, seq_len)
    out = torch.zeros(batch * seq_len, dtype=torch.float32, device=hidden.device)
    return out.index_copy_(0, positions, picked_logp).view(batch, seq_len)
