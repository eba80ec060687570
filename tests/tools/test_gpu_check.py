"""tools/gpu_check.sh and tools/gpu_check.py rehearsed on the CPU, so that the run on the GPU
machine works the first time: argument parsing, the wheel install, the carried wheel set, and
every part through its own code path with small shapes and ``--device cpu``.

The end-to-end parts run with ``gpu_machine_site`` first on PYTHONPATH: every package that is
installed here but neither in the GPU machine's image nor among the carried wheels is hidden,
in the check and in its torchrun ranks."""

from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from harness import child_env, load_module, output_tail, run_process

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.py"
SHELL = ROOT / "tools" / "gpu_check.sh"
GPU_SITE = Path(__file__).resolve().parent / "gpu_machine_site"


@pytest.fixture(scope="module")
def gpu_check():
    return load_module(SCRIPT)


def _env(gpu_machine: bool = True) -> dict[str, str]:
    """The child environment, with the GPU machine's image first on PYTHONPATH."""
    paths = [str(GPU_SITE)] if gpu_machine else []
    pythonpath = os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)
    return child_env(PYTHONPATH=pythonpath)


def _check(*args: str, timeout: int = 900, cmd=None, env=None) -> tuple[dict, str]:
    proc = run_process(
        cmd or [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env or _env(), timeout_s=timeout
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, output_tail(proc)
    return json.loads(lines[-1]), proc.stderr


# ---------------------------------------------------------------------------- arguments
def test_defaults_fit_the_eight_minute_budget(gpu_check):
    args = gpu_check.parse_args([])
    assert args.parts == ["a", "b", "c", "d"] and args.device == "cuda"
    limits = args.timeout_a + args.timeout_b + args.timeout_c + args.timeout_d
    assert limits <= args.budget_s <= 8 * 60 - 20
    assert args.d_steps >= 40 and args.d_expect_learning  # the "40 or more" steps
    assert (args.c_tokens, args.c_vocab) == (16_384, 151_936)
    assert args.b_model == "1.5b" and args.peak_tflops == 989.0
    assert gpu_check.parse_args(["--parts", "c, a", "--device", "cpu"]).parts == ["c", "a"]
    # the shell script's backstop leaves the budget room, and the install room under 8 min
    backstop = int(re.search(r"timeout --kill-after 10 (\d+) python3", SHELL.read_text())[1])
    assert args.budget_s < backstop <= 8 * 60 - 30


@pytest.mark.parametrize(
    "argv", [["--parts", "a,e"], ["--parts", ""], ["--device", "tpu"], ["--b-model", "70b"]]
)
def test_bad_arguments_exit_with_usage(gpu_check, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


# ---------------------------------------------------------------------------- pieces
def test_materialize_puts_rope_caches_on_the_target_device(gpu_check):
    """The recipe's bug, fixed here: ``rope_init`` after ``to_empty`` without a device
    context left the caches on the CPU. ``meta`` stands in for CUDA (not the default)."""
    from torchtune.models.qwen2 import qwen2

    with torch.device("meta"):
        model = qwen2(**gpu_check.MODEL_SHAPES["tiny"])
    gpu_check.materialize(model, "meta")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert any("pos_embeddings.cache" in n for n in tensors)
    wrong = {n: t.device for n, t in tensors.items() if t.device.type != "meta"}
    assert not wrong, wrong


def test_materialize_random_weights_on_cpu(gpu_check):
    from torchtune.models.qwen2 import qwen2

    with torch.device("meta"):
        model = qwen2(**gpu_check.MODEL_SHAPES["tiny"])
    gpu_check.materialize(model, "cpu")
    params = dict(model.named_parameters())
    assert torch.equal(params["norm.scale"], torch.ones(64))
    assert torch.equal(params["layers.0.attn.q_proj.bias"], torch.zeros(64))
    assert 0.015 < float(params["tok_embeddings.weight"].detach().std()) < 0.025
    pos = model.layers[0].attn.pos_embeddings
    assert torch.isfinite(pos.cache).all() and pos.cache.shape[0] == 512


def test_resolve_device_gives_cuda_an_index(gpu_check):
    """``torch.cuda.set_device(torch.device("cuda"))`` raises: the check's default device
    must reach it with an index."""
    from torch._utils import _get_device_index

    assert gpu_check.resolve_device("cuda") == torch.device("cuda", 0)
    assert gpu_check.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert gpu_check.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="specified index"):
        _get_device_index(torch.device("cuda"))  # what set_device does with a bare "cuda"
    assert _get_device_index(gpu_check.resolve_device("cuda")) == 0


def test_flops_per_token_formula(gpu_check):
    shape = gpu_check.MODEL_SHAPES["1.5b"]
    n = 1_543_714_304  # Qwen2.5-1.5B, tied embeddings
    assert gpu_check.flops_per_token(shape, n, 4096) == 6 * n + 12 * 28 * 1536 * 4096


def test_curve_comparison_against_plain_arithmetic(gpu_check):
    """Window means of 8 steps in 4 windows of 2; the CPU seeds' mean and sample std per
    window; the gap is |device - mean|."""
    device = [0.1, 0.3, 0.2, 0.2, 0.4, 0.4, 0.5, 0.7]
    cpu = [[0.2, 0.2, 0.2, 0.2, 0.3, 0.3, 0.6, 0.6], [0.0, 0.0, 0.4, 0.4, 0.5, 0.5, 0.4, 0.4]]
    out = gpu_check.compare_curves(device, cpu, windows=4)
    assert out["device_window_means"] == [0.2, 0.2, 0.4, 0.6]
    assert out["cpu_window_means"] == [0.1, 0.3, 0.4, 0.5]
    assert out["cpu_window_std"] == [round(0.2 / 2**0.5, 4)] * 2 + [round(0.2 / 2**0.5, 4)] * 2
    assert out["gap"] == [0.1, 0.1, 0.0, 0.1]
    assert out["gap_over_cpu_std"] == [0.71, 0.71, 0.0, 0.71]
    assert out["within_2_cpu_std"] is True
    far = gpu_check.compare_curves([1.0] * 8, cpu, windows=4)
    assert far["within_2_cpu_std"] is False


def test_part_b_memory_plan_is_dry_runs_arithmetic(gpu_check):
    """Part (b) reports dry_run's estimate beside the measured peak: for one rank, bf16
    FSDP2, AC and 2 rows of 64 tokens (one loss chunk of 128 tokens)."""
    from torchtune.models.qwen2 import qwen2

    with torch.device("meta"):
        model = qwen2(**gpu_check.MODEL_SHAPES["tiny"])
    args = gpu_check.parse_args(["--b-model", "tiny", "--b-batch", "2", "--b-seq", "64"])
    plan = gpu_check.planned_memory(model, args, torch.device("cpu"))
    n = sum(p.numel() for p in model.parameters())
    assert (plan.parameters, plan.gradients, plan.optimizer_state) == (4 * n, 4 * n, 8 * n)
    assert plan.loss_chunk == 2 * 128 * 512 * 4 + 512 * 64 * 4
    assert plan.activation_checkpointing and plan.device_memory is None


# ---------------------------------------------------------------------------- the wheels
def _wheels_in_shell_script() -> list[str]:
    text = SHELL.read_text()
    block = re.search(r"WHEELS=\(\n(.*?)\n\)", text, re.S).group(1)
    return block.split()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_carried_wheels_are_named_alike_everywhere():
    """The script's WHEELS, its header's download command and the GPU-machine stand-in
    list the same packages."""
    wheels = _wheels_in_shell_script()
    header = " ".join(
        ln.lstrip("#").strip().rstrip("\\") for ln in SHELL.read_text().splitlines()[:25]
    )
    for spec in wheels:
        assert spec in header, spec
    site = (GPU_SITE / "sitecustomize.py").read_text()
    carried = re.search(r'CARRIED = """(.*?)"""', site, re.S).group(1).split()
    assert {_norm(s.split("==")[0]) for s in wheels} == {_norm(c) for c in carried} - {"simko-tune"}


def _tiny_wheel(folder: Path) -> Path:
    """A minimal valid wheel holding one module, ``gpu_check_probe``."""
    folder.mkdir(parents=True)
    path = folder / "gpu_check_probe-0.1-py3-none-any.whl"
    info = "gpu_check_probe-0.1.dist-info"
    files = {
        "gpu_check_probe/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@pytest.mark.slow
def test_shell_script_installs_wheels_then_runs_a_part(tmp_path):
    """gpu_check.sh as the GPU machine runs it: wheels from a folder into a target site on
    PYTHONPATH, then the check; its last line is the JSON."""
    _tiny_wheel(tmp_path / "whl")
    site = tmp_path / "site"
    env = _env(gpu_machine=False)
    env.update(GPU_CHECK_WHEELS=str(tmp_path / "whl"), GPU_CHECK_SITE=str(site))
    probe = "import gpu_check_probe, sys; sys.exit(0 if gpu_check_probe.VALUE == 42 else 1)"
    report, stderr = _check(
        cmd=["bash", str(SHELL), "--parts", "c", "--device", "cpu", "--no-compile",
             "--out-dir", str(tmp_path / "out"), "--c-tokens", "256", "--c-vocab", "512",
             "--c-dim", "32", "--c-chunk", "128", "--c-repeats", "1"],
        env=env,
    )  # fmt: skip
    assert (site / "gpu_check_probe" / "__init__.py").is_file()
    assert report["parts"]["c"]["ok"], report
    assert report["env"]["datasets_stub"] is False
    assert "imports failed" not in stderr
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    run_process([sys.executable, "-c", probe], env=env, timeout_s=300)


def _cp312_manylinux_tags():
    from packaging import tags

    platforms = [f"manylinux_2_{n}_x86_64" for n in range(17, 40)]
    platforms += ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    return set(tags.cpython_tags((3, 12), ["cp312", "abi3", "none"], platforms)) | set(
        tags.compatible_tags((3, 12), "cp312", platforms)
    )


def test_downloaded_wheels_fit_the_gpu_machine_and_import(tmp_path):
    """With the real wheels in .whl/ (`bash tools/gpu_check.sh --download`): one of each
    package the script names, each installable on CPython 3.12 manylinux x86_64, and the
    ones this interpreter can install import from the target folder with only the GPU
    machine's packages beside them."""
    from packaging.utils import parse_wheel_filename

    found = sorted((ROOT / ".whl").glob("*.whl"))
    if not found:
        pytest.skip(".whl/ is empty: run `bash tools/gpu_check.sh --download` (needs network)")
    wanted = {_norm(s.split("==")[0]): s.split("==")[1] for s in _wheels_in_shell_script()}
    parsed = {_norm(str(parse_wheel_filename(w.name)[0])): w for w in found}
    assert len(parsed) == len(found), "two versions of one package stop the whole install"
    assert set(parsed) == set(wanted)
    cp312 = _cp312_manylinux_tags()
    here = set(__import__("packaging.tags").tags.sys_tags())
    installable_here = []
    for name, wheel in parsed.items():
        _, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        assert str(version) == wanted[name], wheel.name
        assert wheel_tags & cp312, f"{wheel.name} does not install on CPython 3.12"
        if wheel_tags & here:
            installable_here.append(str(wheel))
    site = tmp_path / "site"
    run_process(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--no-cache-dir", "--target", str(site), *installable_here],
        timeout_s=600,
    )  # fmt: skip
    code = (
        "import torchtune, omegaconf, datasets, math_verify, antlr4, simko_tune.generation\n"
        "from torchtune.models.qwen2 import qwen2\n"
        "import sys\n"
        f"assert torchtune.__file__.startswith({str(site)!r}), torchtune.__file__\n"
        f"assert datasets.__file__.startswith({str(site)!r}), datasets.__file__\n"
    )
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(GPU_SITE), str(site), str(ROOT), env["PYTHONPATH"]])
    run_process([sys.executable, "-c", code], env=env, timeout_s=300)


# ---------------------------------------------------------------------------- the parts
@pytest.mark.slow
def test_part_a_runs_the_recipe_on_cpu(tmp_path):
    """(a) through its GPU code path: torchrun, bf16 FSDP2, compiled blocks and loss,
    activation checkpointing, native generator, 3 steps, one checkpoint."""
    report, _ = _check(
        "--parts", "a", "--device", "cpu", "--out-dir", str(tmp_path), "--a-width", "64",
        "--timeout-a", "1500", "--budget-s", "1600", timeout=1700,
    )  # fmt: skip
    a = report["parts"]["a"]
    assert a["ok"], a.get("error")
    assert a["steps"] == 3 and len(a["step_s"]) == 3 and all(t > 0 for t in a["step_s"])
    assert a["checkpoint"] == "step_00000003"
    assert (tmp_path / "part_a" / "run" / "checkpoints" / "step_00000003" / "hf").is_dir()
    assert "compiled" in a["settings"] and "compile off" not in a["settings"]
    assert report["ok"] is True and report["env"]["device"] == "cpu"


@pytest.mark.slow
def test_parts_b_and_c_with_tiny_shapes_on_cpu(tmp_path):
    report, _ = _check(
        "--parts", "b,c", "--device", "cpu", "--out-dir", str(tmp_path), "--no-compile",
        "--b-model", "tiny", "--b-batch", "2", "--b-seq", "64", "--b-warmup", "1",
        "--b-steps", "2", "--c-tokens", "512", "--c-vocab", "1024", "--c-dim", "32",
        "--c-chunk", "256", "--c-repeats", "1",
    )  # fmt: skip
    b, c = report["parts"]["b"], report["parts"]["c"]
    assert b["ok"] and c["ok"], report
    assert b["tokens_per_step"] == 128
    assert b["flops_per_token"] == 6 * b["matmul_params"] + 12 * 2 * 64 * 64
    assert b["tokens_per_s"] == pytest.approx(128 / b["step_s"], rel=1e-3)
    assert b["mfu"] == pytest.approx(
        b["flops_per_token"] * b["tokens_per_s"] / 989e12, rel=1e-2, abs=1e-4
    )
    assert "6*N + 12*L*d*s" in b["flops_formula"]
    assert b["matmul_params"] == b["params"]  # tied: the table counts once
    assert b["memory_plan_gib"] > 0 and "peak_over_plan" not in b  # measured on CUDA only
    assert c["tokens"] == 512 and c["full_logits"]["time_s"] > 0
    assert c["time_chunked_over_full"] == pytest.approx(
        c["chunked"]["time_s"] / c["full_logits"]["time_s"], rel=1e-2
    )
    assert c["peak_chunked_over_full"] is None  # peak memory is measured on CUDA only


@pytest.mark.slow
def test_part_d_runs_the_device_and_cpu_runs_side_by_side(tmp_path):
    """(d) through its code path on the CPU: a (few-step) warm-started policy carried in as
    the GPU machine gets it, the "device" run and two CPU seeds at once, each with held-out
    pass@1 before and after, compared window by window. Few steps cannot show learning, so
    the rehearsal does not require it; the real run does (the default)."""
    from simko_tune.demo.warm_start import WarmStartConfig, build_tiny_policy

    policy = build_tiny_policy(
        tmp_path / "policy",
        WarmStartConfig(max_steps=40, target_success=None, sft_problems=200, eval_problems=8),
    )
    report, _ = _check(
        "--parts", "d", "--device", "cpu", "--out-dir", str(tmp_path / "out"),
        "--d-model-dir", str(policy), "--d-steps", "4", "--d-prompts", "4",
        "--d-eval-problems", "8", "--d-eval-n", "2", "--d-cpu-seeds", "2",
        "--d-cpu-threads", "1", "--no-d-expect-learning", "--timeout-d", "1500",
        "--budget-s", "1600", timeout=1700,
    )  # fmt: skip
    d = report["parts"]["d"]
    assert d["ok"], d.get("error")
    assert d["steps"] == 4 and len(d["reward"]) == 4 and "(carried)" in d["policy"]
    assert 0 <= d["pass1_before"] <= 1 and 0 <= d["pass1_after"] <= 1
    assert len(d["cpu_pass1_after"]) == 2
    assert len(d["vs_cpu"]["gap"]) == 4 and isinstance(d["vs_cpu"]["within_2_cpu_std"], bool)
    for run in ("device", "cpu_seed0", "cpu_seed1"):
        assert (tmp_path / "out" / "part_d" / run / "tb").is_dir(), run


@pytest.mark.slow
def test_a_failing_part_is_recorded_and_the_next_still_runs(tmp_path):
    report, stderr = _check(
        "--parts", "c,b", "--device", "cpu", "--out-dir", str(tmp_path), "--no-compile",
        "--c-tokens", "300", "--b-model", "tiny", "--b-batch", "1", "--b-seq", "32",
        "--b-warmup", "0", "--b-steps", "1",
    )  # fmt: skip
    c, b = report["parts"]["c"], report["parts"]["b"]
    assert not c["ok"] and "multiple of 256" in c["error"]
    assert b["ok"], b
    assert report["ok"] is False and "part c FAILED" in stderr
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == report


@pytest.mark.slow
def test_a_part_past_its_time_limit_is_killed(tmp_path):
    report, _ = _check(
        "--parts", "b", "--device", "cpu", "--out-dir", str(tmp_path), "--timeout-b", "2",
        timeout=120,
    )  # fmt: skip
    b = report["parts"]["b"]
    assert not b["ok"] and b["error"].startswith("timed out after 2 s")
    assert b["wall_s"] < 30
