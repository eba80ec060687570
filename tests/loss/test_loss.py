"""The fused chunked policy loss against a plain full-logits reference, gradients included."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from simko_tune.loss import (
    AGGREGATIONS,
    MODES,
    PSR_NSR_NORMS,
    LossConfig,
    _segment_quantile,
    group_advantages,
    kept_responses,
    loss_config_problems,
    mode_advantages,
    policy_loss,
    token_logprobs,
)
from simko_tune.loss_reference import reference_policy_loss

INPUTS = ("targets", "old_logprobs", "advantages", "mask", "correct")


# --------------------------------------------------------------------------- the reference


def reference_loss(b, cfg, normalizer=None, old_topk_logprobs=None, use_ref=False):
    """The plain full-logits loss (simko_tune.loss_reference), autograd for the gradients.
    bf16 inputs are upcast first: the reference then differs from the fused loss only by the
    fused loss's bf16 matmuls."""
    hidden, weight = b["hidden"], b["weight"]
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    loss = reference_policy_loss(
        h32, w32, b["targets"], b["old_logprobs"], b["advantages"], b["mask"], b["correct"],
        cfg, normalizer=normalizer, ref_logprobs=b["ref_logprobs"],
        old_topk_logprobs=old_topk_logprobs,
    )  # fmt: skip
    gh, gw = torch.autograd.grad(loss, (h32, w32))
    return loss.detach(), gh.to(hidden.dtype), gw.to(weight.dtype)


def fast_loss(b, cfg, normalizer=None, use_ref=None):
    hidden, weight = b["hidden"], b["weight"]
    use_ref = cfg.kl_coef > 0 if use_ref is None else use_ref
    loss, metrics = policy_loss(
        hidden,
        weight,
        *(b[k] for k in INPUTS),
        cfg,
        ref_logprobs=b["ref_logprobs"] if use_ref else None,
        normalizer=normalizer,
    )
    gh, gw = torch.autograd.grad(loss, (hidden, weight), allow_unused=True)
    return loss.detach(), gh, gw, metrics


def close(actual, expected, rtol=1e-5, atol=0.0):
    """Relative to the tensor's scale, so near-zero entries do not need exact agreement.
    Losses are means of O(1) terms that can cancel: they pass an absolute floor."""
    scale = expected.abs().max().clamp_min(1e-12)
    atol = max(atol, rtol * scale.item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def check(b, cfg, rtol=1e-5, normalizer=None):
    loss, gh, gw, _ = fast_loss(b, cfg, normalizer)
    ref_loss, ref_gh, ref_gw = reference_loss(b, cfg, normalizer)
    close(loss, ref_loss, rtol, atol=rtol / 10)
    close(gh.float(), ref_gh.float(), rtol)
    close(gw.float(), ref_gw.float(), rtol)
    return loss, gh, gw


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    ("mode", "agg"),
    [
        (mode, agg)
        for mode in MODES
        for agg in AGGREGATIONS
        # dr_grpo is defined with the constant-length aggregation only
        if mode != "dr_grpo" or agg == "seq_mean_token_sum_norm"
    ],
)
def test_matches_reference_every_mode_and_agg(batch_factory, mode, agg):
    b = batch_factory(seed=hash((mode, agg)) % 1000)
    for chunk_size in (1, 7, 23, 4096):
        cfg = LossConfig(
            mode=mode, agg=agg, chunk_size=chunk_size, compile=False, max_response_len=13
        )
        check(b, cfg)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_entropy_temperature(batch_factory, kl_type):
    b = batch_factory(seed=5)
    cfg = LossConfig(
        kl_coef=0.3,
        kl_type=kl_type,
        entropy_coef=0.05,
        temperature=0.7,
        clip_high=0.28,
        top_k=4,
        alpha=0.2,
        chunk_size=9,
        compile=False,
    )
    check(b, cfg)


