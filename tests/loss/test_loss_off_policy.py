"""Off-policy pieces of the loss: importance weights (given, or truncated in the loss as in
decoupled PPO) and the old log-probs taken as the current ones, detached (no separate
pass), each against a plain full-logits reference with autograd, gradients included."""

from __future__ import annotations

import pytest
import torch

from simko_tune.loss import LossConfig, policy_loss, token_logprobs


def naive_loss(b, cfg, old, is_weights):
    """DESIGN §1 on full fp32 logits (simko or grpo, token_mean), each token's loss times its
    importance weight; the gradients by autograd."""
    hidden, weight, mask, targets = b["hidden"], b["weight"], b["mask"], b["targets"]
    B, T, _ = hidden.shape
    logits = hidden @ weight.T
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    gate = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        if mask[i].any():
            gate[i] = (entropy[i] > torch.quantile(entropy[i][mask[i]], cfg.tau)) & mask[i]
    A = b["advantages"][:, None].expand(B, T)
    ratio = torch.exp(logp - old)
    if cfg.mode == "simko":
        is_argmax = targets == logits.detach().argmax(-1)
        A = torch.where(gate & is_argmax & (A < 0), A * cfg.lam, A)
        top_logp = logp_all.gather(-1, logits.detach().topk(cfg.top_k, dim=-1).indices)
        gamma_n = torch.exp(top_logp)  # old top-K log-probs cancel: take them as 0
        w = gate.float()
        gamma_plus = (1 - cfg.alpha * w) * ratio + (cfg.alpha * w / cfg.top_k) * (
            (ratio[..., None] / gamma_n).detach() * gamma_n
        ).sum(-1)
        ratio = torch.where(b["correct"][:, None], gamma_plus, ratio)
    per_token = torch.max(-A * ratio, -A * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high))
    m = mask.float()
    loss = (per_token * is_weights * m).sum() / m.sum()
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), gh, gw


def fused(b, cfg, old, is_weights):
    loss, metrics = policy_loss(
        b["hidden"],
        b["weight"],
        b["targets"],
        old,
        b["advantages"],
        b["mask"],
        b["correct"],
        cfg,
        is_weights=is_weights,
    )
    gh, gw = torch.autograd.grad(loss, (b["hidden"], b["weight"]))
    return loss.detach(), gh, gw, metrics


def close(actual, expected, rtol=1e-5):
    atol = rtol * expected.abs().max().clamp_min(1e-12).item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def plain_truncated_weights(proximal, behaviour, mask, cap):
    """min(exp(proximal - behaviour), cap) per valid token, 0 on padding, element by element."""
    out = torch.zeros(mask.shape)
    for i, j in mask.nonzero().tolist():
        out[i, j] = min(float(torch.exp(proximal[i, j] - behaviour[i, j])), cap)
    return out


@pytest.mark.parametrize("mode", ["simko", "grpo"])
def test_importance_weights_scale_each_tokens_loss_and_gradient(batch_factory, mode):
    b = batch_factory()
    cfg = LossConfig(mode=mode, compile=False)
    gen = torch.Generator().manual_seed(1)
    # behaviour log-probs a step behind the proximal (old) ones; cap 2 truncates some
    behaviour = b["old_logprobs"] + 0.5 * torch.randn(b["mask"].shape, generator=gen)
    weights = plain_truncated_weights(b["old_logprobs"], behaviour, b["mask"], 2.0)
    assert 0 < int((weights[b["mask"]] == 2.0).sum()) < int(b["mask"].sum())

    loss, gh, gw, _ = fused(b, cfg, b["old_logprobs"], weights)
    ref_loss, ref_gh, ref_gw = naive_loss(b, cfg, b["old_logprobs"], weights)
    close(loss, ref_loss)
    close(gh, ref_gh)
    close(gw, ref_gw)
    # and the weights matter: without them the result differs
    unweighted, *_ = fused(b, cfg, b["old_logprobs"], None)
    assert not torch.isclose(unweighted, loss, rtol=1e-3)


