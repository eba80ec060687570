"""HF export from the model, and the atomic directory and file writes behind every writer."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

import simko_tune.fs as fs
from simko_tune.export import export_hf
from simko_tune.fs import atomic_dir, atomic_write, replace_dir
from simko_tune.models import load_hf_model, read_hf_config


def test_atomic_dir_keeps_old_content_on_error(tmp_path):
    out = tmp_path / "d"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    assert out.stat().st_mode & 0o777 == 0o755  # readable by other users' processes
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("writer died")
    assert (out / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp folder left behind


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_directory_never_shows_nothing(tmp_path, monkeypatch, exchange):
    """A reader polling the target while it is replaced 200 times always finds a complete
    directory (rmtree-then-rename would show it missing). Where the exchange is
    unsupported, the rename-aside fallback may show it missing for one rename's gap, but
    never partial, and leaves no trash behind."""
    if not exchange:
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with atomic_dir(out, fsync=False) as tmp:
        (tmp / "v").write_text("0")
    seen: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append((out / "v").read_text())
            except FileNotFoundError:
                seen.append("missing")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, 201):
            with atomic_dir(out, fsync=False) as tmp:
                (tmp / "v").write_text(str(i))
    finally:
        stop.set()
        t.join()
    assert (out / "v").read_text() == "200"
    allowed = (lambda v: v.isdigit()) if exchange else (lambda v: v.isdigit() or v == "missing")
    assert seen and all(allowed(v) for v in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no trash, no temp


def test_replace_dir_swaps_atomically_where_supported(tmp_path):
    """On this machine (Linux, tmpfs/ext4) the exchange is available: after replace_dir the
    old content is gone and the new one is in place, under the same inode as the source."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (old / "x").write_text("old")
    new.mkdir()
    (new / "x").write_text("new")
    inode = new.stat().st_ino
    assert fs._exchange(new, old)  # swapped...
    assert (old / "x").read_text() == "new" and (new / "x").read_text() == "old"
    assert old.stat().st_ino == inode
    replace_dir(new, old)  # ...and back, through the public helper
    assert (old / "x").read_text() == "old" and not new.exists()


def test_atomic_write_replaces_files_whole(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, "one")
    atomic_write(path, b"two")
    assert path.read_text() == "two"
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_work_dir_keeps_a_given_folder_and_removes_a_temp_one(tmp_path):
    from simko_tune.paths import work_dir

    with pytest.raises(RuntimeError), work_dir(None, "bench_x_") as tmp:
        (tmp / "big").write_text("x")
        raise RuntimeError("the run failed")
    assert tmp.name.startswith("bench_x_") and not tmp.exists()  # removed all the same
    with work_dir(tmp_path / "kept" / "here", "bench_x_") as kept:
        (kept / "f").write_text("x")
    assert (tmp_path / "kept" / "here" / "f").is_file()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_export_from_the_model_indexes_every_shard(tmp_path, tiny_model_dir, dtype):
    """The export is the model's weights (in the requested dtype), split over several
    shards with a complete index, plus the base model's config and tokenizer; transformers
    loads it."""
    model = load_hf_model(tiny_model_dir)
    out = export_hf(
        model,
        tmp_path / "hf",
        read_hf_config(tiny_model_dir),
        tiny_model_dir,
        dtype=dtype,
        max_shard_bytes=20_000,
    )
    original = load_file(tiny_model_dir / "model.safetensors")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(original)
    exported = {}
    for shard in shards:
        part = load_file(shard)
        assert {index["weight_map"][k] for k in part} == {shard.name}
        exported.update(part)
    for k, v in original.items():
        assert torch.equal(exported[k], v if dtype is None else v.to(dtype)), k
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, value in hf.state_dict().items():
        if name in original:
            want = original[name] if dtype is None else original[name].to(dtype).float()
            assert torch.equal(value, want), name


def test_export_keeps_llama3_tiktoken_file(tmp_path):
    """Llama 3 releases keep the tokenizer at original/tokenizer.model, where the llama3
    configs look: an export of a Llama policy must carry it."""
    from simko_tune.demo.tiny import build_tiny_llama3

    base = tmp_path / "base"
    base.mkdir()
    (base / "tok.model").write_bytes(b"tiktoken ranks")
    model_dir = build_tiny_llama3(tmp_path / "llama", base / "tok.model", vocab_size=256)
    model = load_hf_model(model_dir)
    out = export_hf(model, tmp_path / "hf", read_hf_config(model_dir), model_dir)
    assert (out / "original" / "tokenizer.model").read_bytes() == b"tiktoken ranks"
    assert (out / "config.json").read_text() == (model_dir / "config.json").read_text()
    original = load_file(model_dir / "model.safetensors")
    exported = load_file(next(out.glob("*.safetensors")))
    assert exported.keys() == original.keys()
    for k in original:  # the Llama q/k permutation round-trips exactly
        assert torch.equal(exported[k], original[k]), k
