"""Outbound networking: on request only, through pasta, never to the host's loopback.

Traffic goes only to a peer host that this test creates in its own network namespace (a veth
pair on a private /30) and to loopback -- never to any other address.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandlot.engines.base import NetworkMode

from .conftest import Factory

pytestmark = [pytest.mark.anyio, pytest.mark.root]

PEER_IP = "10.213.7.2"
HOST_IP = "10.213.7.1"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def peer_host(tmp_path: Path) -> Iterator[str]:
    """An HTTP server on a host of our own: a network namespace behind a veth pair."""
    if shutil.which("ip") is None or shutil.which("pasta") is None:
        pytest.skip("needs iproute2 and pasta (scripts/setup.sh installs them)")
    ns = f"slpeer-{secrets.token_hex(3)}"
    veth = f"slv{secrets.token_hex(3)}"
    (tmp_path / "index.html").write_text("hello from the peer\n")
    _ip("netns", "add", ns)
    server = None
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{PEER_IP}/30", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "8080",
             "--bind", PEER_IP, "--directory", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((PEER_IP, 8080), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"http://{PEER_IP}:8080/index.html"
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def host_loopback_server() -> Iterator[int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    yield srv.getsockname()[1]
    srv.close()


async def test_no_network_by_default(make_sandbox: Factory, peer_host: str) -> None:
    sb = await make_sandbox(image="busybox")
    out = await sb.run(f"timeout 5 wget -q -O- {peer_host}")
    assert out["code"] != 0


async def test_outbound_on_request(make_sandbox: Factory, peer_host: str,
                                   host_loopback_server: int) -> None:
    sb = await make_sandbox(image="busybox", network=NetworkMode.OUTBOUND)
    assert "eth0" in (await sb.sh("ls /sys/class/net")).split()
    assert await sb.sh(f"timeout 5 wget -q -O- {peer_host}") == "hello from the peer\n"
    # 127.0.0.1 inside is the sandbox's own loopback: the host's listener is not reachable.
    out = await sb.run(f"timeout 5 wget -q -O- http://127.0.0.1:{host_loopback_server}/")
    assert out["code"] != 0


async def test_pasta_goes_away_with_the_sandbox(make_sandbox: Factory, engine: object) -> None:
    from sandlot.engines.local import LocalEngine

    assert isinstance(engine, LocalEngine)
    sb = await make_sandbox(image="busybox", network=NetworkMode.OUTBOUND)
    pid = int((engine.sandboxes_dir / sb.id / "pasta.pid").read_text())
    assert Path(f"/proc/{pid}").exists()
    await engine.delete(sb.id)
    time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "pasta" not in Path(
        f"/proc/{pid}/comm").read_text()