def test_unit_importance_weights_change_nothing(batch_factory):
    b = batch_factory()
    cfg = LossConfig(compile=False)
    ones = torch.ones(b["mask"].shape)
    a = fused(b, cfg, b["old_logprobs"], ones)
    c = fused(b, cfg, b["old_logprobs"], None)
    for x, y in zip(a[:3], c[:3]):
        assert torch.equal(x, y)


def test_importance_weight_shape_is_checked(batch_factory):
    b = batch_factory()
    with pytest.raises(ValueError, match="is_weights"):
        fused(b, LossConfig(compile=False), b["old_logprobs"], torch.ones(2, 3))


@pytest.mark.parametrize("mode", ["simko", "grpo"])
def test_old_logprobs_none_equals_the_recomputed_pass(batch_factory, mode):
    """One optimizer step per on-policy rollout: the old log-probs ARE the current ones. The
    loss without a separate pass (``old_logprobs=None``) equals the loss with that pass."""
    b = batch_factory()
    cfg = LossConfig(mode=mode, compile=False)
    recomputed = token_logprobs(b["hidden"].detach(), b["weight"].detach(), b["targets"])
    with_pass = fused(b, cfg, recomputed, None)
    without_pass = fused(b, cfg, None, None)
    for x, y in zip(without_pass[:3], with_pass[:3]):
        close(x, y, rtol=1e-6)
    assert float(without_pass[3]["ratio_mean"]) == 1.0  # exactly: exp(logp - logp)
    assert float(without_pass[3]["clip_frac_low"]) == float(without_pass[3]["clip_frac_high"]) == 0
    # and both equal the naive reference taken at the current policy
    current = torch.log_softmax(b["hidden"] @ b["weight"].T, -1).gather(-1, b["targets"][..., None])
    ref_loss, ref_gh, ref_gw = naive_loss(
        b, cfg, current.squeeze(-1).detach(), torch.ones(b["mask"].shape)
    )
    close(without_pass[0], ref_loss)
    close(without_pass[1], ref_gh)
    close(without_pass[2], ref_gw)


@pytest.mark.parametrize("old", ["none", "given"])
def test_sampler_logprobs_measure_the_mismatch_and_change_nothing_else(batch_factory, old):
    """The generator-vs-trainer diagnostic: |current - sampler| log-prob over the valid
    tokens (mean and max), written plainly here; loss, gradients and the other metrics are
    those of the call without it."""
    b = batch_factory()
    cfg = LossConfig(compile=False, chunk_size=16)  # several chunks: the max spans them
    old_logprobs = None if old == "none" else b["old_logprobs"]
    gen = torch.Generator().manual_seed(2)
    sampler = b["old_logprobs"] + 0.4 * torch.randn(b["mask"].shape, generator=gen)
    sampler[~b["mask"]] = 1e6  # padding must not count
    args = (b["hidden"], b["weight"], b["targets"], old_logprobs, b["advantages"], b["mask"])
    loss, metrics = policy_loss(*args, b["correct"], cfg, sampler_logprobs=sampler)
    plain_loss, plain_metrics = policy_loss(*args, b["correct"], cfg)

    current = torch.log_softmax(b["hidden"] @ b["weight"].T, -1)
    current = current.gather(-1, b["targets"][..., None]).squeeze(-1).detach()
    diffs = [
        abs(float(current[i, j]) - float(sampler[i, j])) for i, j in b["mask"].nonzero().tolist()
    ]
    assert float(metrics["logprob_mismatch_mean_abs"]) == pytest.approx(
        sum(diffs) / len(diffs), rel=1e-5
    )
    assert float(metrics["logprob_mismatch_max_abs"]) == pytest.approx(max(diffs), rel=1e-5)
    assert "logprob_mismatch_mean_abs" not in plain_metrics
    assert "logprob_mismatch_max_abs" not in plain_metrics
    assert torch.equal(loss, plain_loss)
    for k, v in plain_metrics.items():
        assert torch.equal(metrics[k], v), k
    grads = torch.autograd.grad(loss, (b["hidden"], b["weight"]))
    plain_grads = torch.autograd.grad(plain_loss, (b["hidden"], b["weight"]))
    for g, p in zip(grads, plain_grads):
        assert torch.equal(g, p)


