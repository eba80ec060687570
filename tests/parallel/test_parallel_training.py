"""FSDP2, TP and the 2-D mesh give the same training step as one process.

Each parallel run is real torchrun ranks (gloo) executing ``train_worker.py``; the reference
is the same step on the plain, unparallelized model in this process. Gradients are compared
as well as AdamW-updated weights: Adam's update hardly depends on the gradient's scale, so a
wrong dp averaging would hide in the weights alone.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from harness import load_module, run_torchrun

from simko_tune.parallel import (
    ParallelDims,
    all_gather_object,
    all_reduce_sum,
    get_tp_plan,
    hostnames,
    parallelize_model,
    unshard,
)

WORKER = Path(__file__).with_name("train_worker.py")
TIMEOUT_S = 150


def _load_worker():
    return load_module(WORKER)


_WORKER = _load_worker()
ADAM_LR, ADAM_EPS, ADAM_WEIGHT_DECAY = _WORKER.ADAM_LR, _WORKER.ADAM_EPS, _WORKER.ADAM_WEIGHT_DECAY


def train_ranks(nproc: int, worker_args: list[str], out: Path, nnodes: int = 1) -> dict:
    """The step on ``nproc`` torchrun ranks per node; what rank 0 saved to ``out``."""
    run_torchrun(
        nproc, WORKER, [*worker_args, "--out", str(out)], nnodes=nnodes, timeout_s=TIMEOUT_S
    )
    return torch.load(out)


# Gradients: the parallel runs sum the same float32 terms in another order (TP splits the
# matmuls' inner sums, FSDP2 adds the ranks' partial gradients): differences of a few ulps of
# the summands, measured up to 2.8e-8 absolute, well inside these.
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-7


def adam_first_step_tolerance(grad_ref: torch.Tensor, param_ref: torch.Tensor) -> torch.Tensor:
    """How far apart two parameters may be after AdamW's first step when their gradients
    agree only to within the gradient tolerance.

    The first step moves p by u(g) = lr·g / (|g| + eps) (bias-corrected m̂ = g, √v̂ = |g|),
    whose slope |u'(g)| = lr·eps / (|g| + eps)² is largest, lr/eps = 100 here, for g → 0:
    a 2.8e-8 reduction-order difference in a near-zero gradient becomes 2.8e-6 in the
    parameter. The bound is that slope, taken at the smallest |g| within tolerance of the
    reference, times the gradient tolerance, plus a few float32 ulps for rounding p and u
    (weight decay scales both runs' p identically).
    """
    grad_tol = GRAD_ATOL + GRAD_RTOL * grad_ref.abs()
    nearest = (grad_ref.abs() - grad_tol).clamp_min(0.0)
    slope = ADAM_LR * ADAM_EPS / (nearest + ADAM_EPS) ** 2
    rounding = 4 * torch.finfo(torch.float32).eps * (param_ref.abs() + ADAM_LR)
    return slope * grad_tol + rounding


def assert_same_step(got: dict, ref: dict) -> None:
    """Loss and gradients tightly; parameters within what Adam's amplification implies."""
    assert got["guard_raised"] and not ref["guard_raised"]
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
    assert got["grads"].keys() == ref["grads"].keys()
    for name in ref["grads"]:
        torch.testing.assert_close(
            got["grads"][name], ref["grads"][name], rtol=GRAD_RTOL, atol=GRAD_ATOL,
            msg=f"grad {name}",
        )  # fmt: skip
        tol = adam_first_step_tolerance(ref["grads"][name], ref["params"][name])
        excess = (got["params"][name] - ref["params"][name]).abs() - tol
        assert got["params"][name].shape == ref["params"][name].shape, name
        assert excess.max() <= 0, (
            f"param {name}: {int((excess > 0).sum())} elements beyond the Adam-derived "
            f"tolerance, worst by {excess.max():.3g}"
        )


def test_tolerances_catch_a_wrong_reduction_and_a_dropped_shard():
    """The tolerances above pass reduction-order noise and still fail real bugs: gradients
    averaged instead of summed over two ranks, and one rank's shard of a parameter left
    un-updated. A real AdamW step on synthetic data, gradients spanning 0 to 1e-1."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, 32, generator=gen) * 0.05
    grad = torch.randn(64, 32, generator=gen) * torch.logspace(-9, -1, 32)

    def step(g: torch.Tensor) -> dict:
        p = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([p], lr=ADAM_LR, eps=ADAM_EPS, weight_decay=ADAM_WEIGHT_DECAY)
        p.grad = g.clone()
        opt.step()
        return {"w": p.detach().clone()}

    def result(g: torch.Tensor, params: dict | None = None, guard: bool = True) -> dict:
        return {"loss": torch.tensor(1.0), "grads": {"w": g}, "params": params or step(g),
                "guard_raised": guard}  # fmt: skip

    ref = result(grad, guard=False)
    noise = (torch.rand(grad.shape, generator=gen) - 0.5) * 6e-8  # reduction-order noise
    assert_same_step(result(grad + noise), ref)
    with pytest.raises(AssertionError, match="grad w"):  # averaged over 2 ranks, not summed
        assert_same_step(result(grad / 2), ref)
    dropped = step(grad)["w"]
    dropped[32:] = p0[32:]  # rank 1's half of the rows never stepped
    with pytest.raises(AssertionError, match="param w"):
        assert_same_step(result(grad, {"w": dropped}), ref)


@pytest.fixture(scope="module")
def qwen2_spec(tiny_model_dir) -> str:
    return f"qwen2:{tiny_model_dir}"


@pytest.fixture(scope="module")
def qwen2_reference(qwen2_spec) -> dict:
    return _WORKER.train_step(qwen2_spec, "qwen2")


@pytest.fixture(scope="module")
def llama3_reference() -> dict:
    return _WORKER.train_step("llama3", "llama3")


def test_reference_step_moves_every_parameter(qwen2_reference):
    """Guards the comparisons below: a step that left weights alone would match anything."""
    moved = {n for n, g in qwen2_reference["grads"].items() if g.abs().max() > 0}
    assert moved == set(qwen2_reference["grads"])


@pytest.mark.slow
def test_fsdp2_two_ranks_matches_one_process(qwen2_spec, qwen2_reference, tmp_path):
    got = train_ranks(2, ["--model", qwen2_spec, "--family", "qwen2"], tmp_path / "r.pt")
    assert_same_step(got, qwen2_reference)
    # the recipe reshards the forward-only KL reference: without it the root stays gathered
    assert got["root_kept_after_forward_only"] and got["root_freed_by_reshard"]
    assert got["gathered"] == [{"rank": 0}, {"rank": 1}]  # every rank's object, in rank order
    assert got["hostnames"] == [socket.gethostname()] * 2


@pytest.mark.slow
def test_fsdp2_deferred_gradient_sync_matches_one_process(qwen2_spec, qwen2_reference, tmp_path):
    """Micro-batches with the gradient sync on the last only (ppo.defer_grad_sync): the same
    step, with the gathered parameters kept between micro-batches and resharded at the end."""
    args = ["--model", qwen2_spec, "--family", "qwen2", "--micro-batches", "2"]
    got = train_ranks(2, args, tmp_path / "r.pt")
    assert_same_step(got, qwen2_reference)
    assert got["held_between_micro_batches"] == [True]
    assert got["sharded_after_last"]


@pytest.mark.slow
def test_tp2_qwen2_matches_one_process(qwen2_spec, qwen2_reference, tmp_path):
    args = ["--model", qwen2_spec, "--family", "qwen2", "--tp", "2"]
    assert_same_step(train_ranks(2, args, tmp_path / "r.pt"), qwen2_reference)


@pytest.mark.slow
def test_2d_mesh_qwen2_with_activation_checkpointing(qwen2_spec, qwen2_reference, tmp_path):
    args = ["--model", qwen2_spec, "--family", "qwen2", "--dp", "2", "--tp", "2", "--ac"]
    assert_same_step(train_ranks(4, args, tmp_path / "r.pt"), qwen2_reference)


@pytest.mark.slow
def test_tp2_llama3_untied_with_compile_and_ac(llama3_reference, tmp_path):
    """Compiled blocks under TP: the embedding must still get its gradient."""
    args = ["--model", "llama3", "--family", "llama3", "--tp", "2", "--compile", "--ac"]
    assert_same_step(train_ranks(2, args, tmp_path / "r.pt"), llama3_reference)


@pytest.mark.slow
def test_2d_mesh_llama3(llama3_reference, tmp_path):
    args = ["--model", "llama3", "--family", "llama3", "--dp", "2", "--tp", "2"]
    assert_same_step(train_ranks(4, args, tmp_path / "r.pt"), llama3_reference)


@pytest.mark.slow
def test_bf16_mixed_precision_keeps_fp32_gradients_and_weights(
    qwen2_spec, qwen2_reference, tmp_path
):
    """bf16 forward/backward with fp32 reduction and master weights: gradients arrive in fp32
    and agree with the fp32 reference to bf16 accuracy."""
    args = ["--model", qwen2_spec, "--family", "qwen2", "--mixed-precision", "bf16"]
    got = train_ranks(2, args, tmp_path / "r.pt")
    torch.testing.assert_close(got["loss"], qwen2_reference["loss"], rtol=1e-3, atol=0)
    for name, ref in qwen2_reference["grads"].items():
        assert got["grads"][name].dtype == got["params"][name].dtype == torch.float32
        rel = (got["grads"][name] - ref).norm() / ref.norm()
        assert rel < 0.05, f"grad {name}: relative error {rel:.3g}"


@pytest.mark.slow
def test_two_node_launch_matches_one_process(qwen2_spec, qwen2_reference, tmp_path):
    """Two torchrun agents (one rank each) rendezvous over c10d like two machines would."""
    got = train_ranks(1, ["--model", qwen2_spec, "--family", "qwen2"], tmp_path / "r.pt", nnodes=2)
    assert_same_step(got, qwen2_reference)


def test_parallel_dims_resolve_and_errors():
    assert ParallelDims().resolve(4) == (4, 1)
    assert ParallelDims(tp=2).resolve(4) == (2, 2)
    assert ParallelDims(dp_shard=2, tp=2).resolve(4) == (2, 2)
    with pytest.raises(ValueError, match=r"parallel\.dp_shard \(3\) × parallel\.tp \(2\)"):
        ParallelDims(dp_shard=3, tp=2).resolve(4)
    with pytest.raises(ValueError, match=r"parallel\.tp \(3\) must divide"):
        ParallelDims(tp=3).resolve(4)
    with pytest.raises(ValueError, match=r"parallel\.tp must be >= 1"):
        ParallelDims(tp=0).resolve(4)


def test_single_process_has_no_mesh_and_plain_sums():
    assert ParallelDims().build_mesh("cpu") is None
    with pytest.raises(ValueError, match="world size"):
        ParallelDims(tp=2).build_mesh("cpu")
    x = torch.tensor([1.0, 2.0])
    total = all_reduce_sum(x)
    assert torch.equal(total, x) and total is not x
    assert all_reduce_sum(3).item() == 3
    assert all_gather_object({"a": 1}) == [{"a": 1}]
    assert hostnames() == [socket.gethostname()]
    assert unshard(x) is x


def test_tp_plans():
    qwen2 = get_tp_plan("qwen2")
    assert "output" in qwen2 and "layers.*.attn.q_proj" in qwen2
    assert "output" not in get_tp_plan("llama3", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="'gpt2' has no tensor-parallel plan"):
        get_tp_plan("gpt2")


def test_mixed_precision_without_mesh_is_refused():
    from torchtune.models.qwen2 import qwen2

    model = qwen2(
        vocab_size=32, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16,
        intermediate_dim=32, max_seq_len=16,
    )  # fmt: skip
    kwargs = {"model_family": "qwen2", "activation_checkpointing": False, "compile_blocks": False}
    with pytest.raises(ValueError, match="launch with torchrun"):
        parallelize_model(model, None, mixed_precision="bf16", **kwargs)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        parallelize_model(model, None, mixed_precision="fp16", **kwargs)
