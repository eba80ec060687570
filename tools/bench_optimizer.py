"""AdamW step on CPU: the fused kernel (``fused=True``, tiny_cpu's setting) against torch's
default per-tensor loop (what TRL's ``optim="adamw_torch"`` runs on CPU), on the tensors of
``--layers`` Qwen2.5-0.5B-shaped transformer blocks (d 896, 14/2 heads, MLP 4864), same
gradients, alternating, 2 threads. Also checks the two agree (max |Δparam| after the steps).

    python tools/bench_optimizer.py --layers 2

Prints the figures, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from simko_tune.parallel import cpu_threads


def block_shapes(layers: int) -> list[tuple[int, ...]]:
    from simko_tune.model_shapes import QWEN2_5_SHAPES

    shape = QWEN2_5_SHAPES["0.5b"]
    d, mlp = shape["embed_dim"], shape["intermediate_dim"]
    kv = d // shape["num_heads"] * shape["num_kv_heads"]
    one = [(d, d), (d,), (kv, d), (kv,), (kv, d), (kv,), (d, d), (mlp, d), (mlp, d), (d, mlp)]
    return one * layers + [(d,)] * 2 * layers  # + the two RMSNorm scales per block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps each (first dropped)")
    args = parser.parse_args()
    threads, _ = cpu_threads()  # the recipe's rule: every core of the mask, or OMP_NUM_THREADS
    torch.set_num_threads(threads)
    shapes = block_shapes(args.layers)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    variants = {}
    for name, kwargs in (("loop", {"foreach": False}), ("fused", {"fused": True})):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kwargs)
        variants[name] = (params, opt)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, (params, opt) in variants.items():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    diff = max(
        float((a - b).detach().abs().max())
        for a, b in zip(variants["loop"][0], variants["fused"][0])
    )
    med = {name: statistics.median(t[1:]) for name, t in times.items()}
    numel = sum(t.numel() for t in init)
    print(
        f"AdamW step, {numel / 1e6:.1f}M params ({args.layers} blocks), {threads} threads: "
        f"per-tensor loop {med['loop']:.3f} s, fused {med['fused']:.3f} s "
        f"({med['loop'] / med['fused']:.1f}x); max |param difference| {diff:.2e}"
    )
    print(
        json.dumps(
            {
                "bench": "optimizer",
                "params_m": numel / 1e6,
                "threads": threads,
                "loop_step_s": med["loop"],
                "fused_step_s": med["fused"],
                "speedup_fused": med["loop"] / med["fused"],
                "max_param_diff": diff,
            }
        )
    )


if __name__ == "__main__":
    main()