def test_max_response_len_and_global_normalizer(batch_factory):
    b = batch_factory(seed=2)
    cfg = LossConfig(agg="seq_mean_token_sum_norm", max_response_len=40, compile=False)
    check(b, cfg, normalizer=13.0)
    check(b, dataclasses.replace(cfg, agg="token_mean"), normalizer=torch.tensor(101.0))


def test_bf16_inputs(batch_factory):
    b = batch_factory(seed=3, dtype=torch.bfloat16)
    cfg = LossConfig(chunk_size=10, compile=False)
    loss, gh, gw, _ = fast_loss(b, cfg)
    assert gh.dtype == gw.dtype == torch.bfloat16
    # The reference upcasts the same bf16 values: only the bf16 logits/grad matmuls differ.
    ref_loss, ref_gh, ref_gw = reference_loss(b, cfg)
    close(loss, ref_loss, rtol=2e-2)
    close(gh.float(), ref_gh.float(), rtol=3e-2)
    close(gw.float(), ref_gw.float(), rtol=3e-2)


@pytest.mark.parametrize("mode", ["simko", "grpo"])
def test_compiled_matches_reference(batch_factory, mode):
    b = batch_factory(seed=11)
    for chunk_size in (5, 4096):
        cfg = LossConfig(mode=mode, chunk_size=chunk_size, entropy_coef=0.01, compile=True)
        check(b, cfg)


def test_all_masked_batch_gives_zero(batch_factory):
    b = batch_factory(seed=4)
    b["mask"] = torch.zeros_like(b["mask"])
    for agg in AGGREGATIONS:
        cfg = LossConfig(agg=agg, kl_coef=0.1, entropy_coef=0.1, compile=False, max_response_len=11)
        loss, gh, gw, metrics = fast_loss(b, cfg)
        assert loss.item() == 0.0
        assert not gh.any() and not gw.any()
        assert all(torch.isfinite(v).all() for v in metrics.values())
        assert metrics["num_tokens"].item() == 0


def test_no_grad_call_returns_loss(batch_factory):
    b = batch_factory(seed=6)
    cfg = LossConfig(compile=False)
    with torch.no_grad():
        loss, _ = policy_loss(b["hidden"], b["weight"], *(b[k] for k in INPUTS), cfg)
    close(loss, reference_loss(b, cfg)[0])


def test_scaled_loss_scales_grads_and_second_backward_fails(batch_factory):
    b = batch_factory(seed=17)
    cfg = LossConfig(compile=False)
    _, gh, gw, _ = fast_loss(b, cfg)
    loss, _ = policy_loss(b["hidden"], b["weight"], *(b[k] for k in INPUTS), cfg)
    gh3, gw3 = torch.autograd.grad(3.0 * loss, (b["hidden"], b["weight"]), retain_graph=True)
    close(gh3, 3 * gh)
    close(gw3, 3 * gw)
    with pytest.raises(RuntimeError, match="single backward"):
        torch.autograd.grad(loss, (b["hidden"], b["weight"]))


# --------------------------------------------------------------------------- properties


def test_gamma_plus_has_the_value_of_gamma(batch_factory):
    """With λ = 1, SimKO only changes gradients: its loss equals GRPO's."""
    b = batch_factory(seed=7)
    simko = fast_loss(b, LossConfig(mode="simko", lam=1.0, alpha=0.3, compile=False))[0]
    grpo = fast_loss(b, LossConfig(mode="grpo", compile=False))[0]
    close(simko, grpo, rtol=1e-6)


def test_old_topk_logprobs_cancel(batch_factory):
    b = batch_factory(seed=8)
    cfg = LossConfig(alpha=0.5, compile=False)
    zero = reference_loss(b, cfg)
    noise = torch.randn(*b["mask"].shape, cfg.top_k)
    other = reference_loss(b, cfg, old_topk_logprobs=noise)
    for x, y in zip(zero, other):
        close(x, y, rtol=1e-6)


