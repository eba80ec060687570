"""How much SimKO changes the update of the CPU default's real policy, rule by rule.

    python tools/simko_mechanism.py [--model-dir DIR] [--prompts 64] [--samples 8]

One rollout batch of the warm-started tiny policy (train-split prompts, temperature 1),
scored by the Countdown verifier. On it, the parameter gradient of the loss is taken with
each SimKO rule switched on alone, and the tool prints the share of the gradient's norm the
rule carries (‖g(rule) − g(GRPO)‖ / ‖g(rule)‖), at several α, λ and τ; and the policy's
shape where SimKO acts: how many tokens the gate picks, their entropy, and the probability
the ranks 2..K hold there and over all tokens. The boost's fixed point is telling: on a
correct response's gated token it stops lowering a top-K candidate once its probability
reaches about α/K, so it only protects candidates that GRPO has pushed below that.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from simko_tune.demo.countdown import countdown_reward, make_countdown_problems
from simko_tune.demo.warm_start import CountdownTokens, ensure_tiny_policy, sample_answers
from simko_tune.loss import LossConfig, group_advantages, policy_loss
from simko_tune.models import final_hidden, load_hf_model, output_weight
from simko_tune.rollout import build_rollout_batch

ALPHAS = (0.01, 0.1, 0.3, 1.0)
LAMBDAS = (1.1, 1.5, 2.0)
TAUS = (0.8, 0.5, 0.4)


def rollout(model, tokens: CountdownTokens, prompts: int, samples: int, seed: int):
    problems = make_countdown_problems(prompts, seed, "train")
    prompt_ids = [tokens.prompt(p.problem) for p in problems for _ in range(samples)]
    answers = sample_answers(
        model, prompt_ids, tokens.stop_id, tokens.pad_id, 24, torch.Generator().manual_seed(seed)
    )
    golds = [p.answer for p in problems for _ in range(samples)]
    rewards = [countdown_reward(tokens.decode(a), g) for a, g in zip(answers, golds)]
    responses = [a + [tokens.stop_id] for a in answers]
    return build_rollout_batch(
        prompts=prompt_ids,
        responses=responses,
        worker_logprobs=[[0.0] * len(r) for r in responses],
        rewards=rewards,
        truncated=[False] * len(responses),
        pad_id=tokens.pad_id,
    )


def gradient(model, batch, advantages, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """The flattened parameter gradient of one loss evaluation, and the loss's metrics."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = final_hidden(model, batch.tokens)
    loss, metrics = policy_loss(
        hidden, output_weight(model), batch.targets, None, advantages, batch.mask,
        batch.rewards >= 1.0, cfg,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads]), metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, default=Path.home() / ".cache/simko_tune/tiny_cpu_policy"
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model_dir = ensure_tiny_policy(args.model_dir)
    model = load_hf_model(model_dir)
    tokens = CountdownTokens(model_dir)
    batch = rollout(model, tokens, args.prompts, args.samples, args.seed)
    advantages = group_advantages(batch.rewards, args.samples)
    out: dict = {
        "tool": "simko_mechanism",
        "responses": len(batch),
        "reward_mean": float(batch.rewards.mean()),
        "tokens": int(batch.mask.sum()),
        "by_tau": {},
    }
    print(
        f"{len(batch)} responses, reward {out['reward_mean']:.3f}, {out['tokens']} response tokens"
    )
    for tau in TAUS:
        grpo = LossConfig(mode="grpo", tau=tau, compile=False)
        g_grpo, m = gradient(model, batch, advantages, grpo)
        simko = dataclasses.replace(grpo, mode="simko", alpha=0.0, lam=1.0)
        row = {
            "gated_tokens_per_response": float(m["gated_frac"]) * out["tokens"] / len(batch),
            "entropy_gated": float(m["policy/entropy_gated"]),
            "entropy_all": float(m["policy/entropy_all"]),
            "mass_rank2_to_k_gated": float(m["policy/mass_rank2_to_k_gated"]),
            "mass_rank2_to_k_all": float(m["policy/mass_rank2_to_k_all"]),
            "boost_share": {},
            "lambda_share": {},
        }
        for alpha in ALPHAS:
            g, _ = gradient(model, batch, advantages, dataclasses.replace(simko, alpha=alpha))
            row["boost_share"][str(alpha)] = float((g - g_grpo).norm() / g.norm())
        for lam in LAMBDAS:
            g, _ = gradient(model, batch, advantages, dataclasses.replace(simko, lam=lam))
            row["lambda_share"][str(lam)] = float((g - g_grpo).norm() / g.norm())
        out["by_tau"][str(tau)] = row
        print(
            f"τ={tau}: {row['gated_tokens_per_response']:.2f} gated tokens per response; "
            f"entropy {row['entropy_gated']:.3f} gated / {row['entropy_all']:.3f} all; "
            f"rank-2..K mass {row['mass_rank2_to_k_gated']:.3f} gated / "
            f"{row['mass_rank2_to_k_all']:.3f} all"
        )
        print(
            "  share of the gradient's norm: boost "
            + ", ".join(f"α={a} {100 * v:.2f}%" for a, v in row["boost_share"].items())
            + "; λ "
            + ", ".join(f"λ={k} {100 * v:.2f}%" for k, v in row["lambda_share"].items())
        )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
