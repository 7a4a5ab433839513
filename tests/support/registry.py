"""A real OCI registry for tests (Debian's docker-registry on 127.0.0.1), and OCI image layouts
written byte by byte, so that a test controls every tar header of every layer (device nodes,
setuid files, file capabilities, gzip bombs)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_tools(*tools: str) -> None:
    for tool in tools or ("docker-registry", "skopeo", "umoci"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (scripts/setup.sh installs it)")


def start_registry(tmp: Path, htpasswd: Path | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """docker-registry on 127.0.0.1 (a free port), storing under ``tmp``; with ``htpasswd``,
    it wants basic auth. Returns ``127.0.0.1:PORT`` and the process (the caller stops it)."""
    port = free_port()
    config = tmp / "config.yml"
    text = (
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        "log:\n  level: error\n"
    )
    if htpasswd is not None:
        text += f"auth:\n  htpasswd:\n    realm: sandlot-test\n    path: {htpasswd}\n"
    config.write_text(text)
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            status = httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code
            if status in (200, 401):
                return f"127.0.0.1:{port}", process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("docker-registry did not start")
        time.sleep(0.1)


def push(layout: Path, tag: str, ref: str) -> None:
    """Copy ``layout:tag`` to the registry reference ``ref`` (plain HTTP: a loopback registry)."""
    result = subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
         f"docker://{ref}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@dataclass
class Entry:
    """One tar header of a layer (and its contents, for a regular file)."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def tar_layer(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.uid, info.gid = e.type, e.mode, e.uid, e.gid
            info.size, info.linkname = len(e.data), e.linkname
            info.devmajor, info.devminor = e.devmajor, e.devminor
            info.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("latin-1") for k, v in e.xattrs.items()
            }
            tar.addfile(info, io.BytesIO(e.data) if e.data else None)
    return buf.getvalue()


def busybox_layer(*extra: Entry) -> bytes:
    """The host's static busybox as ``/bin/busybox`` and ``/bin/sh``, plus ``extra``."""
    entries = [
        Entry("bin", tarfile.DIRTYPE, mode=0o755),
        Entry("bin/busybox", data=Path("/bin/busybox").read_bytes(), mode=0o755),
        Entry("bin/sh", tarfile.SYMTYPE, linkname="busybox", mode=0o777),
        *extra,
    ]
    return tar_layer(entries)


def gzip_bomb_layer(size: int, chunk: int = 1 << 20) -> tuple[bytes, str]:
    """A gzip layer holding one file of ``size`` zero bytes, ~1000 times smaller than that:
    one compressed chunk repeated (gzip members may follow each other). Returns the
    compressed layer and its uncompressed digest (``diff_id``)."""
    assert size % chunk == 0
    info = tarfile.TarInfo("bomb")
    info.size = size
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    zeros = bytes(chunk)
    diff = hashlib.sha256(header)
    packed = gzip.compress(zeros, 9)
    for _ in range(size // chunk):
        diff.update(zeros)
    tail = bytes(1024)  # the end-of-archive blocks (size is a multiple of 512: no padding)
    diff.update(tail)
    layer = gzip.compress(header) + packed * (size // chunk) + gzip.compress(tail)
    return layer, "sha256:" + diff.hexdigest()


def _blob(layout: Path, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def write_layout(
    layout: Path,
    tag: str,
    layers: Iterable[bytes | tuple[bytes, str]],
    env: Iterable[str] = ("PATH=/bin",),
) -> Path:
    """An OCI image layout at ``layout`` whose ``tag`` has ``layers`` (uncompressed tars, gzipped
    here; or already gzipped ones with their diff_id)."""
    descriptors, diff_ids = [], []
    for layer in layers:
        if isinstance(layer, tuple):
            compressed, diff_id = layer
        else:
            compressed, diff_id = (
                gzip.compress(layer),
                "sha256:" + hashlib.sha256(layer).hexdigest(),
            )
        descriptors.append(_blob(layout, compressed, "application/vnd.oci.image.layer.v1.tar+gzip"))
        diff_ids.append(diff_id)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": list(env)},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_blob = _blob(
        layout, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_blob,
        "layers": descriptors,
    }
    entry = _blob(
        layout, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
    )
    entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"manifests": []}
    index["schemaVersion"] = 2
    index["manifests"] = [
        m for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
    ] + [entry]  # fmt: skip
    index_path.write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return layout
