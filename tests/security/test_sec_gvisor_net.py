"""gVisor sandboxes with outbound access: the egress policy holds even against code that owns
gVisor's whole network stack, and the host's loopback stays out of reach.

Attacks sent: a *privileged* gVisor sandbox (CAP_NET_ADMIN inside gVisor; runsc withholds
CAP_NET_RAW) with an allow-list tries to reach a host that is not on it by rewriting its routes
and its address, and by ICMP; any gVisor sandbox tries the host's loopback listener through its own
127.0.0.1 and through the router's address. On the old code a gVisor sandbox could not have
outbound access at all (refused at create, and by update_network). Traffic goes only to
loopback and to peer hosts in namespaces these tests create.
"""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from support.local import IMAGES_DIR, SandboxHandle, create_sandbox, local_engine_unavailable
from support.peer_host import peer_host
from support.runtimes import RUNSC_MISSING, searchable_state_dir
from support.server import RunningServer, start_server

from sandlot import Sandbox
from sandlot.engines.base import NetworkMode
from sandlot.engines.local import LocalEngine
from sandlot.engines.local.gvisor_net import HOST_ADDR
from sandlot.images.store import ImageStore

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("runsc") is None, reason=RUNSC_MISSING),
]

FETCH = "timeout 5 wget -q -O- {url}"


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    with searchable_state_dir("sl-gvnet-") as path:
        yield path


@pytest.fixture
async def engine(state: Path) -> AsyncIterator[LocalEngine]:
    eng = LocalEngine(state / "state", images=ImageStore(IMAGES_DIR))
    try:
        yield eng
    finally:
        for info in await eng.list():
            await eng.delete(info.id)


def _serve(tmp: Path, subnet: int) -> object:
    root = tmp / f"www{subnet}"
    root.mkdir()
    (root / "index.html").write_text(f"peer {subnet}\n")

    def command(ip: str) -> list[str]:
        return [sys.executable, "-m", "http.server", "8080", "--bind", ip, "--directory", str(root)]

    return peer_host(subnet, 8080, command)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[str, str]]:
    with _serve(tmp_path, 7) as allowed, _serve(tmp_path, 8) as other:  # type: ignore[attr-defined]
        yield f"http://{allowed}:8080/index.html", f"http://{other}:8080/index.html"


@pytest.fixture
def host_loopback_port() -> Iterator[int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    yield srv.getsockname()[1]
    srv.close()


@pytest.mark.anyio
async def test_privileged_gvisor_code_cannot_route_around_its_allowlist(
    engine: LocalEngine, peers: tuple[str, str]
) -> None:
    """Privileged on crun means trusted (it may lift its own table); on gVisor the table is in
    a namespace gVisor never sees, so even root with every network capability inside stays in."""
    allowed, other = peers
    sb: SandboxHandle = await create_sandbox(
        engine,
        image="busybox",
        runtime="gvisor",
        privileged=True,
        network=NetworkMode.OUTBOUND,
        outbound_allowlist=("10.213.7.0/30",),
    )
    try:
        eff = int((await sb.sh("grep CapEff /proc/self/status")).split()[1], 16)
        assert eff & (1 << 12), "privileged: CAP_NET_ADMIN inside"
        assert not eff & (1 << 13), "runsc withholds CAP_NET_RAW (no --net-raw)"
        assert await sb.sh(FETCH.format(url=allowed)) == "peer 7\n"
        assert (await sb.run(FETCH.format(url=other)))["code"] != 0
        # Rewrite what gVisor's stack controls: a host route, a new source address, and the
        # router's own address taken as ours; none of it reaches the router's table.
        await sb.run(
            "ip route add 10.213.8.0/30 via 198.18.0.1 dev gv0; "
            "ip addr add 10.213.7.1/32 dev gv0; ip addr add 198.18.0.1/32 dev gv0; "
            "ip route replace default via 198.18.0.1 dev gv0 src 10.213.7.1"
        )
        assert (await sb.run(FETCH.format(url=other)))["code"] != 0
        out = await sb.run("ping -c 1 -W 2 10.213.8.2")  # ICMP: an unprivileged ping socket
        assert out["code"] != 0 and "1 packets received" not in out["stdout"]
    finally:
        await sb.aclose()


@pytest.mark.anyio
async def test_gvisor_never_reaches_the_hosts_loopback(
    engine: LocalEngine, host_loopback_port: int
) -> None:
    sb: SandboxHandle = await create_sandbox(
        engine, image="busybox", runtime="gvisor", network=NetworkMode.OUTBOUND
    )
    try:
        for address in ("127.0.0.1", HOST_ADDR):
            out = await sb.run(f"timeout 5 nc -w 2 {address} {host_loopback_port} </dev/null")
            assert out["code"] != 0, f"reached the host's listener through {address}"
        # ... while its own loopback works (gVisor's 127.0.0.1).
        got = await sb.sh(
            "echo own-loopback | nc -l -p 9000 & "
            "for i in $(seq 50); do nc 127.0.0.1 9000 </dev/null && break; sleep 0.1; done"
        )
        assert got.strip() == "own-loopback"
    finally:
        await sb.aclose()


@pytest.fixture(scope="module")
def gvisor_server(state: Path) -> Iterator[tuple[RunningServer, str]]:
    engine = LocalEngine(state / "server-state", images=ImageStore(IMAGES_DIR))
    srv = start_server(engine, f"sqlite:///{state / 'db'}", tcp=True)
    _, token = srv.app.state.control.store.create_token("gvnet", "test")
    try:
        yield srv, token
    finally:
        srv.stop()


def test_sdk_allowlist_and_live_update_on_gvisor(
    gvisor_server: tuple[RunningServer, str], peers: tuple[str, str]
) -> None:
    """Through the SDK and the server: what was a 400 on gVisor now applies, live."""
    srv, token = gvisor_server
    allowed, other = peers
    with Sandbox.create(
        api_url=srv.url,
        api_token=token,
        image="busybox",
        runtime="gvisor",
        outbound_allowlist=["10.213.7.0/30"],
        idle_timeout=0,
    ) as sb:
        assert sb.exec(FETCH.format(url=allowed)).stdout == "peer 7\n"
        assert sb.exec(FETCH.format(url=other)).code != 0
        sb.update_network(block_network=True)
        assert sb.exec(FETCH.format(url=allowed)).code != 0
        sb.update_network(block_network=False)
        assert sb.exec(FETCH.format(url=other)).stdout == "peer 8\n"
        info = httpx.get(
            f"{srv.url}/v1/sandboxes/{sb.id}", headers={"authorization": f"Bearer {token}"}
        ).json()
        assert info["runtime"] == "gvisor" and info["network"] == "outbound"
