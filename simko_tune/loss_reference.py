"""The policy loss written plainly: full ``[B, T, V]`` logits, one line per rule, autograd
for the gradients. Never used to train: it is what ``simko_tune.loss`` is tested against
(tests/loss) and the baseline its benchmark compares with (tools/bench_loss.py, the GPU
check), so the two can never drift apart."""

from __future__ import annotations

import torch
from torch import Tensor

from simko_tune.loss import LossConfig


def reference_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    correct: Tensor,
    cfg: LossConfig,
    *,
    normalizer: float | Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    old_topk_logprobs: Tensor | None = None,
) -> Tensor:
    """The loss of :func:`simko_tune.loss.policy_loss` (same arguments), differentiable.

    The logits are computed in the inputs' dtype, then in fp32, as the fused loss does.
    ``old_topk_logprobs``: the old policy's log-probs of the current top-K, which SimKO's
    γ_n divide by; they cancel out of the gradient (tests check that), so the default
    (zeros) is as good as any."""
    B, T, _ = hidden.shape
    logits = (hidden @ weight.T).float() / cfg.temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy_with_grad = -(logp_all.exp() * logp_all).sum(-1)
    entropy = entropy_with_grad.detach()

    # Entropy gate: above the response's own τ-quantile over its valid tokens.
    gate = torch.zeros(B, T, dtype=torch.bool, device=hidden.device)
    for i in range(B):
        if mask[i].any():
            q = torch.quantile(entropy[i][mask[i]], cfg.tau)
            gate[i] = (entropy[i] > q) & mask[i]
    w = gate.float()
    is_argmax = targets == logits.detach().argmax(-1)

    A = advantages.float()[:, None].expand(B, T)
    ratio = torch.exp(logp - old_logprobs)
    if cfg.mode == "simko":
        # λ scales the advantage of gated top-1 tokens of incorrect responses
        A = torch.where(gate & is_argmax & (A < 0), A * cfg.lam, A)
        # γ⁺ = (1 − αw)γ + (αw/K) Σ_n sg(γ/γ_n) γ_n on correct responses
        top_ids = logits.detach().topk(cfg.top_k, dim=-1).indices
        top_logp = logp_all.gather(-1, top_ids)
        if old_topk_logprobs is None:
            old_topk_logprobs = torch.zeros_like(top_logp)
        gamma_n = torch.exp(top_logp - old_topk_logprobs)
        gamma_plus = (1 - cfg.alpha * w) * ratio + (cfg.alpha * w / cfg.top_k) * (
            (ratio[..., None] / gamma_n).detach() * gamma_n
        ).sum(-1)
        ratio = torch.where(correct[:, None], gamma_plus, ratio)
    pg = torch.max(-A * ratio, -A * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
    if cfg.mode == "forking_only":
        pg = pg * w
    per_token = pg
    if cfg.kl_coef > 0:
        diff = ref_logprobs - logp
        kl = {"k1": -diff, "k2": 0.5 * diff**2, "k3": torch.exp(diff) - diff - 1}[cfg.kl_type]
        per_token = per_token + cfg.kl_coef * kl
    if cfg.entropy_coef > 0:
        per_token = per_token - cfg.entropy_coef * entropy_with_grad

    m = mask.float()
    if cfg.agg == "token_mean":
        denom = normalizer if normalizer is not None else max(m.sum().item(), 1)
        return (per_token * m).sum() / denom
    if cfg.agg == "seq_mean_token_mean":
        rows = (per_token * m).sum(1) / m.sum(1).clamp_min(1)
    else:
        rows = (per_token * m).sum(1) / cfg.max_response_len  # a constant
    denom = normalizer if normalizer is not None else max((m.sum(1) > 0).sum().item(), 1)
    return rows.sum() / denom
