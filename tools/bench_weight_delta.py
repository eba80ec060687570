"""Benchmark weight deltas against full publications, on a Qwen2.5-0.5B-shaped model.

The trainer (fp32, random weights, AdamW on random gradients) publishes in bf16 through
``WeightSync`` to one real vLLM worker, in alternating phases of full publications and of
deltas (``generation.weight_delta``), the same steps for both; every version is delivered
(publish + the worker's rebuild, verify, reload + acknowledgement). Reported, in one run:

- bytes per publication, delta against full (target: <= 5% from the second version on);
- publish + reload + acknowledge seconds in this machine's /dev/shm, delta against full
  (target: <= 1.5x, bytes being nearly free there);
- the projected per-step transfer time over a shared filesystem at 1 and 10 GB/s: the
  trainer writes and the worker reads the bytes, plus the delta's measured encode and
  rebuild (target at 1 GB/s: <= 0.25x full's), and with the rebuild hidden (one-step-off:
  a worker rebuilds the next version while it generates);
- the compression ratio after AdamW steps at lr 1e-6, 1e-5 and 1e-4 (where deltas stop
  paying).

The vocabulary is small (this machine's memory); the engine computes in fp32 (vLLM's CPU
bf16 kernels want AVX-512), loading the bf16 publications by casting. ``--quick``: 4 layers.
Prints figures and ends with ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

GB = 1e9
CORPUS = ["The answer is \\boxed{42}. Let x = 3, then 2x + 1 = 7."] * 16


def build_model(root: Path, num_layers: int) -> Path:
    from simko_tune.demo.tiny import TinyQwen2Dims, build_tiny_qwen2, train_tokenizer
    from simko_tune.model_shapes import QWEN2_5_SHAPES

    tok = train_tokenizer(CORPUS, root / "tokenizer", vocab_size=512)
    dims = TinyQwen2Dims(**{**QWEN2_5_SHAPES["0.5b"], "num_layers": num_layers}, max_seq_len=512)
    return build_tiny_qwen2(tok, root / "model", dims, seed=0)


def adamw_step(model, opt, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.zero_grad(set_to_none=True)


def phase(workers, model, opt, hf_config, sync_dir: Path, delta: bool, first: int, steps: int):
    """``steps`` delivered versions from ``first`` on; with ``delta`` one full version first
    (a new WeightSync has no base), not counted. Returns one row per counted version."""
    import torch

    from simko_tune.generation import WeightSync
    from simko_tune.generation.deltas import DeltaSettings

    sync = WeightSync(
        sync_dir, hf_config, dtype=torch.bfloat16, delta=DeltaSettings() if delta else None
    )
    sync.attach(workers)
    rows, version = [], first
    for i in range(steps + delta):
        adamw_step(model, opt, seed=version)
        t0 = time.perf_counter()
        sync.publish(model, version)
        total = time.perf_counter() - t0
        if not (delta and i == 0):
            stats, timings = sync.last_stats, dict(workers.last_load_timings)
            rows.append(
                {
                    "version": version,
                    "kind": "delta" if stats["delta"] else "full",
                    "bytes": stats["bytes"],
                    "bytes_frac": stats["bytes_frac"],
                    "write_s": sync.last_timings["write_s"],
                    "ack_s": sync.last_timings.get("ack_s", 0.0),
                    "sync_s": total,
                    "encode_s": stats.get("encode_s", 0.0),
                    "rebuild_s": timings.get("rebuild_work_s", 0.0),
                    "rebuild_wait_s": timings.get("rebuild_s", 0.0),
                    "reload_s": timings.get("reload_s", 0.0),
                }
            )
            r = rows[-1]
            print(
                f"  v{version} {r['kind']:5s}: {r['bytes'] / 2**20:7.1f} MiB "
                f"({100 * r['bytes_frac']:5.1f}%), publish {r['write_s']:.2f}s (encode "
                f"{r['encode_s']:.2f}s) + reload/ack {r['ack_s']:.2f}s (rebuild "
                f"{r['rebuild_s']:.2f}s, waited {r['rebuild_wait_s']:.2f}s) = {r['sync_s']:.2f}s",
                flush=True,
            )
        version += 1
    sync.close()
    return rows, version


def compression_by_lr(model_dir: Path, hf_config: dict, root: Path, lrs: list[float]) -> dict:
    """Delta bytes / full bytes after one AdamW step at each learning rate (two steps in,
    so Adam's moments are warm), publications in bf16; no worker."""
    import torch

    from simko_tune.generation import publish_weights
    from simko_tune.generation.deltas import DeltaSettings, DeltaWriter
    from simko_tune.models import load_hf_weights, model_from_hf_config

    out = {}
    for lr in lrs:
        model = model_from_hf_config(model_dir)
        load_hf_weights(model, model_dir, hf_config)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        writer = DeltaWriter(DeltaSettings(max_ratio=1.0))
        sync_dir = root / f"lr{lr:g}"
        for version in (1, 2, 3):
            adamw_step(model, opt, seed=version)
            writer.begin(version)
            publish_weights(model, version, sync_dir, hf_config, dtype=torch.bfloat16, delta=writer)
            writer.end(True)
        out[lr] = writer.stats["bytes"] / writer.stats["full_bytes"]
        print(f"  lr {lr:g}: delta = {100 * out[lr]:.1f}% of full", flush=True)
        del model, opt, writer
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 24")
    parser.add_argument("--steps", type=int, default=4, help="versions per phase")
    parser.add_argument("--rounds", type=int, default=3, help="full/delta phase pairs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_weight_delta_") as root:
        bench(args, Path(root))


def bench(args: argparse.Namespace, root: Path) -> None:
    import torch

    from simko_tune.generation import VLLMWorkers
    from simko_tune.generation.sync_dir import default_sync_dir
    from simko_tune.models import load_hf_weights, model_from_hf_config, read_hf_config
    from simko_tune.parallel.mesh import cpu_threads
    from simko_tune.paths import cache_dir

    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))
    threads, source = cpu_threads()
    torch.set_num_threads(threads)
    num_layers = 4 if args.quick else 24
    model_dir = build_model(root, num_layers)
    hf_config = read_hf_config(model_dir)
    print("compression after one AdamW step (bf16 publications):", flush=True)
    by_lr = compression_by_lr(model_dir, hf_config, root, [1e-6, 1e-5, 1e-4])

    model = model_from_hf_config(model_dir)
    load_hf_weights(model, model_dir, hf_config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {num_layers} layers, {params / 1e6:.0f}M parameters; {threads} threads ({source})"
    )
    sync_dir = default_sync_dir(f"bench_delta_{os.getpid()}")
    t0 = time.perf_counter()
    workers = VLLMWorkers.start_local(
        model_dir,
        sync_dir=sync_dir,
        engine_kwargs={"dtype": "float32", "max_model_len": 512, "enforce_eager": True},
    )
    print(f"worker started in {time.perf_counter() - t0:.1f}s", flush=True)
    full, delta, version = [], [], 1
    try:
        for r in range(args.rounds):
            print(f"round {r + 1}: full publications", flush=True)
            rows, version = phase(
                workers, model, opt, hf_config, sync_dir, False, version, args.steps
            )
            full += rows
            print(f"round {r + 1}: deltas", flush=True)
            rows, version = phase(
                workers, model, opt, hf_config, sync_dir, True, version, args.steps
            )
            delta += rows
    finally:
        workers.close()
        shutil.rmtree(sync_dir, ignore_errors=True)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    full_bytes = med(full, "bytes")
    delta_kinds = {r["kind"] for r in delta}
    bytes_frac = max(r["bytes_frac"] for r in delta)
    shm_ratio = med(delta, "sync_s") / med(full, "sync_s")
    projected, hidden = {}, {}
    for bandwidth in (1, 10):
        f = 2 * full_bytes / (bandwidth * GB)
        d = 2 * med(delta, "bytes") / (bandwidth * GB) + med(delta, "encode_s")
        projected[bandwidth] = (f, d + med(delta, "rebuild_s"))
        hidden[bandwidth] = d  # one-step-off: the worker rebuilds while it generates
    print(
        f"bytes per publication: full {full_bytes / 2**20:.0f} MiB, delta at most "
        f"{100 * bytes_frac:.2f}% of it (target <= 5%)"
    )
    print(
        f"/dev/shm publish + reload + ack: full {med(full, 'sync_s'):.2f}s, delta "
        f"{med(delta, 'sync_s'):.2f}s = {shm_ratio:.2f}x (target <= 1.5x); of which the "
        f"engine's reload of the same bytes: full {med(full, 'reload_s'):.2f}s, delta "
        f"{med(delta, 'reload_s'):.2f}s"
    )
    for bandwidth, (f, d) in projected.items():
        print(
            f"projected transfer at {bandwidth} GB/s: full {f:.2f}s, delta {d:.2f}s (bytes + "
            f"encode {med(delta, 'encode_s'):.2f}s + rebuild {med(delta, 'rebuild_s'):.2f}s) = "
            f"{d / f:.3f}x"
            + (" (target <= 0.25x)" if bandwidth == 1 else "")
            + f"; rebuild hidden (one-step-off): {hidden[bandwidth] / f:.3f}x"
        )
    print(
        json.dumps(
            {
                "bench": "weight_delta",
                "layers": num_layers,
                "params_m": round(params / 1e6, 1),
                "threads": threads,
                "full_bytes": int(full_bytes),
                "delta_bytes_frac_max": round(bytes_frac, 4),
                "delta_versions_all_deltas": delta_kinds == {"delta"},
                "bytes_target_met": bytes_frac <= 0.05,
                "shm_full_s": round(med(full, "sync_s"), 3),
                "shm_delta_s": round(med(delta, "sync_s"), 3),
                "shm_delta_over_full": round(shm_ratio, 2),
                "shm_target_met": shm_ratio <= 1.5,
                "shm_full_reload_s": round(med(full, "reload_s"), 3),
                "shm_delta_reload_s": round(med(delta, "reload_s"), 3),
                "encode_s": round(med(delta, "encode_s"), 3),
                "rebuild_s": round(med(delta, "rebuild_s"), 3),
                "projected_1gbps_full_s": round(projected[1][0], 3),
                "projected_1gbps_delta_s": round(projected[1][1], 3),
                "projected_1gbps_ratio": round(projected[1][1] / projected[1][0], 3),
                "projected_10gbps_ratio": round(projected[10][1] / projected[10][0], 3),
                "projected_1gbps_ratio_rebuild_hidden": round(hidden[1] / projected[1][0], 3),
                "projected_10gbps_ratio_rebuild_hidden": round(hidden[10] / projected[10][0], 3),
                "projected_target_met": projected[1][1] / projected[1][0] <= 0.25,
                "delta_frac_by_lr": {f"{lr:g}": round(v, 4) for lr, v in by_lr.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
