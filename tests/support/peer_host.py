"""A host of a test's own: a network namespace behind a veth pair on 10.213.<subnet>.0/30,
running one server. The only place outside loopback that tests send traffic to: sandboxes with
outbound access reach it through pasta and the host's routing, as they would reach any host."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def peer_host(subnet: int, port: int, command: Callable[[str], list[str]]) -> Iterator[str]:
    """Start ``command(peer_ip)`` in a new namespace whose address is 10.213.<subnet>.2; wait
    until ``port`` answers there; yield the address; remove everything afterwards."""
    if shutil.which("ip") is None or shutil.which("pasta") is None:
        pytest.skip("needs iproute2 and pasta (scripts/setup.sh installs them)")
    host_ip, peer_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
    ns = f"slpeer-{secrets.token_hex(3)}"
    veth = f"slv{secrets.token_hex(3)}"
    _ip("netns", "add", ns)
    server = None
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{peer_ip}/30", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, *command(peer_ip)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((peer_ip, port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        yield peer_ip
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