def test_simko_raises_non_sampled_topk_of_correct_responses(batch_factory):
    b = batch_factory(seed=9)
    b["correct"] = torch.ones_like(b["correct"])
    b["advantages"] = torch.full_like(b["advantages"], 1.0)
    cfg = LossConfig(alpha=0.5, chunk_size=16, compile=False)
    with torch.no_grad():
        logp = torch.log_softmax(b["hidden"] @ b["weight"].T, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    top = logp.topk(cfg.top_k, dim=-1).indices
    gate = torch.zeros_like(b["mask"])
    for i in range(gate.shape[0]):
        if b["mask"][i].any():
            gate[i] = b["mask"][i] & (entropy[i] > torch.quantile(entropy[i][b["mask"][i]], 0.8))
    non_sampled = (top != b["targets"][..., None]) & gate[..., None]

    def after_step(mode):
        _, _, gw, _ = fast_loss(b, dataclasses.replace(cfg, mode=mode))
        with torch.no_grad():
            new = torch.log_softmax(b["hidden"] @ (b["weight"] - 0.05 * gw).T, -1)
        return new.gather(-1, top)[non_sampled]

    assert non_sampled.sum() > 10
    gain = after_step("simko") - after_step("grpo")
    assert gain.mean() > 0
    assert (gain > 0).float().mean() > 0.75


def test_segment_quantile_matches_torch_quantile():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([1, 2, 5, 6, 11, 16, 3])
    values = torch.rand(int(counts.sum()), generator=gen)
    values[3:5] = values[2]  # ties
    got, rows = _segment_quantile(values, counts.tolist(), 0.8)
    assert torch.equal(rows, torch.repeat_interleave(torch.arange(len(counts)), counts))
    expected = torch.stack([torch.quantile(s, 0.8) for s in values.split(counts.tolist())])
    assert torch.equal(got, expected)


def _hidden_grad_rows(b, cfg):
    gh = fast_loss(b, cfg)[1]
    return gh.abs().sum(-1) > 0


def test_gates_boost_and_lambda_hit_exactly_their_tokens(batch_factory):
    """Hidden-state gradients are per token: the difference between two settings marks
    exactly the tokens a rule touches."""
    b = batch_factory(seed=12, batch=32, seq_len=24)
    with torch.no_grad():
        logits = b["hidden"] @ b["weight"].T
        logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    mask = b["mask"]
    gate = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        if mask[i].any():
            gate[i] = mask[i] & (entropy[i] > torch.quantile(entropy[i][mask[i]], 0.8))
    argmax = b["targets"] == logits.argmax(-1)
    A = b["advantages"][:, None]
    correct = b["correct"][:, None]
    base = LossConfig(chunk_size=13, compile=False, alpha=0.0, lam=1.0)

    def changed(**kw):
        g0 = fast_loss(b, base)[1]
        g1 = fast_loss(b, dataclasses.replace(base, **kw))[1]
        return (g1 - g0).abs().sum(-1) > 1e-9

    ratio = torch.exp(logp.gather(-1, b["targets"][..., None]).squeeze(-1) - b["old_logprobs"])
    # Where the clipped branch wins the token has no gradient at all, λ or not.
    clipped = ((A < 0) & (ratio < 0.8)) | ((A > 0) & (ratio > 1.2))
    lam_set = gate & argmax & (A < 0) & ~clipped
    assert lam_set.sum() > 2
    assert torch.equal(changed(lam=1.1), lam_set)
    # The boost changes the gradient at gated tokens of correct responses only (A > 0 there;
    # a zero advantage would leave nothing to boost).
    boost_set = gate & correct & (A != 0) & ~clipped
    assert boost_set.sum() > 2
    assert torch.equal(changed(alpha=0.3), boost_set)
    # forking_only trains exactly the gated tokens (nonzero advantage, ratio not clipped).
    g = fast_loss(b, dataclasses.replace(base, mode="forking_only"))[1]
    trained = g.abs().sum(-1) > 0
    assert not (trained & ~gate).any()
    assert trained.sum() > 0


def test_padding_has_no_effect(batch_factory):
    b = batch_factory(seed=13)
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01, compile=False, chunk_size=6)
    loss, gh, gw, _ = fast_loss(b, cfg)
    pad = ~b["mask"]
    gen = torch.Generator().manual_seed(1)
    b2 = dict(b)
    with torch.no_grad():
        noise = 50 * torch.randn(b["hidden"].shape, generator=gen)
        b2["hidden"] = torch.where(pad[..., None], noise, b["hidden"]).requires_grad_()
    rand_ids = torch.randint(0, b["weight"].shape[0], pad.shape, generator=gen)
    b2["targets"] = torch.where(pad, rand_ids, b["targets"])
    b2["old_logprobs"] = torch.where(pad, 1e4, b["old_logprobs"])
    b2["ref_logprobs"] = torch.where(pad, float("nan"), b["ref_logprobs"])
    loss2, gh2, gw2, _ = fast_loss(b2, cfg)
    assert torch.equal(loss, loss2)
    assert torch.equal(gh, gh2) and torch.equal(gw, gw2)
    assert not gh[pad].any()


