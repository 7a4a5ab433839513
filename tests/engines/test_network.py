"""Outbound networking: on request only, through pasta, never to the host's loopback.

Traffic goes only to a peer host that this test creates in its own network namespace (a veth
pair on a private /30) and to loopback -- never to any other address.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.peer_host import peer_host

from sandlot.engines.base import NetworkMode

from .conftest import Factory

pytestmark = [pytest.mark.anyio, pytest.mark.root]


@contextlib.contextmanager
def _peer(tmp_path: Path, subnet: int) -> Iterator[str]:
    """An HTTP server on a host of our own (:mod:`support.peer_host`). Yields its URL."""
    root = tmp_path / f"peer{subnet}"
    root.mkdir()
    (root / "index.html").write_text("hello from the peer\n")

    def command(ip: str) -> list[str]:
        return [sys.executable, "-m", "http.server", "8080", "--bind", ip, "--directory", str(root)]

    with peer_host(subnet, 8080, command) as ip:
        yield f"http://{ip}:8080/index.html"


@pytest.fixture(name="peer_host")
def peer_host_fixture(tmp_path: Path) -> Iterator[str]:
    with _peer(tmp_path, 7) as url:
        yield url


@pytest.fixture
def other_peer_host(tmp_path: Path) -> Iterator[str]:
    with _peer(tmp_path, 8) as url:
        yield url


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


async def test_outbound_on_request(
    make_sandbox: Factory, peer_host: str, host_loopback_server: int
) -> None:
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
    from sandlot.engines.local.network import _running

    assert not _running(pid)  # gone, or a zombie waiting for its reaper


async def test_allowlist_reaches_only_listed_networks(
    make_sandbox: Factory, peer_host: str, other_peer_host: str
) -> None:
    sb = await make_sandbox(
        image="busybox", network=NetworkMode.OUTBOUND, outbound_allowlist=("10.213.7.2",)
    )  # a bare IP: /32
    assert await sb.sh(f"timeout 5 wget -q -O- {peer_host}") == "hello from the peer\n"
    out = await sb.run(f"timeout 5 wget -q -O- {other_peer_host}")
    assert out["code"] != 0


async def test_sandbox_cannot_lift_its_policy(make_sandbox: Factory) -> None:
    sb = await make_sandbox(network=NetworkMode.OUTBOUND, outbound_allowlist=("10.213.7.0/30",))
    eff = int((await sb.sh("grep CapEff /proc/self/status")).split()[1], 16)
    assert not eff & (1 << 12), "CAP_NET_ADMIN must not be granted"
    out = await sb.run("ip route add 10.99.0.0/16 dev eth0 2>&1; ip link set eth0 down 2>&1")
    assert "not permitted" in out["stdout"].lower()


async def test_network_policy_changes_live(
    make_sandbox: Factory, engine: object, peer_host: str
) -> None:
    from sandlot.engines.local import LocalEngine

    assert isinstance(engine, LocalEngine)
    sb = await make_sandbox(image="busybox")
    assert (await sb.run(f"timeout 3 wget -q -O- {peer_host}"))["code"] != 0
    await engine.set_network(sb.id, NetworkMode.OUTBOUND, ("10.213.7.0/30",))
    assert await sb.sh(f"timeout 5 wget -q -O- {peer_host}") == "hello from the peer\n"
    await engine.set_network(sb.id, NetworkMode.NONE, None)
    assert (await sb.sh("ls /sys/class/net")).split() == ["lo"]
    assert (await sb.run(f"timeout 3 wget -q -O- {peer_host}"))["code"] != 0


@pytest.mark.parametrize("bad", [["not-an-ip"], ["10.0.0.0/33"], "10.0.0.0/8", [42]])
async def test_invalid_allowlist(engine: object, bad: object) -> None:
    from sandlot.engines.base import SandboxSpec
    from sandlot.engines.local import LocalEngine, new_sandbox_id
    from sandlot.instance_types import get_instance_type
    from sandlot.netpolicy import EgressPolicyError

    assert isinstance(engine, LocalEngine)
    spec = SandboxSpec(
        id=new_sandbox_id(),
        image="busybox",
        secret="s",
        instance_type=get_instance_type("nano"),
        network=NetworkMode.OUTBOUND,
        outbound_allowlist=bad,
    )  # type: ignore[arg-type]
    with pytest.raises(EgressPolicyError):
        await engine.create(spec)
    assert not (engine.sandboxes_dir / spec.id).exists()


def test_ruleset_blocks_link_local_and_allows_dns_to_resolvers() -> None:
    from sandlot.engines.local.network import egress_ruleset

    everything = egress_ruleset(None, ["10.255.255.53"])
    assert "ip daddr 169.254.0.0/16 drop" in everything and "    accept" in everything
    listed = egress_ruleset(("192.0.2.0/24", "2001:db8::/32"), ["10.255.255.53"])
    assert "ip daddr { 192.0.2.0/24 } accept" in listed
    assert "ip6 daddr { 2001:db8::/32 } accept" in listed
    assert "ip daddr 10.255.255.53 udp dport 53 accept" in listed
    assert "policy drop" in listed
