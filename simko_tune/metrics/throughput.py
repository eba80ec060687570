"""Speed you can read: tokens per second, the update's model FLOPs and MFU, the share of the
step each phase takes, and the time left.

Model FLOPs count what the model must compute, not what the hardware did: per token of a
row of ``s`` tokens, forward + backward of every matmul weight is ``6·N`` and attention
scores with their weighted sum ``12·L·d·s`` (``N`` matmul parameters, ``L`` layers,
``d = heads × head_dim``), as PaLM's MFU and torchtitan count them. Activation-checkpoint
recompute is not counted (that would be hardware FLOPs), nor the loss's top-k and entropy
work. MFU is those FLOPs over the time the update took and the device's dense bf16 peak.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense bf16 peak (no sparsity), TFLOP/s, from NVIDIA's datasheets (SXM parts; PCIe and NVL
# variants have lower clocks). Matched against torch.cuda.get_device_name in order.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)
PEAK_SOURCE = "NVIDIA datasheets, dense bf16 (SXM)"


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (a CPU, or a GPU not in the table)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def matmul_params(model: nn.Module, tied_embeddings: bool) -> int:
    """Parameters that enter a matmul per token: all of them, less the embedding table when
    it is not tied (a lookup, not a product; a tied table is the output projection too).
    Sharded parameters count at their global size."""
    total = sum(p.numel() for p in model.parameters())
    if tied_embeddings:
        return total
    return total - model.tok_embeddings.weight.numel()


def training_flops(row_lengths: torch.Tensor, n_matmul: int, layers: int, attn_dim: int) -> float:
    """Model FLOPs of one forward + backward over rows of these lengths (all their tokens:
    the loss sees responses only, but every position runs through the model)."""
    s = row_lengths.double()
    return float((6.0 * n_matmul * s + 12.0 * layers * attn_dim * s * s).sum())


def phase_shares(timings: dict[str, float], step_s: float) -> dict[str, float]:
    """Each phase's share of the step (``time_share/<phase>``); overlapped phases
    (one-step-off) are the parts that were not hidden."""
    return {f"time_share/{k}": v / step_s for k, v in timings.items() if step_s > 0}