def test_metrics_match_reference_statistics(batch_factory):
    b = batch_factory(seed=14)
    cfg = LossConfig(chunk_size=8, compile=False)
    _, _, _, metrics = fast_loss(b, cfg, use_ref=True)
    mask = b["mask"]
    with torch.no_grad():
        logits = b["hidden"] @ b["weight"].T
        logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    sampled = logp.gather(-1, b["targets"][..., None]).squeeze(-1)
    top = logp.topk(3, -1).values
    ratio = torch.exp(sampled - b["old_logprobs"])
    A = b["advantages"][:, None].expand_as(ratio)
    clipped = (-A * ratio.clamp(0.8, 1.2)) > (-A * ratio)
    thresholds = [
        torch.quantile(entropy[i][mask[i]], 0.8) for i in range(len(mask)) if mask[i].any()
    ]
    gated = sum(
        ((entropy[i] > t) & mask[i]).sum()
        for i, t in zip([i for i in range(len(mask)) if mask[i].any()], thresholds)
    )
    gate = torch.zeros_like(mask)
    for i, t in zip([i for i in range(len(mask)) if mask[i].any()], thresholds):
        gate[i] = (entropy[i] > t) & mask[i]
    rank2_to_k = top[..., 1:3].exp().sum(-1)  # K = 3
    d = b["ref_logprobs"] - sampled
    expected = {
        "policy/entropy_all": entropy[mask].mean(),
        "policy/entropy_gated": entropy[gate].mean(),
        "policy/mass_rank2_to_k_all": rank2_to_k[mask].mean(),
        "policy/mass_rank2_to_k_gated": rank2_to_k[gate].mean(),
        **{f"policy/logprob_rank{n + 1}_all": top[..., n][mask].mean() for n in range(3)},
        **{f"policy/logprob_rank{n + 1}_gated": top[..., n][gate].mean() for n in range(3)},
        "num_gated": gate.sum().float(),
        "sampled_top1_frac": (b["targets"] == logits.argmax(-1))[mask].float().mean(),
        "logprob_sampled_mean": sampled[mask].mean(),
        "ratio_mean": ratio[mask].mean(),
        "ratio_max": ratio[mask].max(),
        "clip_frac_low": (clipped & (ratio < 1))[mask].float().mean(),
        "clip_frac_high": (clipped & (ratio > 1))[mask].float().mean(),
        "approx_kl": (ratio - 1 - torch.log(ratio))[mask].mean(),
        "kl_ref": (torch.exp(d) - d - 1)[mask].mean(),
        "gate_threshold_mean": torch.stack(thresholds).mean(),
        "gated_frac": gated / mask.sum(),
        "num_tokens": mask.sum().float(),
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        close(metrics[name], value.float(), rtol=1e-5)
        assert not metrics[name].requires_grad
    assert 0 < metrics["clip_frac_low"] and 0 < metrics["clip_frac_high"]


@pytest.mark.parametrize("top_k", [1, 5])
def test_rank2_to_k_mass_follows_top_k(batch_factory, top_k):
    b = batch_factory(seed=15)
    _, _, _, metrics = fast_loss(b, LossConfig(top_k=top_k, chunk_size=8, compile=False))
    with torch.no_grad():
        probs = torch.softmax(b["hidden"] @ b["weight"].T, -1)
    ranked = probs.sort(-1, descending=True).values
    expected = ranked[..., 1:top_k].sum(-1)[b["mask"]].mean()
    close(metrics["policy/mass_rank2_to_k_all"], expected, rtol=1e-5)
    assert (metrics["policy/mass_rank2_to_k_all"] == 0) == (top_k == 1)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_micro_batches_with_global_normalizer_sum_to_one_batch(batch_factory, agg):
    b = batch_factory(seed=15, batch=9, group_size=3)
    cfg = LossConfig(agg=agg, chunk_size=10, kl_coef=0.05, compile=False, max_response_len=20)
    full_loss, full_gh, full_gw, _ = fast_loss(b, cfg)
    counts = b["mask"].sum(1)
    norm = counts.sum() if agg == "token_mean" else (counts > 0).sum()
    loss_sum, gw_sum, gh_parts = 0.0, torch.zeros_like(full_gw), []
    for rows in (slice(0, 2), slice(2, 3), slice(3, 9)):
        part = {k: v[rows].detach() for k, v in b.items()}
        part["hidden"].requires_grad_()
        part["weight"] = b["weight"]
        loss, gh, gw, _ = fast_loss(part, cfg, normalizer=norm.float())
        loss_sum += loss
        gw_sum += gw
        gh_parts.append(gh)
    close(loss_sum, full_loss)
    close(gw_sum, full_gw)
    close(torch.cat(gh_parts), full_gh)


def test_token_logprobs_matches_log_softmax(batch_factory):
    b = batch_factory(seed=16)
    got = token_logprobs(b["hidden"], b["weight"], b["targets"], temperature=0.9, chunk_size=7)
    with torch.no_grad():
        logp = torch.log_softmax(b["hidden"] @ b["weight"].T / 0.9, -1)
    expected = logp.gather(-1, b["targets"][..., None]).squeeze(-1)
    close(got, expected)
    assert not got.requires_grad
    # with a mask only its positions are projected; the rest are 0
    mask = b["mask"].bool()
    masked = token_logprobs(
        b["hidden"], b["weight"], b["targets"], temperature=0.9, chunk_size=7, mask=mask
    )
    close(masked, torch.where(mask, expected, torch.zeros_like(expected)))
    assert 0 < int(mask.sum()) < mask.numel()


def test_config_validation_names_the_field():
    for field, value in (("mode", "ppo"), ("agg", "mean"), ("kl_type", "k4")):
        with pytest.raises(ValueError, match=field):
            LossConfig(**{field: value})
    with pytest.raises(ValueError, match="tau"):
        LossConfig(tau=1.5)


def test_config_validation_reports_every_bad_field():
    with pytest.raises(ValueError) as info:
        LossConfig(mode="ppo", tau=1.5, alpha=-1.0, chunk_size=0, positive_weight=-0.1)
    lines = str(info.value).splitlines()
    assert len(lines) == 5
    for field in ("mode", "tau", "alpha", "chunk_size", "positive_weight"):
        assert any(f"LossConfig.{field}=" in line for line in lines), (field, lines)
    with pytest.raises(ValueError, match="dr_grpo.*seq_mean_token_sum_norm"):
        LossConfig(mode="dr_grpo")
    assert loss_config_problems(LossConfig(mode="dr_grpo", agg="seq_mean_token_sum_norm")) == []


def test_dr_grpo_normaliser_is_a_constant_not_the_batch_width(batch_factory):
    """The same responses padded wider give the same loss and gradients (today's bug was
    dividing by the micro-batch width), and without the constant the loss refuses to run."""
    b = batch_factory(seed=21)
    cfg = LossConfig(
        mode="dr_grpo", agg="seq_mean_token_sum_norm", max_response_len=16, compile=False
    )
    loss, _, gw, _ = fast_loss(b, cfg)
    wide = {k: v.detach() for k, v in b.items()}
    pad = 5
    wide["hidden"] = torch.cat([wide["hidden"], torch.randn(8, pad, 16)], 1).requires_grad_()
    wide["weight"] = b["weight"].detach().clone().requires_grad_()
    for key in ("targets", "old_logprobs", "ref_logprobs"):
        wide[key] = torch.cat([wide[key], torch.zeros(8, pad, dtype=wide[key].dtype)], 1)
    wide["mask"] = torch.cat([wide["mask"], torch.zeros(8, pad, dtype=torch.bool)], 1)
    wide_loss, _, wide_gw, _ = fast_loss(wide, cfg)
    close(wide_loss, loss)
    close(wide_gw, gw)
    # the plain arithmetic: Σ_rows Σ_tokens ℓ / 16 / rows, with ℓ the clipped PPO term
    with torch.no_grad():
        logp = torch.log_softmax(b["hidden"] @ b["weight"].T, -1)
        logp = logp.gather(-1, b["targets"][..., None]).squeeze(-1)
        ratio = torch.exp(logp - b["old_logprobs"])
        A = b["advantages"][:, None]
        per_token = torch.max(-A * ratio, -A * ratio.clamp(0.8, 1.2)) * b["mask"]
        rows = int((b["mask"].sum(1) > 0).sum())
        close(loss, per_token.sum() / 16 / rows, atol=1e-7)
    with pytest.raises(ValueError, match="max_response_len"):
        fast_loss(b, dataclasses.replace(cfg, max_response_len=None))


def test_bad_shapes_and_missing_reference_are_reported(batch_factory):
    b = batch_factory()
    args = [b[k] for k in INPUTS]
    args[1] = args[1][:, :-1]
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(b["hidden"], b["weight"], *args, LossConfig(compile=False))
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(b["hidden"], b["weight"], *(b[k] for k in INPUTS), LossConfig(kl_coef=0.1))


# --------------------------------------------------------------------------- advantages


def test_group_advantages_match_loops():
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(24, generator=gen) < 0.4).float()
    rewards[:4] = 1.0  # identical group
    rewards[4:8] = 0.0  # identical group
    rewards[8:12] = torch.tensor([0.0, 1.0, 0.5, 1.0])
    for scale in (True, False):
        got = group_advantages(rewards, 4, scale_by_std=scale)
        expected = []
        for g in range(6):
            r = [float(x) for x in rewards[4 * g : 4 * g + 4]]
            mean = sum(r) / 4
            var = sum((x - mean) ** 2 for x in r) / 3  # unbiased
            for x in r:
                if len(set(r)) == 1:
                    expected.append(0.0)
                else:
                    expected.append((x - mean) / (var**0.5 + 1e-6) if scale else x - mean)
        close(got, torch.tensor(expected), rtol=1e-6)
    assert torch.equal(group_advantages(rewards[:8], 4), torch.zeros(8))
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0]), 1), torch.zeros(2))


