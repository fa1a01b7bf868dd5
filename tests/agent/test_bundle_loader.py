"""Opening bundles: every file proven by sha256, every problem named, archives in any reasonable layout."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from lineside.agent.bundle.loader import load_bundle
from lineside.agent.bundle.manifest import BundleManifest
from lineside.agent.errors import BundleError


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    return copy


@pytest.mark.parametrize("recorded", ["0" * 64, "f" * 64])
def test_a_checksum_that_differs_either_way_is_refused(test_bundle: Path, tmp_path: Path, recorded: str) -> None:
    # given a manifest whose recorded sha256 of the VAE is below, or above, the file's real one
    copy = _copy(test_bundle, tmp_path)
    data = json.loads((copy / "manifest.json").read_text())
    data["models"]["vae"]["file"]["sha256"] = recorded
    (copy / "manifest.json").write_text(json.dumps(data))

    # when / then
    with pytest.raises(BundleError, match=rf"vae\.onnx: sha256 is [0-9a-f]{{64}}, manifest says {recorded}"):
        load_bundle(copy)


def test_every_missing_or_tampered_file_is_named_not_just_the_first(test_bundle: Path, tmp_path: Path) -> None:
    # given two missing files and two tampered ones
    copy = _copy(test_bundle, tmp_path)
    manifest = BundleManifest.read(copy)
    golden = [g.file.path for g in manifest.golden]
    (copy / "vae.onnx").unlink()
    (copy / "ssd_anchors.npy").unlink()
    for path in golden[:2]:
        (copy / path).write_bytes(b"changed")

    # when
    with pytest.raises(BundleError) as caught:
        load_bundle(copy)

    # then one error lists them all
    message = str(caught.value)
    assert "vae.onnx: missing" in message and "ssd_anchors.npy: missing" in message
    for path in golden[:2]:
        assert f"{path}: sha256 is" in message


def test_every_unreadable_file_is_named(test_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # given two files the service user may not read (simulated: tests run as root)
    from lineside.agent.bundle import loader

    real = loader.sha256_file

    def sha256_file(path: Path) -> str:
        if path.name in ("vae.onnx", "ssd.onnx"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(loader, "sha256_file", sha256_file)

    # when / then
    with pytest.raises(BundleError) as caught:
        load_bundle(test_bundle)
    assert "vae.onnx: cannot read" in str(caught.value) and "ssd.onnx: cannot read" in str(caught.value)


def test_a_flat_archive_loads_like_one_with_a_top_folder(test_bundle: Path, tmp_path: Path) -> None:
    # given the bundle's files at the top of the archive, no enclosing folder
    archive = tmp_path / "flat.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(test_bundle.rglob("*")):
            tar.add(path, arcname=path.relative_to(test_bundle).as_posix(), recursive=False)

    # when
    loaded = load_bundle(archive)

    # then
    try:
        assert loaded.manifest.bundle_id == BundleManifest.read(test_bundle).bundle_id
        assert (loaded.root / "manifest.json").is_file()
    finally:
        loaded.close()


def test_an_empty_archive_is_a_bundle_error(tmp_path: Path) -> None:
    archive = tmp_path / "empty.tar.gz"
    with tarfile.open(archive, "w:gz"):
        pass
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_bundle(archive)


@pytest.mark.parametrize("damage", ["not gzip", "cut"])
def test_a_damaged_archive_is_a_bundle_error_naming_it(test_bundle: Path, tmp_path: Path, damage: str) -> None:
    # given an archive that is not gzip at all, or was cut short in transfer
    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(test_bundle, arcname="bundle")
    data = archive.read_bytes()
    archive.write_bytes(b"plain text, not an archive\n" * 4 if damage == "not gzip" else data[: len(data) // 2])

    # when / then
    with pytest.raises(BundleError, match=r"bundle\.tar\.gz: not a readable bundle archive"):
        load_bundle(archive)
