"""Layers measured before unpacking (no root needed): sizes and entry counts from the tar
headers of real compressed layers, refused at the header that crosses a limit."""

from __future__ import annotations

import gzip
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.registry import Entry, gzip_bomb_layer, tar_layer, write_layout

from sandlot.engines.base import ImageError
from sandlot.images.layers import UnpackLimits, measure

ROOMY = UnpackLimits(max_bytes=1 << 40, max_entries=1_000_000)


def _files(n: int, size: int) -> bytes:
    return tar_layer(Entry(f"f{i}", data=bytes(size)) for i in range(n))


def test_sizes_and_entries_of_every_layer_are_summed(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "l", "t", [_files(3, 1000), _files(2, 500)])
    totals = measure(layout, "t", ROOMY, "img")
    assert (totals.bytes, totals.entries) == (4000, 5)


def test_a_bomb_is_refused_at_its_header(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "l", "t", [gzip_bomb_layer(64 << 20)])
    with pytest.raises(ImageError, match=r"img unpacks to more than 32\.0 MiB"):
        measure(layout, "t", UnpackLimits(32 << 20, 10), "img")
    assert measure(layout, "t", UnpackLimits(64 << 20, 10), "img").bytes == 64 << 20


def test_too_many_entries(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "l", "t", [_files(50, 0)])
    with pytest.raises(ImageError, match=r"more than 20 files .*SANDLOT_MAX_IMAGE_FILES"):
        measure(layout, "t", UnpackLimits(1 << 30, 20), "img")


def test_never_more_than_the_disk_has_free(tmp_path: Path) -> None:
    """A header claiming a petabyte: only the header is there, and it is enough to refuse."""
    info = tarfile.TarInfo("huge")
    info.size = 1 << 50
    layer = gzip.compress(info.tobuf(format=tarfile.PAX_FORMAT))
    layout = write_layout(tmp_path / "l", "t", [(layer, "sha256:" + "0" * 64)])
    with pytest.raises(ImageError, match="more than this server's disk has free"):
        measure(layout, "t", UnpackLimits(1 << 60, 10), "img")


def test_zstd_layers(tmp_path: Path) -> None:
    raw = _files(2, 100)
    zstd = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    layout = write_layout(tmp_path / "l", "t", [(zstd, "sha256:" + "0" * 64)])
    assert measure(layout, "t", ROOMY, "img").bytes == 200


@pytest.mark.parametrize("garbage", [b"not a tar at all" * 100, gzip.compress(b"x" * 5000)])
def test_a_layer_that_is_not_a_tar(tmp_path: Path, garbage: bytes) -> None:
    layout = write_layout(tmp_path / "l", "t", [(garbage, "sha256:" + "0" * 64)])
    with pytest.raises(ImageError, match="a layer is not a readable tar archive"):
        measure(layout, "t", ROOMY, "img")


def test_a_manifest_naming_a_path_instead_of_a_digest(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "l", "t", [_files(1, 1)])
    for blob in (layout / "blobs" / "sha256").iterdir():
        text = blob.read_text(errors="replace")
        if '"schemaVersion"' in text:  # the manifest
            blob.write_text(text.replace('"sha256:', '"sha256:../../../'))
    with pytest.raises(ImageError):
        measure(layout, "t", ROOMY, "img")
    with pytest.raises(ImageError, match="no tag 'other'"):
        measure(layout, "other", ROOMY, "img")


def test_an_extended_header_is_not_read_into_memory(tmp_path: Path) -> None:
    """A PAX header claiming 8 GiB: Python's tarfile would read it all into memory."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, 8 << 30
    layer = gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT))
    layout = write_layout(tmp_path / "l", "t", [(layer, "sha256:" + "0" * 64)])
    with pytest.raises(ImageError, match="extended tar header larger than 1 MiB"):
        measure(layout, "t", ROOMY, "img")
