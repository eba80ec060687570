"""The update alone, side by side: the recipe's update (``PPOUpdate``) against what TRL's GRPOTrainer
does with the same batch (a transformers forward, the GRPO loss, backward, gradient clipping,
AdamW), on the same Qwen2.5-0.5B-shaped model, in one process, alternating.

The batch is ``tools/bench_vs_trl.py``'s (4 prompts of 30-49 tokens x 8 samples x 32 response
tokens, random ids) and so are our settings (its overrides of ``tiny_cpu``: one optimizer
step, GRPO, per-response token mean, old log-probs = the current ones, detached; fused AdamW).
The transformers side computes logits on the completion positions only (TRL's
``logits_to_keep``) and steps ``torch.optim.AdamW`` with TRL's default ``adamw_torch``
(``--hf-optim fused``: ``adamw_torch_fused``). ``--layers`` takes that many of the 0.5B shape's
24 blocks (default: all). Both sides run in this process on the threads the recipe's rule
gives it (every core of the affinity mask, or ``OMP_NUM_THREADS``).

    python tools/bench_update_vs_hf.py                # the 0.5B shape
    python tools/bench_update_vs_hf.py --layers 2     # quicker

Each side runs ``--rounds`` updates (default 8), alternating, the one that goes first swapped
every round; the median of each side's second half is reported (steady state).

Prints the figures, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from simko_tune.paths import work_dir

ROOT = Path(__file__).resolve().parents[1]


def _bench_vs_trl():
    spec = importlib.util.spec_from_file_location(
        "bench_vs_trl", ROOT / "tools" / "bench_vs_trl.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_rollout(vocab: int):
    from simko_tune.rollout import build_rollout_batch

    gen = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for _ in range(4):
        n = int(torch.randint(30, 50, (1,), generator=gen))
        prompt = torch.randint(0, vocab - 3, (n,), generator=gen).tolist()
        for _ in range(8):
            prompts.append(prompt)
            responses.append(torch.randint(0, vocab - 3, (32,), generator=gen).tolist())
    rewards = (torch.rand(32, generator=gen) < 0.5).float().tolist()
    return build_rollout_batch(
        prompts, responses, [[-7.0] * 32] * 32, rewards, [True] * 32, pad_id=vocab - 2
    )


def our_update(model_dir: Path, work: Path):
    """The recipe with bench_vs_trl's overrides: model and optimizer only (no workers)."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import simko_recipe
    from omegaconf import OmegaConf

    from simko_tune.config import check_schema, resolve_config_path
    from simko_tune.models import read_hf_config

    cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
    overrides = _bench_vs_trl().our_overrides(model_dir, work / "ours", 1, 0)
    recipe = simko_recipe.SimKORecipe(
        check_schema(OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides)))
    )
    recipe.setup_parallel()
    recipe.hf_config = read_hf_config(model_dir)
    recipe.model = recipe.build_model()
    recipe.setup_update()
    return recipe


def hf_step_fn(model_dir: Path, rollout, fused: bool):
    """TRL's update on this batch: completion logits, GRPO loss (ratio to the detached
    current log-probs, per-response token mean), backward, clip at 1.0, AdamW."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=fused)
    mask = rollout.mask
    first = int(mask.float().argmax(1).min())  # the earliest response position of any row
    keep = mask.shape[1] - first
    inputs = torch.cat([rollout.tokens, rollout.targets[:, -1:]], 1)
    targets, m = rollout.targets[:, first:], mask[:, first:].float()
    adv = torch.randn(len(rollout), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        logits = model(input_ids=inputs, logits_to_keep=keep + 1).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
        per_token = -adv[:, None] * torch.exp(logp - logp.detach())
        loss = ((per_token * m).sum(1) / m.sum(1).clamp_min(1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="of the 0.5B shape's 24")
    parser.add_argument(
        "--rounds", type=int, default=8, help="timed updates each (the second half counts)"
    )
    parser.add_argument("--hf-optim", choices=("loop", "fused"), default="loop")
    parser.add_argument(
        "--work-dir", default=None, help="kept afterwards (default: a temp dir, removed)"
    )
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the second half counts)")
    with work_dir(args.work_dir, "bench_update_vs_hf_") as work:
        med = run(args, work)  # both sides on the threads the recipe's rule gives this process
    threads = torch.get_num_threads()
    print(
        f"update, {args.layers} of 24 blocks, {threads} threads: simko-tune {med['ours']:.2f} s, "
        f"transformers + AdamW ({args.hf_optim}) {med['hf']:.2f} s: "
        f"{med['hf'] / med['ours']:.2f}x (> 1: ours is faster)"
    )
    print(
        json.dumps(
            {
                "bench": "update_vs_hf",
                "layers": args.layers,
                "threads": threads,
                "hf_optim": args.hf_optim,
                "ours_s": med["ours"],
                "hf_s": med["hf"],
                "speedup_vs_hf": med["hf"] / med["ours"],
                "rounds": args.rounds,
            }
        )
    )


def run(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Alternating timed updates, the side that goes first swapped every round; the median
    of each side's second half. Both sides speed up over the first rounds (the process's
    heap settles: fewer fresh pages to fault in per update), so the first half is warm-up."""
    model_dir = _bench_vs_trl().qwen2_5_0_5b_shape(work, layers=args.layers)
    recipe = our_update(model_dir, work)
    rollout = synthetic_rollout(recipe.hf_config["vocab_size"])
    steps = {
        "ours": lambda: recipe.ppo.update(rollout, None),
        "hf": hf_step_fn(model_dir, rollout, fused=args.hf_optim == "fused"),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in sorted(steps, reverse=r % 2 == 1):
            step = steps[name]
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    return {name: statistics.median(t[len(t) // 2 :]) for name, t in times.items()}


if __name__ == "__main__":
    main()
