"""The update alone, side by side: the recipe's update (``PPOUpdate``) against what TRL's GRPOTrainer
does with the same batch (a transformers forward, the GRPO loss, backward, gradient clipping,
AdamW), on the same Qwen2.5-0.5B-shaped model, each side in its own process, alternating.

The batch is ``tools/bench_vs_trl.py``'s (4 prompts of 30-49 tokens x 8 samples x 32 response
tokens, random ids) and so are our settings (its overrides of ``tiny_cpu``: one optimizer
step, GRPO, per-response token mean, old log-probs = the current ones, detached; fused AdamW).
The transformers side computes logits on the completion positions only (TRL's
``logits_to_keep``) and steps ``torch.optim.AdamW`` with TRL's default ``adamw_torch``
(``--hf-optim fused``: ``adamw_torch_fused``). ``--layers`` takes that many of the 0.5B shape's
24 blocks (default: all). Each side runs as its users get it, with no variable added to this
tool's environment: ours with the recipe's process settings (every core of the affinity mask,
or ``OMP_NUM_THREADS``; freed memory kept for the next step), transformers with torch's
defaults. Separate processes, so neither side's heap settings reach the other.

    python tools/bench_update_vs_hf.py                # the 0.5B shape
    python tools/bench_update_vs_hf.py --layers 2     # quicker

Each side runs ``--rounds`` updates (default 8), alternating, the one that goes first swapped
every round; the median of each side's second half is reported (steady state). Each update's
minor page faults are printed too (the memory the process gets back from the kernel).

Prints the figures, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
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
    parser.add_argument("--side", choices=("ours", "hf"), help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the second half counts)")
    if args.side:
        serve(args)
        return
    with work_dir(args.work_dir, "bench_update_vs_hf_") as work:
        med, threads = run(args, work)
    print(
        f"update, {args.layers} of 24 blocks, threads {threads}: simko-tune {med['ours']:.2f} s, "
        f"transformers + AdamW ({args.hf_optim}) {med['hf']:.2f} s: "
        f"{med['hf'] / med['ours']:.2f}x (> 1: ours is faster)"
    )
    print(
        json.dumps(
            {
                "bench": "update_vs_hf",
                "layers": args.layers,
                "threads": threads["ours"],
                "hf_threads": threads["hf"],
                "hf_optim": args.hf_optim,
                "ours_s": med["ours"],
                "hf_s": med["hf"],
                "speedup_vs_hf": med["hf"] / med["ours"],
                "rounds": args.rounds,
            }
        )
    )


def serve(args: argparse.Namespace) -> None:
    """A child: build one side, then one timed update per line read on stdin, answered with
    ``BENCH <seconds> <minor faults>`` (the recipe logs to stderr)."""
    model_dir = _bench_vs_trl().qwen2_5_0_5b_shape(Path(args.work_dir), layers=args.layers)
    if args.side == "ours":
        recipe = our_update(model_dir, Path(args.work_dir))
        rollout = synthetic_rollout(recipe.hf_config["vocab_size"])

        def step() -> None:
            recipe.ppo.update(rollout, None)
    else:
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        step = hf_step_fn(model_dir, synthetic_rollout(vocab), fused=args.hf_optim == "fused")
    print(f"BENCH ready {torch.get_num_threads()}", flush=True)
    for _ in sys.stdin:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step()
        took = time.perf_counter() - t0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(f"BENCH {took} {faults}", flush=True)


def _answer(proc: subprocess.Popen, name: str) -> list[str]:
    for line in proc.stdout:
        if line.startswith("BENCH "):
            return line.split()[1:]
    raise RuntimeError(f"the {name} side exited with status {proc.wait()}")


def run(args: argparse.Namespace, work: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Alternating timed updates, the side that goes first swapped every round; the median
    of each side's second half (the first updates fault in their memory: warm-up)."""
    _bench_vs_trl().qwen2_5_0_5b_shape(work, layers=args.layers)  # built once; the sides reuse it
    cmd = [sys.executable, __file__, "--layers", str(args.layers), "--work-dir", str(work)]
    cmd += ["--hf-optim", args.hf_optim, "--rounds", str(args.rounds)]
    sides = {
        name: subprocess.Popen(
            [*cmd, "--side", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for name in ("hf", "ours")
    }
    try:
        threads = {name: int(_answer(proc, name)[1]) for name, proc in sides.items()}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in sorted(sides, reverse=r % 2 == 1):
                sides[name].stdin.write("step\n")
                sides[name].stdin.flush()
                took, faults = _answer(sides[name], name)
                times[name].append(float(took))
                print(
                    f"round {r + 1}: {name} {float(took):.2f} s, {faults} minor faults", flush=True
                )
    finally:
        for proc in sides.values():
            proc.stdin.close()
            proc.wait()
    med = {name: statistics.median(t[len(t) // 2 :]) for name, t in times.items()}
    return med, threads


if __name__ == "__main__":
    main()