def test_sampler_logprobs_shape_is_checked(batch_factory):
    b = batch_factory()
    args = (b["hidden"], b["weight"], b["targets"], None, b["advantages"], b["mask"])
    with pytest.raises(ValueError, match="sampler_logprobs"):
        policy_loss(*args, b["correct"], LossConfig(compile=False), sampler_logprobs=torch.ones(2))


@pytest.mark.parametrize("proximal", ["current", "given"])
@pytest.mark.parametrize("mode", ["simko", "grpo"])
def test_importance_weights_computed_in_the_loss(batch_factory, mode, proximal):
    """``is_cap``: the loss weighs each token by min(exp(proximal - behaviour), cap), the
    proximal log-probs being ``old_logprobs`` or, without them, the current ones (the first
    optimizer step of an update needs no separate pass). Loss, gradients and the weights'
    statistics equal the naive reference with those weights written out here, and, for
    the current ones, the call fed a recomputed pass and its precomputed weights."""
    b = batch_factory()
    cfg = LossConfig(mode=mode, compile=False, chunk_size=16)  # statistics span chunks
    gen = torch.Generator().manual_seed(3)
    current = torch.log_softmax(b["hidden"] @ b["weight"].T, -1)
    current = current.gather(-1, b["targets"][..., None]).squeeze(-1).detach()
    old = current if proximal == "current" else b["old_logprobs"]
    behaviour = old + 0.5 * torch.randn(b["mask"].shape, generator=gen)
    behaviour[~b["mask"]] = -1e6  # padding must not count (its raw weight would be huge)
    given = None if proximal == "current" else old
    args = (b["hidden"], b["weight"], b["targets"], given, b["advantages"], b["mask"])
    loss, metrics = policy_loss(*args, b["correct"], cfg, sampler_logprobs=behaviour, is_cap=2.0)
    gh, gw = torch.autograd.grad(loss, (b["hidden"], b["weight"]))

    m = b["mask"]
    plain = [
        min(float(torch.exp(old[i, j] - behaviour[i, j])), 2.0) for i, j in m.nonzero().tolist()
    ]
    raw = [float(torch.exp(old[i, j] - behaviour[i, j])) for i, j in m.nonzero().tolist()]
    assert 0 < sum(r > 2.0 for r in raw) < len(raw), "the batch must truncate some tokens"
    assert float(metrics["is_weight_mean"]) == pytest.approx(sum(plain) / len(plain), rel=1e-5)
    assert float(metrics["is_weight_max"]) == pytest.approx(max(plain), rel=1e-5)
    assert float(metrics["is_weight_capped_frac"]) == pytest.approx(
        sum(r > 2.0 for r in raw) / len(raw)
    )
    weights = plain_truncated_weights(old, behaviour, m, 2.0)
    ref_loss, ref_gh, ref_gw = naive_loss(b, cfg, old, weights)
    close(loss.detach(), ref_loss)
    close(gh, ref_gh)
    close(gw, ref_gw)
    if proximal == "current":
        recomputed = token_logprobs(b["hidden"].detach(), b["weight"].detach(), b["targets"])
        pass_weights = plain_truncated_weights(recomputed, behaviour, m, 2.0)
        with_pass = fused(b, cfg, recomputed, pass_weights)
        for x, y in zip((loss.detach(), gh, gw), with_pass[:3]):
            close(x, y, rtol=1e-6)


def test_importance_weights_in_the_loss_need_their_inputs(batch_factory):
    b = batch_factory()
    cfg = LossConfig(compile=False)
    args = (b["hidden"], b["weight"], b["targets"])
    rest = (b["advantages"], b["mask"], b["correct"], cfg)
    sampler = b["old_logprobs"]
    for old, kwargs in (
        (None, {}),  # no behaviour log-probs
        (b["old_logprobs"], {}),
        (None, {"sampler_logprobs": sampler, "is_weights": torch.ones(b["mask"].shape)}),
    ):
        with pytest.raises(ValueError, match="is_cap"):
            policy_loss(*args, old, *rest, is_cap=2.0, **kwargs)
    with pytest.raises(ValueError, match="is_cap"):
        policy_loss(*args, None, *rest, sampler_logprobs=sampler, is_cap=0.5)
