"""Outbound networking: on request only, through pasta, never to the host's loopback; on crun
and on gVisor (whose own network stack sits behind a router namespace, gvisor_net.py).

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
from support.runtimes import runtime_params, searchable_state_dir

from sandlot.engines.base import NetworkMode

from .conftest import Factory

pytestmark = [pytest.mark.anyio, pytest.mark.root]

#: Each of these runs on gVisor as well in the default run (a few seconds each).
both_runtimes = pytest.mark.parametrize("runtime", runtime_params(gvisor_by_default=True))


@pytest.fixture(scope="module")
def engine_state() -> Iterator[Path]:
    """One that gVisor sandboxes can use too (see support.runtimes)."""
    with searchable_state_dir("sl-net-") as state:
        yield state


def _interfaces(proc_net_dev: str) -> list[str]:
    """Interface names from /proc/net/dev (gVisor has no /sys/class/net)."""
    return sorted(line.split(":")[0].strip() for line in proc_net_dev.splitlines()[2:])


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


@both_runtimes
async def test_no_network_by_default(make_sandbox: Factory, peer_host: str, runtime: str) -> None:
    sb = await make_sandbox(image="busybox", runtime=runtime)
    out = await sb.run(f"timeout 5 wget -q -O- {peer_host}")
    assert out["code"] != 0


@both_runtimes
async def test_outbound_on_request(
    make_sandbox: Factory, peer_host: str, host_loopback_server: int, runtime: str
) -> None:
    sb = await make_sandbox(image="busybox", network=NetworkMode.OUTBOUND, runtime=runtime)
    assert len(_interfaces(await sb.sh("cat /proc/net/dev"))) == 2  # lo and the way out
    assert await sb.sh(f"timeout 5 wget -q -O- {peer_host}") == "hello from the peer\n"
    # 127.0.0.1 inside is the sandbox's own loopback: the host's listener is not reachable.
    out = await sb.run(f"timeout 5 wget -q -O- http://127.0.0.1:{host_loopback_server}/")
    assert out["code"] != 0


@both_runtimes
async def test_pasta_goes_away_with_the_sandbox(
    make_sandbox: Factory, engine: object, runtime: str
) -> None:
    from sandlot.engines.local import LocalEngine

    assert isinstance(engine, LocalEngine)
    sb = await make_sandbox(image="busybox", network=NetworkMode.OUTBOUND, runtime=runtime)
    pid = int((engine.sandboxes_dir / sb.id / "pasta.pid").read_text())
    assert Path(f"/proc/{pid}").exists()
    await engine.delete(sb.id)
    from sandlot.engines.local.network import _running

    assert not _running(pid)  # gone, or a zombie waiting for its reaper


@both_runtimes
async def test_allowlist_reaches_only_listed_networks(
    make_sandbox: Factory, peer_host: str, other_peer_host: str, runtime: str
) -> None:
    sb = await make_sandbox(
        image="busybox",
        network=NetworkMode.OUTBOUND,
        outbound_allowlist=("10.213.7.2",),  # a bare IP: /32
        runtime=runtime,
    )
    assert await sb.sh(f"timeout 5 wget -q -O- {peer_host}") == "hello from the peer\n"
    out = await sb.run(f"timeout 5 wget -q -O- {other_peer_host}")
    assert out["code"] != 0


@both_runtimes
async def test_sandbox_cannot_lift_its_policy(make_sandbox: Factory, runtime: str) -> None:
    sb = await make_sandbox(
        network=NetworkMode.OUTBOUND, outbound_allowlist=("10.213.7.0/30",), runtime=runtime
    )
    eff = int((await sb.sh("grep CapEff /proc/self/status")).split()[1], 16)
    assert not eff & (1 << 12), "CAP_NET_ADMIN must not be granted"
    way_out = next(i for i in _interfaces(await sb.sh("cat /proc/net/dev")) if i != "lo")
    out = await sb.run(
        f"ip route add 10.99.0.0/16 dev {way_out} 2>&1; ip link set {way_out} down 2>&1"
    )
    assert "not permitted" in out["stdout"].lower()


@both_runtimes
async def test_network_policy_changes_live(
    make_sandbox: Factory, engine: object, peer_host: str, runtime: str
) -> None:
    from sandlot.engines.local import LocalEngine

    assert isinstance(engine, LocalEngine)
    sb = await make_sandbox(image="busybox", runtime=runtime)
    assert (await sb.run(f"timeout 3 wget -q -O- {peer_host}"))["code"] != 0
    await engine.set_network(sb.id, NetworkMode.OUTBOUND, ("10.213.7.0/30",))
    assert await sb.sh(f"timeout 5 wget -q -O- {peer_host}") == "hello from the peer\n"
    await engine.set_network(sb.id, NetworkMode.NONE, None)
    if runtime == "crun":
        assert _interfaces(await sb.sh("cat /proc/net/dev")) == ["lo"]
    # gVisor keeps its end of the pair: the route out, pasta, is gone from the router.
    assert not (engine.sandboxes_dir / sb.id / "pasta.pid").exists()
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


def test_gvisors_ruleset_filters_what_the_router_forwards_from_gvisor() -> None:
    """gVisor's packets reach the host's kernel as a router's traffic: the policy sits on the
    forward hook, only for what comes from gVisor's end, and refuses the rest with an ICMP error
    (a refused connection fails at once instead of timing out)."""
    from sandlot.engines.local.network import egress_ruleset

    listed = egress_ruleset(("192.0.2.0/24",), [], forward_from="gw0")
    assert "type filter hook forward priority 0; policy drop;" in listed
    assert 'iifname != "gw0" drop' in listed
    assert listed.index("ip daddr 169.254.0.0/16 drop") < listed.index("192.0.2.0/24")
    assert listed.rstrip().splitlines()[-3].strip() == "reject with icmpx admin-prohibited"


@pytest.mark.parametrize("runtime", runtime_params(gvisor_by_default=True))
async def test_outbound_access_survives_deep_sleep(
    make_sandbox: Factory, engine: object, peer_host: str, runtime: str
) -> None:
    """Stop and start (for gVisor: a checkpoint and a restore, whose network stack comes back
    from the image): the namespaces are set up again before runsc runs, pasta comes back."""
    from support.local import deep_sleep

    sb = await make_sandbox(image="busybox", network=NetworkMode.OUTBOUND, runtime=runtime)
    await deep_sleep(engine, sb)
    assert await sb.sh(f"timeout 5 wget -q -O- {peer_host}") == "hello from the peer\n"
    assert await sb.sh("echo hi | nc -l -p 9000 & sleep 0.2; nc 127.0.0.1 9000") == "hi\n"
