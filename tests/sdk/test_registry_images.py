"""Images pulled from a registry: a real registry (Debian's docker-registry) on 127.0.0.1 holding
an image this test builds (the busybox rootfs, with its own environment and working directory),
a real server and real sandboxes. Traffic goes to loopback only."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support.server import RunningServer, start_server

from sandlot import Sandbox, SandboxRequestError

pytestmark = pytest.mark.root


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    ref: str  # the test image's tag reference
    digest_ref: str  # the same image by digest
    process: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def registry(local_server: RunningServer) -> Iterator[Registry]:
    for tool in ("docker-registry", "skopeo", "umoci"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (scripts/setup.sh installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="sl-registry-"))
    port = _free_port()
    config = tmp / "config.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        "log:\n  level: error\n"
    )
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "docker-registry did not start"
            time.sleep(0.1)
        # An image of our own: busybox's rootfs, with an environment and a working directory.
        from sandlot.images.store import ImageStore

        busybox = ImageStore(tmp / "images").busybox_image()
        layout, bundle = tmp / "layout", tmp / "bundle"
        _run("umoci", "init", "--layout", str(layout))
        _run("umoci", "new", "--image", f"{layout}:t")
        _run("umoci", "unpack", "--image", f"{layout}:t", str(bundle))
        shutil.copytree(busybox.rootfs, bundle / "rootfs", symlinks=True, dirs_exist_ok=True)
        (bundle / "rootfs" / "work").mkdir()
        _run("umoci", "repack", "--image", f"{layout}:t", str(bundle))
        _run(
            "umoci", "config", "--image", f"{layout}:t",
            "--config.env", "GREETING=hello from the registry",
            "--config.workingdir", "/work",
        )  # fmt: skip
        host = f"127.0.0.1:{port}"
        ref = f"{host}/sandlot-test/busy:1"
        _run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:t",
             f"docker://{ref}")  # fmt: skip
        digest = json.loads(_run("skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"))[
            "Digest"
        ]
        yield Registry(host, ref, f"{host}/sandlot-test/busy@{digest}", process)
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def server(local_server: RunningServer) -> Iterator[RunningServer]:
    """A server whose image store is its own (pulled images do not pile up in the host's)."""
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore

    tmp = Path(tempfile.mkdtemp(prefix="sl-regsrv-"))
    engine = LocalEngine(tmp / "state", images=ImageStore(tmp / "images"))
    srv = start_server(engine, f"sqlite:///{tmp / 'db'}", unix_path=tmp / "s.sock")
    yield srv
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def test_an_image_from_a_registry(server: RunningServer, registry: Registry) -> None:
    with Sandbox.create(image=registry.ref, api_url=server.url) as sb:
        result = sb.exec('echo "$GREETING"; pwd; busybox | head -1')
        assert result.exit_code == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[:2] == ["hello from the registry", "/work"]
        assert lines[2].startswith("BusyBox")
        sb.filesystem.write_file("/work/x.txt", "written")  # the image is writable as usual
        assert sb.filesystem.read_file("/work/x.txt").content == "written"


def test_by_digest(server: RunningServer, registry: Registry) -> None:
    with Sandbox.create(image=registry.digest_ref, api_url=server.url) as sb:
        assert sb.exec("echo $GREETING").stdout == "hello from the registry\n"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        # the registry's host is put in front below
        ("sandlot-test/busy:no-such-tag", "cannot pull .*manifest unknown"),
        ("sandlot-test/nothing:1", "cannot pull .*manifest unknown"),
        ("Not A Reference", "without spaces"),
        ("UPPER/case:1", "unknown image"),
        ("a//b", "unknown image"),
    ],
)
def test_bad_references_are_clear_errors(
    server: RunningServer, registry: Registry, image: str, message: str
) -> None:
    if image.startswith("sandlot-test/"):
        image = f"{registry.host}/{image}"
    with pytest.raises(SandboxRequestError, match=message) as info:
        Sandbox.create(image=image, api_url=server.url)
    assert image in str(info.value)
    # a failed create leaves nothing running behind it
    assert all(sb.status != "running" for sb in Sandbox.list(api_url=server.url))


def test_unreachable_registry(server: RunningServer) -> None:
    port = _free_port()  # nothing listens there
    image = f"127.0.0.1:{port}/nothing/here:1"
    with pytest.raises(SandboxRequestError, match="cannot pull") as info:
        Sandbox.create(image=image, api_url=server.url)
    assert "connection refused" in str(info.value).lower()


def test_pulled_images_stay_when_the_registry_is_gone(
    server: RunningServer, registry: Registry
) -> None:
    """(Last: it stops the module's registry.) A pulled image is reused, as Docker's default
    'pull if missing' does: the same reference still creates with the registry gone."""
    with Sandbox.create(image=registry.ref, api_url=server.url) as sb:
        assert sb.exec("true").exit_code == 0
    registry.process.terminate()
    registry.process.wait(10)
    with Sandbox.create(image=registry.ref, api_url=server.url) as sb:
        assert sb.exec("pwd").stdout == "/work\n"