def test_mode_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    for mode in ("simko", "grpo", "forking_only"):
        assert torch.equal(mode_advantages(rewards, 3, mode), group_advantages(rewards, 3))
    # Dr. GRPO: r - mean of the group, no std; the all-correct group gets zeros
    close(
        mode_advantages(rewards, 3, "dr_grpo"),
        torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]),
        rtol=1e-6,
    )
    expected = {
        "psr": [1.0 if r == 1 else 0.0 for r in rewards],
        "nsr": [0.0 if r == 1 else -1.0 for r in rewards],
        "w_reinforce": [0.1 if r == 1 else -1.0 for r in rewards],
    }
    for mode, values in expected.items():
        assert torch.equal(mode_advantages(rewards, 3, mode), torch.tensor(values))
    got = mode_advantages(rewards, 3, "w_reinforce", positive_weight=0.25)
    assert torch.equal(got, torch.tensor([0.25 if r == 1 else -1.0 for r in rewards]))
    with pytest.raises(ValueError, match="mode"):
        mode_advantages(rewards, 3, "ppo")
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)


def test_kept_responses():
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0])
    keep = {
        ("psr", "kept"): [True, False, False, True],
        ("nsr", "kept"): [False, True, True, False],
    }
    for mode in MODES:
        for norm in PSR_NSR_NORMS:
            cfg = LossConfig(mode=mode, psr_nsr_norm=norm, agg="seq_mean_token_sum_norm")
            expected = keep.get((mode, norm), [True] * 4)
            assert kept_responses(rewards, cfg).tolist() == expected, (mode, norm)


