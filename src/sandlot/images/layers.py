"""What an OCI image's layers unpack to, counted before anything is unpacked.

A layer is a compressed tar stream, and its compressed size says little about what it unpacks to:
an upload of 1.7 MB once unpacked to 1.6 GB on the host (gzip compresses zeros ~1000:1, and a
layer can repeat one compressed member as often as it likes). So every layer of an image is read
as a stream first -- decompressed, tar headers parsed, file contents skipped, nothing written --
and the sizes its headers declare (what the unpacker will write) and its number of entries are
summed against limits. A bomb is refused at the header that crosses the limit, before its
contents are even decompressed (a 1 MiB layer holding a 1 GiB file: refused in ~2 ms). Layers
after the first may delete what earlier ones wrote; the sum does not subtract that, so it errs
towards refusing. The price: the layers are decompressed twice (here, then by the unpacker);
on this 2-core machine, busy, the scan ran at ~130 MiB/s of unpacked data.

Compression is recognised by its magic bytes (gzip, also multi-member; zstd through the
``zstd`` tool; bzip2, xz, none) rather than trusted from the manifest's media type.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sandlot.engines.base import ImageError
from sandlot.images.sizes import human, parse_size

#: Disk kept free whatever an image's limit (the host needs room too).
DISK_RESERVE = 256 * 1024**2
#: What one entry costs on disk at least (an inode and a block), counted against free space.
ENTRY_COST = 4096
#: The largest JSON document (index, manifest) read from a layout.
_MAX_JSON = 4 * 1024**2
#: The largest PAX or GNU long-name header (Go's archive/tar, which umoci uses, allows 1 MiB;
#: Python's tarfile would read any size into memory).
_MAX_SPECIAL = 1024**2
_SPECIAL_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
    | {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)
#: Read size through a layer: tarfile's default (10 KiB) scans gzip at ~90 MiB/s here.
_READ = 1024**2
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class UnpackLimits:
    """How much one image may unpack to: ``max_bytes`` of file contents (also never more than
    the disk has free) and ``max_entries`` files, directories and links."""

    max_bytes: int
    max_entries: int


@dataclass
class LayerTotals:
    bytes: int = 0
    entries: int = 0


def read_json(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_JSON + 1)
        if len(data) > _MAX_JSON:
            raise ValueError("too large")
        return json.loads(data)
    except (OSError, ValueError):
        raise ImageError("the image's OCI layout is not readable") from None


def _blob(layout: Path, descriptor: Any) -> Path:
    digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
    match = _DIGEST.fullmatch(str(digest))
    if match is None:
        raise ImageError("the image's OCI layout names a blob without a sha256 digest")
    return layout / "blobs" / "sha256" / match.group(1)


def layer_blobs(layout: Path, tag: str) -> list[Path]:
    """The layer blobs of ``layout:tag``, base layer first."""
    index = read_json(layout / "index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    chosen = [
        m
        for m in manifests or []
        if isinstance(m, dict)
        and (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag
    ]
    if not chosen:
        raise ImageError(f"the image's OCI layout has no tag {tag!r}")
    manifest = read_json(_blob(layout, chosen[0]))
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list):
        raise ImageError("the image's manifest lists no layers")
    return [_blob(layout, layer) for layer in layers]


class _BoundedHeader(tarfile.TarInfo):
    """A tar header whose extended headers are refused above :data:`_MAX_SPECIAL` before
    tarfile reads them into memory."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _BoundedHeader:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _SPECIAL_TYPES and info.size > _MAX_SPECIAL:
            raise ImageError("a layer has an extended tar header larger than 1 MiB")
        return info


@contextlib.contextmanager
def _decompressed(blob: Path) -> Iterator[IO[bytes] | gzip.GzipFile]:
    with blob.open("rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        if magic.startswith(b"\x1f\x8b"):
            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream
        elif magic.startswith(b"\x28\xb5\x2f\xfd"):
            if shutil.which("zstd") is None:
                raise ImageError("the image has zstd-compressed layers: install 'zstd' to use it")
            proc = subprocess.Popen(
                ["zstd", "-dcq", "--", str(blob)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            try:
                yield proc.stdout
            finally:
                proc.kill()
                proc.wait()
        elif magic.startswith(b"BZh"):
            with bz2.BZ2File(raw) as stream:
                yield stream
        elif magic.startswith(b"\xfd7zXZ\x00"):
            with lzma.LZMAFile(raw) as stream:
                yield stream
        else:
            yield raw


def measure(layout: Path, tag: str, limits: UnpackLimits, name: str) -> LayerTotals:
    """Read every layer of ``layout:tag`` as a stream and raise :class:`ImageError` as soon as
    the image (called ``name`` in messages) would unpack to more than ``limits`` allow or than
    the disk of ``layout`` has free."""
    free = shutil.disk_usage(layout).free - DISK_RESERVE
    totals = LayerTotals()
    for blob in layer_blobs(layout, tag):
        try:
            with (
                _decompressed(blob) as stream,
                tarfile.open(
                    fileobj=stream, mode="r|", tarinfo=_BoundedHeader, bufsize=_READ
                ) as tar,
            ):
                for member in tar:
                    totals.entries += 1
                    if member.isreg():
                        totals.bytes += max(member.size, 0)
                    _check(totals, limits, free, name)
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error):
            raise ImageError(f"{name}: a layer is not a readable tar archive") from None
    return totals


def _check(totals: LayerTotals, limits: UnpackLimits, free: int, name: str) -> None:
    if totals.entries > limits.max_entries:
        raise ImageError(
            f"{name} unpacks to more than {limits.max_entries} files "
            "(SANDLOT_MAX_IMAGE_FILES raises the limit)"
        )
    if totals.bytes > limits.max_bytes:
        raise ImageError(
            f"{name} unpacks to more than {human(limits.max_bytes)} "
            "(SANDLOT_MAX_IMAGE_UNPACKED_SIZE raises the limit)"
        )
    if totals.bytes + totals.entries * ENTRY_COST > free:
        raise ImageError(f"{name} unpacks to more than this server's disk has free")


def limits_from_env() -> UnpackLimits:
    """``SANDLOT_MAX_IMAGE_UNPACKED_SIZE`` (default 32G: three times the default 10G pull
    limit on compressed size) and ``SANDLOT_MAX_IMAGE_FILES`` (default 2,000,000)."""
    return UnpackLimits(
        max_bytes=parse_size(os.environ.get("SANDLOT_MAX_IMAGE_UNPACKED_SIZE") or "32G"),
        max_entries=int(os.environ.get("SANDLOT_MAX_IMAGE_FILES") or 2_000_000),
    )
