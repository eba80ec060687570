"""simko_tune.fs's Manifest reader: a manifest is read, not trusted. A name that leaves its
folder (absolute, ``..``, a symlink out) is refused before any listed file is touched, so a
forged checkpoint marker cannot make the resume read (or hang on) a file elsewhere."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from simko_tune.checkpoint import MARKER, CheckpointManager, incomplete_reason
from simko_tune.fs import CHECKSUM, Manifest, ManifestError, checksum_file


def _folder(tmp_path: Path) -> tuple[Path, Path]:
    """A published folder with one file at the top and one in a subfolder, and a file
    outside it (a forged manifest's aim)."""
    folder = tmp_path / "step_00000001"
    (folder / "dcp").mkdir(parents=True)
    (folder / "extra.pt").write_bytes(b"extra")
    (folder / "dcp" / "__0_0.distcp").write_bytes(b"shard")
    outside = tmp_path / "secret"
    outside.write_bytes(b"not the checkpoint's")
    return folder, outside


def _write(folder: Path, names: list[str], marker: str = MARKER) -> Path:
    """A manifest listing ``names`` with sizes and checksums of whatever they point at (a
    forger knows them), so only the name check can refuse it."""
    files = {}
    for name in names:
        path = folder / name
        ok = "\0" not in name and name and path.is_file()
        files[name] = (
            {"bytes": path.stat().st_size, CHECKSUM: checksum_file(path)}
            if ok
            else {"bytes": 0, CHECKSUM: "0"}
        )
    manifest = folder / marker
    manifest.write_text(json.dumps({"step": 1, "checksum": CHECKSUM, "files": files}))
    return manifest


def test_nested_names_inside_the_folder_are_read(tmp_path):
    folder, _ = _folder(tmp_path)
    manifest = Manifest.read(_write(folder, ["extra.pt", "dcp/__0_0.distcp"]))
    assert sorted(manifest.files) == ["dcp/__0_0.distcp", "extra.pt"]
    assert manifest.size_problems(folder) == []


@pytest.mark.parametrize(
    "forge",
    [
        "absolute",
        "dotdot",
        "dotdot_inside",
        "empty",
        "nul",
        "dot",
        "empty_part",
        "symlinked_file",
        "symlinked_subfolder",
    ],
)
def test_a_name_that_leaves_the_folder_is_refused(tmp_path, forge):
    folder, outside = _folder(tmp_path)
    if forge == "symlinked_file":
        (folder / "link.pt").symlink_to(outside)
    if forge == "symlinked_subfolder":
        (folder / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    name = {
        "absolute": str(outside),
        "dotdot": "../secret",
        "dotdot_inside": "dcp/../../secret",
        "empty": "",
        "nul": "extra.pt\0",
        "dot": ".",
        "empty_part": "dcp//__0_0.distcp",
        "symlinked_file": "link.pt",
        "symlinked_subfolder": "elsewhere/secret",
    }[forge]
    path = _write(folder, ["extra.pt", name])
    with pytest.raises(ManifestError) as e:
        Manifest.read(path)
    assert str(path) in str(e.value) and repr(name) in str(e.value)


@pytest.mark.parametrize("name", ["dcp/__0_0.distcp", "..", "a\\b"])
def test_plain_names_have_no_folder_part(tmp_path, name):
    """A publication's manifest names files of one folder: ``plain=True`` refuses any path."""
    folder, _ = _folder(tmp_path)
    path = _write(folder, ["extra.pt", name])
    with pytest.raises(ManifestError, match="plain file name"):
        Manifest.read(path, plain=True)
    assert Manifest.read(_write(folder, ["extra.pt"]), plain=True).files.keys() == {"extra.pt"}


def test_a_named_field_is_checked_as_a_name(tmp_path):
    """``name_fields``: entry fields that name a file too (a delta's ``target``)."""
    folder, outside = _folder(tmp_path)
    path = _write(folder, ["extra.pt"])
    meta = json.loads(path.read_text())
    meta["files"]["extra.pt"]["target"] = str(outside)
    path.write_text(json.dumps(meta))
    assert Manifest.read(path, plain=True).files["extra.pt"]["target"] == str(outside)
    with pytest.raises(ManifestError, match=r"'extra\.pt'.*target.*absolute"):
        Manifest.read(path, plain=True, name_fields=("target",))


def test_a_forged_checkpoint_marker_is_not_taken(tmp_path, caplog):
    """A checkpoint whose marker lists a file outside it (with that file's true size and
    checksum) is incomplete, said with the entry: the resume never reads that file."""
    folder, outside = _folder(tmp_path)
    _write(folder, ["extra.pt", "dcp/__0_0.distcp", str(outside)])
    reason = incomplete_reason(folder)
    assert reason is not None and repr(str(outside)) in reason
    with caplog.at_level(logging.WARNING, logger="simko_tune.checkpoint"):
        assert CheckpointManager(tmp_path)._complete() == []
    assert repr(str(outside)) in caplog.text