@pytest.mark.parametrize("mode", ["psr", "nsr"])
def test_psr_nsr_token_mean_over_the_kept_responses(batch_factory, mode):
    """The official code drops the other responses from the batch, so the token mean runs
    over the kept responses' tokens only. Reference written plainly: A = ±1 on kept rows,
    the clipped PPO term, summed over their tokens, divided by their token count."""
    b = batch_factory(seed=23)
    rewards = b["correct"].float()
    cfg = LossConfig(mode=mode, compile=False, chunk_size=5)
    keep = kept_responses(rewards, cfg)
    rows = keep.nonzero().squeeze(1)
    part = {k: v.detach()[rows] for k, v in b.items() if k != "weight"}
    part["hidden"].requires_grad_()
    part["weight"] = b["weight"]
    part["advantages"] = mode_advantages(rewards, 4, mode)[rows]
    loss, _, gw, _ = fast_loss(part, cfg)

    sign = 1.0 if mode == "psr" else -1.0
    weight = b["weight"].detach().clone().requires_grad_()
    total, tokens = 0.0, 0
    for i in range(len(rewards)):
        if bool(b["correct"][i]) != (mode == "psr"):
            continue
        for t in range(b["mask"].shape[1]):
            if not b["mask"][i, t]:
                continue
            logp = torch.log_softmax(b["hidden"][i, t].detach() @ weight.T, -1)[b["targets"][i, t]]
            ratio = torch.exp(logp - b["old_logprobs"][i, t])
            total = total + torch.max(-sign * ratio, -sign * ratio.clamp(0.8, 1.2))
            tokens += 1
    expected = total / tokens
    (expected_gw,) = torch.autograd.grad(expected, weight)
    close(loss, expected.detach(), atol=1e-7)
    close(gw, expected_gw)
    # "all": the other responses stay with A = 0, so the same sum over all tokens
    everyone = dict(b, advantages=mode_advantages(rewards, 4, mode))
    all_loss = fast_loss(everyone, dataclasses.replace(cfg, psr_nsr_norm="all"))[0]
    close(all_loss, expected.detach() * tokens / int(b["mask"].sum()), atol=1e-7)


def test_kl_estimators_near_the_reference_in_fp32():
    """Close to the reference (the first steps of a run), k3 must stay non-negative and
    accurate in fp32: exp(-d) + d - 1 computed naively rounds to 0 or below."""
    from simko_tune.loss import _kl

    diff = torch.tensor([1e-4, -3e-4, 2e-3, -1e-5, 0.5]).double()  # fp32 values, exactly
    ref = torch.zeros_like(diff)
    for kind, exact, grad in (
        ("k1", diff, torch.ones_like(diff)),
        ("k2", 0.5 * diff**2, diff),
        ("k3", torch.exp(-diff) + diff - 1, 1 - torch.exp(-diff)),
    ):
        value, d_value = _kl(diff.float(), ref.float(), kind)
        assert (value >= 0).all() or kind == "k1"
        torch.testing.assert_close(value.double(), exact, rtol=1e-4, atol=0.0)
        torch.testing.assert_close(d_value.double(), grad, rtol=1e-4, atol=0.0)
