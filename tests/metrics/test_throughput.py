"""Step FLOPs and MFU against the formula written out plainly; the peak table's lookup."""

from __future__ import annotations

import pytest
import torch

from simko_tune.metrics import throughput


def test_training_flops_is_the_per_row_formula():
    lengths = torch.tensor([3, 10, 1])
    n, layers, d = 1000, 2, 64
    expected = sum(6 * n * s + 12 * layers * d * s * s for s in (3, 10, 1))
    assert throughput.training_flops(lengths, n, layers, d) == expected


def test_matmul_params_leave_out_an_untied_embedding_table():
    from torchtune.models.qwen2 import qwen2

    dims = dict(vocab_size=50, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16,
                intermediate_dim=32, max_seq_len=64)  # fmt: skip
    tied = qwen2(**dims, tie_word_embeddings=True)
    untied = qwen2(**dims, tie_word_embeddings=False)
    total = sum(p.numel() for p in untied.parameters())
    assert throughput.matmul_params(untied, tied_embeddings=False) == total - 50 * 16
    assert throughput.matmul_params(tied, tied_embeddings=True) == sum(
        p.numel() for p in tied.parameters()
    )


def test_peak_is_known_for_listed_gpus_only(monkeypatch):
    assert throughput.peak_tflops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, n=name: n)
        assert throughput.peak_tflops(torch.device("cuda", 0)) == peak


def test_phase_shares():
    shares = throughput.phase_shares({"generate": 1.0, "update": 3.0}, 5.0)
    assert shares == {"time_share/generate": pytest.approx(0.2), "time_share/update": 0.6}
