"""GPU check: a few SimKO training steps of a Qwen2.5-1.5B-shaped model (random weights,
bf16 FSDP2, compiled chunked loss), printing tokens/s, MFU and peak memory as one JSON line.

    torchrun --nproc_per_node 1 tools/gpu_check.py [--steps 6 --batch 8 --seq 2048]

No vLLM and no weights: the rollout is random token ids with random rewards, so this measures
the trainer's step (forward, loss, backward, optimizer) only.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from simko_tune.loss import LossConfig, policy_loss
from simko_tune.parallel import (
    ParallelDims,
    clip_grad_norm_,
    full_output_weight,
    hidden_states,
    init_distributed,
    parallelize_model,
)

H100_BF16_DENSE_FLOPS = 989e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--compile-model", action="store_true")
    args = ap.parse_args()

    from torchtune.models.qwen2_5 import qwen2_5_1_5b_base

    rank, world = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device())
    mesh = ParallelDims().build_mesh("cuda")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = qwen2_5_1_5b_base()
    n_params = sum(p.numel() for p in model.parameters())
    model = parallelize_model(
        model, mesh, model_family="qwen2", activation_checkpointing=True,
        compile_blocks=args.compile_model, mixed_precision="bf16",
    )  # fmt: skip
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if "norm" not in name else p.fill_(1.0)
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, fused=True)
    cfg = LossConfig(mode="simko", chunk_size=2048, compile=True)

    vocab = 151_936
    b, s = args.batch, args.seq
    tokens = torch.randint(0, vocab, (b, s), device=device)
    targets = torch.roll(tokens, -1, 1)
    mask = torch.zeros(b, s, dtype=torch.bool, device=device)
    mask[:, s // 4 :] = True  # a prompt quarter, a response rest
    old = torch.full((b, s), -2.0, device=device)
    rewards = torch.randint(0, 2, (b,), device=device).float()
    adv = rewards - rewards.mean()
    correct = rewards > 0

    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hidden = hidden_states(model, tokens)
        loss, _ = policy_loss(
            hidden, full_output_weight(model), targets, old, adv, mask, correct, cfg,
            normalizer=float(mask.sum()),
        )  # fmt: skip
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    tok_s = b * s * world / step_s
    # 6 N flops per token (fwd + bwd) plus activation recomputation (one more forward: 2 N)
    mfu = 8 * n_params * tok_s / (H100_BF16_DENSE_FLOPS * world)
    if rank == 0:
        print(json.dumps({
            "check": "gpu_train_step", "model": "qwen2.5-1.5b-shape", "params": n_params,
            "world": world, "batch": b, "seq": s, "step_s": round(step_s, 4),
            "tokens_per_s": round(tok_s, 1), "mfu_with_recompute": round(mfu, 4),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "loss": float(loss),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
