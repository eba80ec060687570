"""The shapes of real Qwen2.5 sizes, which the benchmarks and the GPU check build with random
weights: torchtune's ``qwen2`` builder arguments, the vocabulary and sequence length left to
each user. No imports, so that a tool can read them before torch loads."""

QWEN2_5_SHAPES: dict[str, dict[str, int]] = {
    "0.5b": dict(num_layers=24, num_heads=14, num_kv_heads=2, embed_dim=896, intermediate_dim=4864),
    "1.5b": dict(
        num_layers=28, num_heads=12, num_kv_heads=2, embed_dim=1536, intermediate_dim=8960
    ),
}
