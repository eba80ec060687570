"""Latency of one generate call through a vLLM worker on a tiny model (the TRL comparison's
batch: 4 prompts x 8 samples x 32 new tokens, temperature 1), against Hugging Face
``generate`` on the same model and batch in this process.

Reports, as medians over alternating repeats: the round trip through the worker (seeded, as
the trainer calls it, and unseeded), the engine's own time inside the worker
(``llm.generate``) when the worker reports it, so the protocol's share is the difference,
and HF ``generate``. Prints its figures and ends with ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

CORPUS = [
    "Compute 12+30. Put the answer in \\boxed{}. The answer is \\boxed{42}.",
    "Compute 7+8. Put the answer in \\boxed{}. 7 + 8 = 15, so \\boxed{15}.",
] * 16


def build_model(root: Path) -> Path:
    from simko_tune.demo.tiny import TinyQwen2Dims, build_tiny_qwen2, train_tokenizer

    tok = train_tokenizer(CORPUS, root / "tokenizer", vocab_size=384)
    dims = TinyQwen2Dims(
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        embed_dim=64,  # head_dim 32: the smallest vLLM's CPU attention takes
        intermediate_dim=128,
        max_seq_len=256,
    )
    return build_tiny_qwen2(tok, root / "model", dims, seed=0)


def hf_generate_s(
    model_dir: Path, prompts, n: int, max_tokens: int, repeats: int, threads: int
) -> float:
    """Median seconds of one batched, sampled ``model.generate`` (left-padded prompts)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                num_return_sequences=n,
                pad_token_id=0,
            )
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compiled", action="store_true", help="vLLM with torch.compile")
    parser.add_argument(
        "--cores",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="threads for each side (1 is steadier on a shared machine)",
    )
    args = parser.parse_args()

    from simko_tune.generation import SamplingConfig, VLLMWorkers

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        prompts = [[5 + i, 17, 42, 9, 100 + i][: 2 + i % 4] for i in range(args.prompts)]
        # Fixed-length responses: seeded and unseeded calls do the same work.
        seeded = SamplingConfig(
            temperature=1.0, max_tokens=args.max_tokens, seed=1, ignore_eos=True
        )
        unseeded = SamplingConfig(
            temperature=1.0, max_tokens=args.max_tokens, seed=None, ignore_eos=True
        )
        engine = {"dtype": "float32", "max_model_len": 256, "enforce_eager": not args.compiled}
        t0 = time.perf_counter()
        cores = sorted(os.sched_getaffinity(0))[: args.cores]
        workers = VLLMWorkers.start_local(
            model_dir,
            engine_kwargs=engine,
            devices=[",".join(map(str, cores))],
            request_timeout_s=600,
        )
        start_s = time.perf_counter() - t0
        times: dict[str, list[float]] = {"seeded": [], "unseeded": [], "engine_seeded": []}
        tokens = []
        try:
            for r in range(args.repeats + 2):
                for name, sampling in (("seeded", seeded), ("unseeded", unseeded)):
                    t0 = time.perf_counter()
                    out = workers.generate(prompts, args.n, sampling)
                    elapsed = time.perf_counter() - t0
                    if r >= 2:  # the first calls warm the engine
                        times[name].append(elapsed)
                        if name == "seeded":
                            tokens.append(sum(len(c.token_ids) for row in out for c in row))
                            engine_s = getattr(workers, "last_generate_timings", {}).get("engine_s")
                            if engine_s is not None:
                                times["engine_seeded"].append(engine_s)
        finally:
            workers.close()
        hf_s = hf_generate_s(model_dir, prompts, args.n, args.max_tokens, args.repeats, args.cores)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"vLLM worker start: {start_s:.1f} s ({'compiled' if args.compiled else 'eager'})")
    print(
        f"one generate call ({args.prompts} prompts x {args.n} samples x {args.max_tokens} "
        f"tokens, {statistics.median(tokens):.0f} tokens): worker round trip seeded "
        f"{med['seeded']:.4f} s, unseeded {med['unseeded']:.4f} s"
    )
    if "engine_seeded" in med:
        print(
            f"  of which the engine (llm.generate): {med['engine_seeded']:.4f} s, protocol and "
            f"client {med['seeded'] - med['engine_seeded']:.4f} s"
        )
    print(f"HF generate, same batch, in process: {hf_s:.4f} s")
    print(f"worker round trip / HF generate: {med['seeded'] / hf_s:.2f}x")
    print(
        json.dumps(
            {
                "bench": "generation_latency",
                "prompts": args.prompts,
                "n": args.n,
                "max_tokens": args.max_tokens,
                "compiled": args.compiled,
                "cores": args.cores,
                "worker_seeded_s": round(med["seeded"], 4),
                "worker_unseeded_s": round(med["unseeded"], 4),
                "engine_seeded_s": round(med.get("engine_seeded", float("nan")), 4),
                "hf_generate_s": round(hf_s, 4),
                "worker_over_hf": round(med["seeded"] / hf_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
