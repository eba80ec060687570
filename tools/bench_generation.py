"""Benchmark the generation service on a Qwen2.5-0.5B-shaped model with random weights.

(a) Weight sync: ``WeightSync.publish`` (gather, rename, shard, checksum, atomic publish,
    then the worker's verify + in-place reload + acknowledgement), against the raw floor of
    writing and reading back the same number of bytes as one flat file in the same sync
    directory, in the same run. Target: within 1.5x the floor.
(a') Publication at 2 trainer ranks (FSDP2 over gloo, each rank gathering and writing its
    share) against 1 rank, and against 2 ranks with rank 0 writing everything (how it was).
(b) Generation (after the syncs, on their weights): tokens/s through one vLLM worker against :class:`NativeGenerator`
    (torchtune's model with its KV cache, in process) on the same requests (fixed length:
    ``ignore_eos``). Target: workers at least 1.5x native.

The model has 24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864 (Qwen2.5-0.5B) and a
small vocabulary (this machine's memory); ``--quick`` uses 4 layers. fp32 on CPU.
Prints figures and ends with ONE JSON line.
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
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n",
    "<|im_start|>assistant\nWe add the numbers: 12 + 30 = 42. The answer is \\boxed{42}.",
    "Let x = 3. Then 2x + 1 = 7, so the final answer is $\\frac{7}{2}$ and \\sqrt{2} < 2.",
] * 8


def build_model(root: Path, num_layers: int) -> Path:
    from simko_tune.demo.tiny import TinyQwen2Dims, build_tiny_qwen2, train_tokenizer
    from simko_tune.model_shapes import QWEN2_5_SHAPES

    tok = train_tokenizer(CORPUS, root / "tokenizer", vocab_size=512)
    shape = {**QWEN2_5_SHAPES["0.5b"], "num_layers": num_layers}
    dims = TinyQwen2Dims(**shape, max_seq_len=2048)
    return build_tiny_qwen2(tok, root / "model", dims, seed=0)


def raw_floor(sync_dir: Path, nbytes: int) -> float:
    """Write then read back ``nbytes`` as one flat file: the least any sync can cost."""
    import torch

    data = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).numpy()
    buf = bytearray(b"\x01" * nbytes)  # the reader's memory exists already (like the model's)
    path = sync_dir / "raw_floor.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(memoryview(data))
    with open(path, "rb", buffering=0) as f:
        view, got = memoryview(buf), 0
        while got < nbytes:
            got += f.readinto(view[got:])
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


def bench_sync(workers, model, sync, repeats: int) -> dict:
    """Publish ``repeats`` versions through WeightSync to the workers; the floor is measured
    between the syncs, so both see the same machine load."""
    import torch

    sync_dir = sync.sync_dir
    sync.attach(workers)
    publish_s, load_s, floors = [], [], []
    for v in range(1, repeats + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0001)  # a "training step": new values each version
        t0 = time.perf_counter()
        folder = sync.publish(model, v)
        t1 = time.perf_counter()
        publish_s.append(sync.last_timings["write_s"])
        load_s.append(t1 - t0 - sync.last_timings["write_s"])
        nbytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        floors.append(raw_floor(sync_dir, nbytes))
        print(
            f"  v{v}: publish {publish_s[-1]:.2f}s, load+ack {load_s[-1]:.2f}s "
            f"{workers.last_load_timings}; raw floor {floors[-1]:.2f}s",
            flush=True,
        )
    floor = statistics.median(floors)
    sync_s = statistics.median(p + q for p, q in zip(publish_s, load_s))
    return {
        "bytes": nbytes,
        "publish_s": statistics.median(publish_s),
        "reload_ack_s": statistics.median(load_s),
        "sync_s": sync_s,
        "raw_floor_s": floor,
        "sync_over_floor": sync_s / floor,
    }


def _publish_rank(rank: int, world: int, init: str, model_dir: str, sync: str, out: str) -> None:
    """One of ``world`` gloo ranks holding an FSDP2-sharded copy of the model: time
    publications with the writing spread over the ranks, then with rank 0 writing all."""
    import shutil

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from simko_tune.generation.weights import publish_weights
    from simko_tune.models import load_hf_model, read_hf_config
    from simko_tune.parallel import exit_without_teardown

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        model = load_hf_model(model_dir)
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        hf_config = read_hf_config(model_dir)
        times: dict[str, list[float]] = {"spread": [], "rank0": []}
        for v in range(1, 4):
            for mode, writers in (("spread", list(range(world))), ("rank0", [0])):
                dist.barrier()
                t0 = time.perf_counter()
                folder = publish_weights(model, v, sync, hf_config, writers=writers)
                dist.barrier()
                times[mode].append(time.perf_counter() - t0)
                if rank == 0:  # one publication at a time in memory (/dev/shm)
                    shutil.rmtree(folder)
        if rank == 0:
            Path(out).write_text(json.dumps({k: statistics.median(t) for k, t in times.items()}))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_without_teardown(0)  # its result is written (an exception reaches mp.spawn instead)


def bench_publish_ranks(model_dir: Path, root: Path) -> dict:
    """Publication seconds at 1 rank (the model in this process) and at 2 ranks."""
    import shutil

    import torch
    import torch.multiprocessing as mp

    from simko_tune.generation.sync_dir import default_sync_dir
    from simko_tune.generation.weights import publish_weights
    from simko_tune.models import load_hf_model, read_hf_config

    sync = default_sync_dir(f"bench_ranks_{os.getpid()}")
    model = load_hf_model(model_dir)
    one = []
    torch.set_num_threads(1)  # as each of the 2 ranks
    for v in range(1, 4):
        t0 = time.perf_counter()
        folder = publish_weights(model, v, sync, read_hf_config(model_dir))
        one.append(time.perf_counter() - t0)
        shutil.rmtree(folder)
    del model
    out = root / "publish_ranks.json"
    mp.spawn(
        _publish_rank,
        args=(2, str(root / "init"), str(model_dir), str(sync), str(out)),
        nprocs=2,
    )
    two = json.loads(out.read_text())
    shutil.rmtree(sync)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return {
        "publish_1rank_s": statistics.median(one),
        "publish_2ranks_s": two["spread"],
        "publish_2ranks_rank0_writes_s": two["rank0"],
    }


def bench_generate(gen, prompts, n: int, sampling) -> tuple[float, int]:
    gen.generate(prompts[:2], 1, sampling)  # warm-up
    t0 = time.perf_counter()
    out = gen.generate(prompts, n, sampling)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for row in out for c in row)
    return tokens / elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 24")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="weight syncs to time")
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_generation_") as root:
        bench(args, Path(root))


def bench(args: argparse.Namespace, root: Path) -> None:
    """The publication, weight-sync and generation figures; ``root`` holds the model."""
    import torch

    from simko_tune.generation import NativeGenerator, SamplingConfig, VLLMWorkers, WeightSync
    from simko_tune.generation.sync_dir import default_sync_dir
    from simko_tune.models import load_hf_weights, model_from_hf_config, read_hf_config
    from simko_tune.paths import cache_dir

    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    num_layers = 4 if args.quick else 24
    model_dir = build_model(root, num_layers)
    hf_config = read_hf_config(model_dir)
    ranks = bench_publish_ranks(model_dir, root)  # before this process holds a copy too
    trainer = model_from_hf_config(model_dir)
    load_hf_weights(trainer, model_dir, hf_config)
    params = sum(p.numel() for p in trainer.parameters())
    print(f"model: {num_layers} layers, {params / 1e6:.0f}M parameters, fp32, {threads} cores")

    g = torch.Generator().manual_seed(0)
    vocab = hf_config["vocab_size"] - 30  # ordinary tokens only
    prompts = [
        torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
        for _ in range(args.prompts)
    ]
    sampling = SamplingConfig(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=0)

    rank_ratio = ranks["publish_2ranks_s"] / ranks["publish_1rank_s"]
    print(
        f"publication: 1 rank {ranks['publish_1rank_s']:.2f}s, 2 ranks (each writes its share) "
        f"{ranks['publish_2ranks_s']:.2f}s = {rank_ratio:.2f}x, 2 ranks with rank 0 writing "
        f"all {ranks['publish_2ranks_rank0_writes_s']:.2f}s",
        flush=True,
    )

    weight_sync = WeightSync(
        default_sync_dir(f"bench_{os.getpid()}"),
        hf_config,
        dtype=torch.float32,
        remove_on_close=True,
    )
    t0 = time.perf_counter()
    workers = VLLMWorkers.start_local(
        model_dir,
        sync_dir=weight_sync.sync_dir,
        engine_kwargs={"dtype": "float32", "max_model_len": 2048, "enforce_eager": args.eager},
    )
    print(f"worker started in {time.perf_counter() - t0:.1f}s (sync dir {workers.sync_dir})")
    try:
        sync = bench_sync(workers, trainer, weight_sync, args.repeats)
        print(
            f"weight sync: {sync['bytes'] / 2**20:.0f} MiB, publish {sync['publish_s']:.2f}s + "
            f"reload/ack {sync['reload_ack_s']:.2f}s = {sync['sync_s']:.2f}s; raw write+read "
            f"floor {sync['raw_floor_s']:.2f}s -> {sync['sync_over_floor']:.2f}x "
            "(target <= 1.5x)",
            flush=True,
        )
        vllm_tps, tokens = bench_generate(workers, prompts, args.n, sampling)
        print(f"generation: vLLM worker {vllm_tps:.0f} tokens/s ({tokens} tokens)")
    finally:
        workers.close()
        weight_sync.close()

    native = NativeGenerator(model_dir, max_batch_size=args.prompts * args.n)
    native_tps, _ = bench_generate(native, prompts, args.n, sampling)
    ratio = vllm_tps / native_tps
    print(
        f"generation: native {native_tps:.0f} tokens/s -> vLLM/native {ratio:.2f}x (target >= 1.5x)"
    )

    print(
        json.dumps(
            {
                "bench": "generation",
                "quick": args.quick,
                "layers": num_layers,
                "params_m": round(params / 1e6, 1),
                "sync_bytes": sync["bytes"],
                "publish_s": round(sync["publish_s"], 3),
                "reload_ack_s": round(sync["reload_ack_s"], 3),
                "sync_s": round(sync["sync_s"], 3),
                "raw_floor_s": round(sync["raw_floor_s"], 3),
                "sync_over_floor": round(sync["sync_over_floor"], 2),
                "sync_target_met": sync["sync_over_floor"] <= 1.5,
                "publish_1rank_s": round(ranks["publish_1rank_s"], 3),
                "publish_2ranks_s": round(ranks["publish_2ranks_s"], 3),
                "publish_2ranks_rank0_writes_s": round(ranks["publish_2ranks_rank0_writes_s"], 3),
                "publish_2ranks_over_1rank": round(rank_ratio, 2),
                "vllm_tokens_per_s": round(vllm_tps, 1),
                "native_tokens_per_s": round(native_tps, 1),
                "vllm_over_native": round(ratio, 2),
                "generation_target_met": ratio >= 1.5,
            }
        )
    )


if __name__ == "__main__":
    main()
