"""What SimKO does to the policy, pinned by one plain-SGD step from a fixed batch.

Each test takes the same step with SimKO and with GRPO from the same start and compares
where the probability moves. On free logits (each position's logits its own tensor: the
hidden states are the logits, the output weight the identity) every token moves only by
its own gradient, so the rules can be checked token by token, to first order exactly:

- ungated tokens move identically under both;
- at gated tokens of correct responses the non-sampled top-K candidates gain more
  probability under SimKO (the top-K boost), and with the sampled token the top-1 the
  ranks 2..K together gain more;
- at gated tokens of incorrect responses whose sampled token is the top-1, that token
  loses λ times as much probability as under GRPO.

Then the same step through a tiny network's shared parameters, where tokens interact: the
signs hold on average over the tokens each rule touches. Every measured change is checked
against its first-order prediction (the gradient of the measured quantity dotted with the
step), so the sizes are pinned, not just the signs. The checks fail when the loss drops the
boost or the λ factor (the mutation tests at the end).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import simko_tune.loss as loss_module
from simko_tune.loss import LossConfig, group_advantages, policy_loss

K = 3
GROUP = 4
# Steps move logits by ~1e-3: the second-order term is then ~1e-3 of the first-order one.
# The loss computes in fp32; the steps and the probabilities they move are float64, so
# rounding does not blur the comparison.
LR = 0.1


def make_logit_batch(seed: int = 0, batch: int = 16, seq_len: int = 10, vocab: int = 12):
    """Logits with some peaked and some flat positions, targets sampled from them (a third
    forced to the argmax), ragged lengths, and groups that mix correct and incorrect."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(batch, seq_len, 1, generator=gen) * 4.0  # flat ... peaked
    logits = torch.randn(batch, seq_len, vocab, generator=gen) * scale
    with torch.no_grad():
        probs = torch.softmax(logits, -1)
        sampled = torch.multinomial(probs.view(-1, vocab), 1, generator=gen).view(batch, seq_len)
        force = torch.rand(batch, seq_len, generator=gen) < 0.35
        targets = torch.where(force, logits.argmax(-1), sampled)
    lengths = torch.randint(4, seq_len + 1, (batch,), generator=gen)
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0] * (batch // GROUP))
    rewards = rewards[torch.randperm(batch, generator=gen)]
    for g in range(0, batch, GROUP):  # every group mixes: no all-zero advantage
        rewards[g], rewards[g + 1] = 1.0, 0.0
    return {
        "logits": logits,
        "targets": targets,
        "mask": mask,
        "rewards": rewards,
        "advantages": group_advantages(rewards, GROUP),
        "correct": rewards == 1,
    }


def reference_gate(logits: torch.Tensor, mask: torch.Tensor, tau: float = 0.8) -> torch.Tensor:
    """Entropy above the response's own τ-quantile, written out per response."""
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    gate = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        q = torch.quantile(entropy[i][mask[i]], tau)
        gate[i] = mask[i] & (entropy[i] > q)
    return gate


def logit_gradient(b, cfg: LossConfig) -> torch.Tensor:
    """dLoss/dlogits through the fused loss: hidden = logits, output weight = identity.
    No old log-probs: the ratio is 1, so no clipping, and the step is the plain gradient."""
    vocab = b["logits"].shape[-1]
    hidden = b["logits"].clone().requires_grad_()
    loss, _ = policy_loss(
        hidden, torch.eye(vocab), b["targets"], None, b["advantages"], b["mask"],
        b["correct"], cfg,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, hidden)
    return grad.double()


def first_order(fn, logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """fn(logits + step) - fn(logits) to first order: the Jacobian-vector product."""
    _, jvp = torch.autograd.functional.jvp(fn, logits, step)
    return jvp


def top_ids(logits: torch.Tensor) -> torch.Tensor:
    return logits.topk(K, dim=-1).indices


def assert_first_order(actual: torch.Tensor, predicted: torch.Tensor, rel: float = 0.02):
    """Each change equals its first-order prediction up to a small second-order term
    (relative to the change, or to the largest change where one nearly cancels)."""
    err = (actual - predicted).abs()
    floor = rel * 0.2 * predicted.abs().max()
    assert (err <= rel * predicted.abs() + floor).all(), (
        f"max error {err.max():.3e} against predictions of size {predicted.abs().max():.3e}"
    )


# --------------------------------------------------------------------------- free logits


def check_on_free_logits(b, simko: LossConfig) -> dict[str, float]:
    """The three rules, token by token; returns the share of the SimKO gradient's norm that
    the top-K boost carries (the part that vanishes with α = 0)."""
    grpo = dataclasses.replace(simko, mode="grpo")
    logits = b["logits"].double()
    g_simko, g_grpo = logit_gradient(b, simko), logit_gradient(b, grpo)
    step_simko, step_grpo = -LR * g_simko, -LR * g_grpo
    gate = reference_gate(logits, b["mask"], simko.tau)
    ids = top_ids(logits)
    is_top1 = b["targets"] == ids[..., 0]
    correct = b["correct"][:, None].expand_as(gate)

    # 1. Ungated tokens (and padding): the same gradient, bit for bit.
    assert torch.equal(g_simko[~gate], g_grpo[~gate])

    # 2. Correct responses, gated tokens: every non-sampled top-K candidate gains more.
    def topk_probs(z):
        return torch.softmax(z, -1).gather(-1, ids)

    boosted = gate & correct
    others = (ids != b["targets"][..., None]) & boosted[..., None]  # [B, T, K]
    assert others.sum() >= 10
    before = topk_probs(logits)
    gain = {}
    for name, step in (("simko", step_simko), ("grpo", step_grpo)):
        gain[name] = topk_probs(logits + step) - before
        assert_first_order(gain[name][others], first_order(topk_probs, logits, step)[others])
    assert (gain["simko"][others] > gain["grpo"][others]).all()
    # With the top-1 sampled, the ranks 2..K together gain more (they rise, where GRPO
    # lowers them); the sampled token itself gains less (its (1 - α) share).
    top1_boosted = boosted & is_top1
    assert top1_boosted.sum() >= 3
    mass = {k: v[..., 1:].sum(-1)[top1_boosted] for k, v in gain.items()}
    assert (mass["simko"] > mass["grpo"]).all()
    assert (gain["simko"][..., 0][top1_boosted] < gain["grpo"][..., 0][top1_boosted]).all()

    # 3. Incorrect responses, gated tokens whose sampled token is the top-1: it loses λ
    # times as much (the advantage is scaled by λ there); elsewhere in those responses
    # nothing changes (covered by 1 for ungated tokens, checked here for gated ones).
    def sampled_prob(z):
        return torch.softmax(z, -1).gather(-1, b["targets"][..., None]).squeeze(-1)

    penalised = gate & ~correct & is_top1
    assert penalised.sum() >= 3
    p0 = sampled_prob(logits)
    drop = {}
    for name, step in (("simko", step_simko), ("grpo", step_grpo)):
        drop[name] = sampled_prob(logits + step) - p0
        assert_first_order(
            drop[name][penalised], first_order(sampled_prob, logits, step)[penalised]
        )
    assert (drop["grpo"][penalised] < 0).all()
    torch.testing.assert_close(
        drop["simko"][penalised] / drop["grpo"][penalised],
        torch.full((int(penalised.sum()),), simko.lam, dtype=torch.float64),
        rtol=5e-3,
        atol=0.0,
    )
    untouched = gate & ~correct & ~is_top1
    assert torch.equal(g_simko[untouched], g_grpo[untouched])

    no_boost = logit_gradient(b, dataclasses.replace(simko, alpha=0.0))
    return {"boost_share": float((g_simko - no_boost).norm() / g_simko.norm())}


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("lam", [1.1, 2.0])
def test_each_rule_moves_exactly_its_tokens_on_free_logits(alpha, lam):
    b = make_logit_batch(seed=1)
    check_on_free_logits(b, LossConfig(alpha=alpha, lam=lam, top_k=K, compile=False))


def test_boost_share_of_the_gradient_grows_with_alpha():
    """The boost is a fraction of order α of each boosted token's gradient (the rest of the
    batch is untouched), so its share of the whole gradient's norm is below α and grows
    with it, about linearly while α is small."""
    b = make_logit_batch(seed=2)
    shares = [
        check_on_free_logits(b, LossConfig(alpha=a, top_k=K, compile=False))["boost_share"]
        for a in (0.01, 0.02, 0.1, 0.5)
    ]
    assert 0 < shares[0] < 0.01
    assert shares == sorted(shares)
    assert shares[1] / shares[0] == pytest.approx(2.0, rel=0.05)


# --------------------------------------------------------------------------- shared parameters


class TinyNet(torch.nn.Module):
    """Embedding of the previous token and the position, one hidden layer, an output layer:
    every position's logits depend on the same parameters."""

    def __init__(self, vocab: int, seq_len: int, dim: int = 16, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tok = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen))
        self.pos = torch.nn.Parameter(torch.randn(seq_len, dim, generator=gen))
        self.hidden = torch.nn.Parameter(torch.randn(dim, dim, generator=gen) / dim**0.5)
        self.out = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen) * 0.8)

    def hidden_states(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.tok[inputs] + self.pos[: inputs.shape[1]]
        return torch.tanh(x @ self.hidden) * 2.0


def shared_batch(seed: int = 3, batch: int = 32, seq_len: int = 8, vocab: int = 10):
    net = TinyNet(vocab, seq_len, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    with torch.no_grad():
        logits = net.hidden_states(inputs) @ net.out.T
    b = make_logit_batch(seed=seed, batch=batch, seq_len=seq_len, vocab=vocab)
    with torch.no_grad():  # targets sampled from the network's own policy
        probs = torch.softmax(logits, -1).view(-1, vocab)
        sampled = torch.multinomial(probs, 1, generator=gen).view(batch, seq_len)
        force = torch.rand(batch, seq_len, generator=gen) < 0.35
        b["targets"] = torch.where(force, logits.argmax(-1), sampled)
    b["logits"] = logits
    return net, inputs, b


SHARED_LR = 0.005  # parameters move every token at once: a smaller step keeps it linear


def sgd_step(net: TinyNet, inputs, b, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """The parameter step -SHARED_LR·∇θ of one loss evaluation."""
    params = dict(net.named_parameters())
    hidden = net.hidden_states(inputs)
    loss, _ = policy_loss(
        hidden, net.out, b["targets"], None, b["advantages"], b["mask"], b["correct"], cfg
    )
    grads = torch.autograd.grad(loss, list(params.values()))
    return {k: -SHARED_LR * g.double() for k, g in zip(params, grads)}


def _logits(params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    x = params["tok"][inputs] + params["pos"][: inputs.shape[1]]
    return (torch.tanh(x @ params["hidden"]) * 2.0) @ params["out"].T


def check_through_shared_parameters(simko: LossConfig) -> None:
    net, inputs, b = shared_batch()
    grpo = dataclasses.replace(simko, mode="grpo")
    logits = b["logits"]
    gate = reference_gate(logits, b["mask"], simko.tau)
    ids = top_ids(logits)
    is_top1 = b["targets"] == ids[..., 0]
    correct = b["correct"][:, None].expand_as(gate)
    boosted = gate & correct & is_top1
    penalised = gate & ~correct & is_top1
    assert boosted.sum() >= 5 and penalised.sum() >= 5
    base = {k: v.detach().double() for k, v in net.named_parameters()}

    def quantities(params):
        z = _logits(params, inputs)
        p = torch.softmax(z, -1)
        rank2_to_k = p.gather(-1, ids)[..., 1:].sum(-1)
        sampled = p.gather(-1, b["targets"][..., None]).squeeze(-1)
        return torch.stack([rank2_to_k[boosted].mean(), sampled[penalised].mean()])

    q0 = quantities(base)
    moved = {}
    without_boost = dataclasses.replace(simko, alpha=0.0)
    without_lam = dataclasses.replace(simko, lam=1.0)
    for name, cfg in (
        ("simko", simko), ("grpo", grpo), ("no_boost", without_boost), ("no_lam", without_lam)
    ):  # fmt: skip
        step = sgd_step(net, inputs, b, cfg)
        after = {k: base[k] + step[k] for k in base}
        moved[name] = quantities(after) - q0
        _, predicted = torch.func.jvp(quantities, (base,), (step,))
        assert_first_order(moved[name], predicted, rel=0.05)
    # The ranks 2..K of boosted tokens end higher than under GRPO, the penalised top-1
    # tokens lower. (Their own direction can go either way here: the correct responses'
    # update, shared through the parameters, may raise a penalised token.)
    assert moved["simko"][0] > moved["grpo"][0]
    assert moved["simko"][1] < moved["grpo"][1]
    # ... and each rule does its own part: the boost raises the ranks 2..K, λ lowers the
    # penalised top-1 tokens (each against SimKO without that rule).
    assert moved["simko"][0] > moved["no_boost"][0]
    assert moved["simko"][1] < moved["no_lam"][1]


@pytest.mark.parametrize(("alpha", "lam"), [(0.1, 1.5), (0.5, 2.0)])
def test_signs_hold_through_shared_parameters(alpha, lam):
    check_through_shared_parameters(LossConfig(alpha=alpha, lam=lam, top_k=K, compile=False))


# --------------------------------------------------------------------------- mutations


def _mutated(monkeypatch, **changes):
    """Make the loss ignore one of SimKO's rules: its per-token terms are computed with
    ``changes`` applied to the config (alpha=0: no boost; lam=1: no λ)."""
    original = loss_module._token_terms

    def mutant(logp, entropy, gated, is_top1, t, cfg):
        return original(logp, entropy, gated, is_top1, t, dataclasses.replace(cfg, **changes))

    monkeypatch.setattr(loss_module, "_token_terms", mutant)


@pytest.mark.parametrize("changes", [{"alpha": 0.0}, {"lam": 1.0}])
def test_free_logit_checks_catch_a_dropped_rule(monkeypatch, changes):
    _mutated(monkeypatch, **changes)
    with pytest.raises(AssertionError):
        check_on_free_logits(make_logit_batch(seed=1), LossConfig(top_k=K, compile=False))


@pytest.mark.parametrize("changes", [{"alpha": 0.0}, {"lam": 1.0}])
def test_shared_parameter_checks_catch_a_dropped_rule(monkeypatch, changes):
    _mutated(monkeypatch, **changes)
    with pytest.raises(AssertionError):
        check_through_shared_parameters(LossConfig(alpha=0.1, lam=1.5, top_k=K, compile=False))
