"""Exposed ports and the TCP proxy (issue 7), end to end: a real server (TCP on 127.0.0.1, with
a wildcard domain for the host form) in front of real LocalEngine sandboxes running servers of
their own (tests/sdk/sandbox_servers.py). Traffic goes only to loopback and Unix sockets."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sandbox_servers import H2C_SERVER, HTTP_APP, TCP_ECHO, WS_ECHO
from support.runtimes import (
    RUNTIME_PARAMS,
    skip_unless_selected,
    xfail_on_gvisor,
)
from support.server import RunningServer, start_server

from sandlot import InvalidPortError, Sandbox, SandboxRequestError

DOMAIN = "sandlot.test"
#: On gVisor a port's socket lives in gVisor's network stack: the agent relays each connection
#: itself (a thread each) instead of handing it over, and 10,000 at once break the sandbox's
#: agent (seen: the sandbox restarted, its exposed ports gone).
GVISOR_AGENT_RELAYS = "gVisor: the agent relays each connection itself; 10,000 at once break it"


@dataclass
class Gateway:
    server: RunningServer
    token: str
    #: The default runtime of its sandboxes.
    runtime: str = "crun"

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def create(self, **kwargs: Any) -> Sandbox:
        return Sandbox.create(api_url=self.url, api_token=self.token, **kwargs)


@pytest.fixture(scope="module", params=RUNTIME_PARAMS)
def gw(local_server: RunningServer, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """A TCP server whose sandboxes are crun or gVisor ones (its default runtime)."""
    tmp = Path(tempfile.mkdtemp(prefix="sl-ports-"))
    srv = start_server(
        local_server.engine,
        f"sqlite:///{tmp / 'db'}",
        tcp=True,
        domain=DOMAIN,
        default_runtime=request.param,
    )
    _, token = srv.app.state.control.store.create_token("ports", "test")
    yield Gateway(srv, token, request.param)
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _runtime_selected(request: pytest.FixtureRequest, gw: Gateway) -> None:
    skip_unless_selected(request, gw.runtime)


def start_servers(sb: Sandbox, servers: dict[int, str]) -> None:
    """Start servers (port → "app" | "www" | "ws" | "tcp" | "h2c") and wait until they
    listen."""
    files = {"app": HTTP_APP, "ws": WS_ECHO, "tcp": TCP_ECHO, "h2c": H2C_SERVER}
    sb.filesystem.write_files({f"/srv/{k}.py": v for k, v in files.items()})
    sb.exec("mkdir -p /srv/www && printf 'hello from the sandbox\\n' > /srv/www/hello.txt")
    for port, kind in servers.items():
        if kind == "www":
            sb.launch_process(
                f"python3 -m http.server {port} --bind 127.0.0.1 --directory /srv/www"
            )
        else:
            sb.launch_process(f"python3 /srv/{kind}.py {port}")
    wait = (
        "import socket, sys, time\n"
        "for p in sys.argv[1:]:\n"
        "    for _ in range(200):\n"
        "        try: socket.create_connection(('127.0.0.1', int(p)), 1).close(); break\n"
        "        except OSError: time.sleep(0.05)\n"
        "    else: sys.exit('port %s never listened' % p)\n"
    )
    sb.filesystem.write_file("/srv/wait.py", wait)
    result = sb.exec("python3 /srv/wait.py " + " ".join(map(str, servers)))
    assert result.exit_code == 0, result.stderr


@pytest.fixture(scope="module")
def box(gw: Gateway) -> Iterator[Sandbox]:
    """One sandbox with an HTTP/1.1 app on 8000, Python's http.server on 8001, a WebSocket echo
    on 8765 and a TCP echo on 9000; 8000, 8001 and 8765 exposed. Medium: the 10,000-WebSocket
    test needs an echo server with that many descriptors (micro allows 4096, medium 16384)."""
    sb = gw.create(instance_type="medium", idle_timeout=0)
    try:
        start_servers(sb, {8000: "app", 8001: "www", 8765: "ws", 9000: "tcp"})
        for port in (8000, 8001, 8765):
            sb.expose_port(port)
        yield sb
    finally:
        sb.delete()


def path_url(gw: Gateway, sb: Sandbox, port: int, rest: str = "") -> str:
    return f"{gw.url}/sandboxes/{sb.id}/ports/{port}/{rest}"


def host_get(gw: Gateway, sb: Sandbox, port: int, path: str, **kwargs: Any) -> httpx.Response:
    """The host form: the server's own listener, routed by the Host header."""
    headers = {"host": f"{port}-{sb.id}.{DOMAIN}", **kwargs.pop("headers", {})}
    return httpx.get(f"{gw.url}{path}", headers=headers, timeout=30, **kwargs)


# -- HTTP -----------------------------------------------------------------------------------------


def test_expose_answers_urls(gw: Gateway, box: Sandbox) -> None:
    exposed = box.expose_port(8000)  # again: idempotent
    assert exposed["port"] == 8000
    assert exposed["exposed_at"] == path_url(gw, box, 8000)
    assert exposed["host_url"] == f"http://8000-{box.id}.{DOMAIN}/"
    assert exposed["token"] is None
    assert box.get_domain() == DOMAIN
    assert box.get_sandbox_url() == f"{gw.url}/sandboxes/{box.id}/koyeb-sandbox"
    listed = {p["port"] for p in box.list_exposed_ports()}
    assert {8000, 8001, 8765} <= listed


def test_domain_survives_update_lifecycle(gw: Gateway, box: Sandbox) -> None:
    """The PATCH answer is rendered like every other sandbox answer: it once lost the configured
    domain, so ``get_domain()`` answered the server's host after ``update_lifecycle()``."""
    box.update_lifecycle(idle_timeout=0)
    assert box.get_domain() == DOMAIN
    assert box.get_sandbox_url() == f"{gw.url}/sandboxes/{box.id}/koyeb-sandbox"


@pytest.mark.gvisor_default
def test_http_path_form(gw: Gateway, box: Sandbox) -> None:
    r = httpx.get(path_url(gw, box, 8000, "echo/a%20b?x=1&y=2"), timeout=30)
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["path"] == "/echo/a%20b?x=1&y=2"
    assert seen["headers"]["x-forwarded-prefix"] == f"/sandboxes/{box.id}/ports/8000"
    assert seen["headers"]["host"] == f"127.0.0.1:{gw.port}"
    # Python's own http.server
    r = httpx.get(path_url(gw, box, 8001, "hello.txt"), timeout=30)
    assert r.status_code == 200 and r.text == "hello from the sandbox\n"
    assert "SimpleHTTP" in r.headers["server"]
    # no trailing slash: redirected below the prefix
    r = httpx.get(path_url(gw, box, 8001).rstrip("/") + "?q=1", timeout=30)
    assert r.status_code == 307
    assert r.headers["location"] == f"/sandboxes/{box.id}/ports/8001/?q=1"


def test_http_host_form(gw: Gateway, box: Sandbox) -> None:
    r = host_get(gw, box, 8000, "/echo?z=1")
    assert r.status_code == 200 and r.json()["path"] == "/echo?z=1"
    assert "x-forwarded-prefix" not in r.json()["headers"]
    assert r.json()["headers"]["host"] == f"8000-{box.id}.{DOMAIN}"
    r = host_get(gw, box, 8001, "/hello.txt")
    assert r.status_code == 200 and r.text == "hello from the sandbox\n"
    # the API is not reachable under a sandbox's host name
    r = host_get(gw, box, 8001, "/v1/sandboxes")
    assert r.status_code == 404
    # other host names are the API as usual
    r = httpx.get(f"{gw.url}/v1/health", headers={"host": f"api.{DOMAIN}"})
    assert r.status_code == 200


def test_keep_alive_many_requests(gw: Gateway, box: Sandbox) -> None:
    with httpx.Client(timeout=30) as c:
        for i in range(50):
            r = c.get(path_url(gw, box, 8000, f"n/{i}"))
            assert r.status_code == 200 and r.json()["path"] == f"/n/{i}"


def test_sse_is_streamed_unbuffered(gw: Gateway, box: Sandbox) -> None:
    arrivals: list[float] = []
    with httpx.stream("GET", path_url(gw, box, 8000, "sse"), timeout=30) as r:
        assert r.headers["content-type"] == "text/event-stream"
        start = time.monotonic()
        for line in r.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 4
    assert arrivals[0] < 0.3, arrivals  # the first event did not wait for the others
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(g > 0.2 for g in gaps), arrivals


def test_server_closing_mid_response(gw: Gateway, box: Sandbox) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(path_url(gw, box, 8000, "broken"), timeout=30)
    # the gateway is fine afterwards
    assert httpx.get(path_url(gw, box, 8000, "ok"), timeout=30).status_code == 200


def test_unexposed_and_bad_ports_are_404(gw: Gateway, box: Sandbox) -> None:
    r = httpx.get(path_url(gw, box, 9999), timeout=30)
    assert r.status_code == 404
    assert r.json()["code"] == "port_not_exposed" and "9999" in r.json()["error"]
    for bad in ("0", "70000", "abc"):
        r = httpx.get(f"{gw.url}/sandboxes/{box.id}/ports/{bad}/", timeout=30)
        assert r.status_code == 404 and bad in r.json()["error"], (bad, r.text)
    r = host_get(gw, box, 9999, "/")
    assert r.status_code == 404 and "9999" in r.json()["error"]
    r = httpx.get(f"{gw.url}/sandboxes/{'f' * 24}/ports/8000/", timeout=30)
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_nothing_listening_is_502_naming_the_port(gw: Gateway, box: Sandbox) -> None:
    box.expose_port(8099)
    try:
        r = httpx.get(path_url(gw, box, 8099), timeout=30)
        assert r.status_code == 502
        assert r.json()["port"] == 8099 and "8099" in r.json()["error"]
        assert "nothing is listening" in r.json()["error"]
    finally:
        box.unexpose_port(8099)


def test_two_ports_and_unexpose_closes_the_path(gw: Gateway, box: Sandbox) -> None:
    box.expose_port(9000)  # the TCP echo: exposed, then closed again
    assert httpx.get(path_url(gw, box, 8000, "x"), timeout=30).status_code == 200
    assert httpx.get(path_url(gw, box, 8001, "hello.txt"), timeout=30).status_code == 200
    box.unexpose_port(8001)
    r = httpx.get(path_url(gw, box, 8001, "hello.txt"), timeout=30)
    assert r.status_code == 404 and "8001" in r.json()["error"]
    assert host_get(gw, box, 8001, "/hello.txt").status_code == 404
    assert httpx.get(path_url(gw, box, 8000, "x"), timeout=30).status_code == 200
    with pytest.raises(SandboxRequestError) as info:
        box.unexpose_port(8001)  # never exposed (any more)
    assert info.value.status_code == 404 and "8001" in str(info.value)
    box.unexpose_port(9000)
    box.expose_port(8001)
    assert httpx.get(path_url(gw, box, 8001, "hello.txt"), timeout=30).status_code == 200


def test_exclusive_keeps_koyebs_409(box: Sandbox) -> None:
    with pytest.raises(SandboxRequestError) as info:
        box.expose_port(7000, exclusive=True)
    assert info.value.status_code == 409
    assert info.value.body["current_port"] in ("8000", "8001", "8765")


def test_bad_input(box: Sandbox) -> None:
    for bad in (0, 70000, "abc", "8080", -1, 80.0, True, None):
        with pytest.raises(InvalidPortError):
            box.expose_port(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidPortError):
        box.unexpose_port(70000)
    with pytest.raises(SandboxRequestError) as info:
        box.unexpose_port(4242)
    assert info.value.status_code == 404 and "4242" in str(info.value)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _PeakRss:
    def __init__(self) -> None:
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.base


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_large_upload_is_streamed(gw: Gateway, box: Sandbox, chunked: bool) -> None:
    """200 MB through an exposed port; the server (in this process) holds no copy of it."""
    size = 200 * 1024 * 1024
    piece = os.urandom(1 << 20)
    expected = hashlib.sha256()
    for _ in range(size // len(piece)):
        expected.update(piece)

    def body() -> Iterator[bytes]:
        for _ in range(size // len(piece)):
            yield piece

    headers = {} if chunked else {"content-length": str(size)}
    watch = _PeakRss()
    started = time.monotonic()
    r = httpx.post(path_url(gw, box, 8000, "upload"), content=body(), headers=headers, timeout=120)
    elapsed = time.monotonic() - started
    grew = watch.stop()
    assert r.status_code == 200, r.text
    assert r.json() == {"size": size, "sha256": expected.hexdigest(), "chunked": chunked}
    print(
        f"\n200 MB upload ({'chunked' if chunked else 'content-length'}): {elapsed:.2f}s, "
        f"{size / elapsed / 1e6:.0f} MB/s, peak RSS growth {grew / 1e6:.1f} MB"
    )
    assert grew < 64 * 1024 * 1024, f"memory grew by {grew / 1e6:.0f} MB"


def test_slow_reader_gets_backpressure(gw: Gateway, box: Sandbox) -> None:
    """A client that stops reading a large streamed response: the gateway stops reading the
    sandbox (memory stays flat); when the client leaves, the sandbox's server sees it."""
    box.exec("rm -f /tmp/big-aborted")
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(
            f"GET /sandboxes/{box.id}/ports/8000/big?mb=1000 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        got = 0
        while got < 4 << 20:
            got += len(s.recv(1 << 20))
        watch = _PeakRss()
        time.sleep(2.0)  # not reading: 1000 MB would pile up somewhere without backpressure
        grew = watch.stop()
        for _ in range(20):  # it still flows
            got += len(s.recv(1 << 20))
    assert grew < 32 * 1024 * 1024, f"the server buffered {grew / 1e6:.0f} MB"
    deadline = time.monotonic() + 10
    while not box.filesystem.exists("/tmp/big-aborted"):
        assert time.monotonic() < deadline, "the sandbox's server never saw the client leave"
        time.sleep(0.2)


def test_slowloris_does_not_block_others(gw: Gateway, box: Sandbox) -> None:
    """Clients trickling their request heads (and one a body) byte by byte, while others get
    answers at the usual speed."""
    stop = threading.Event()
    request = (
        f"GET /sandboxes/{box.id}/ports/8000/slow HTTP/1.1\r\nHost: x\r\n"
        + "".join(f"X-Pad-{i}: {'a' * 20}\r\n" for i in range(50))
        + "\r\n"
    ).encode()
    upload = (
        f"POST /sandboxes/{box.id}/ports/8000/upload HTTP/1.1\r\nHost: x\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode() + b"z" * 1000

    def trickle(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            for i in range(len(data)):
                if stop.wait(0.02):
                    return
                s.sendall(data[i : i + 1])
            stop.wait()

    threads = [threading.Thread(target=trickle, args=(d,)) for d in [request] * 5 + [upload] * 3]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        times = []
        with httpx.Client(timeout=10) as c:
            for i in range(30):
                t0 = time.monotonic()
                r = c.get(path_url(gw, box, 8000, f"fast/{i}"))
                times.append(time.monotonic() - t0)
                assert r.status_code == 200
        times.sort()
        assert times[len(times) // 2] < 0.1 and times[-1] < 1.0, times
    finally:
        stop.set()
        for t in threads:
            t.join()


# -- WebSocket ----------------------------------------------------------------------------------


@pytest.mark.gvisor_default
def test_websocket_echo_path_and_host_form(gw: Gateway, box: Sandbox) -> None:
    """Bytes both ways: the 101 is the sandbox server's own (its headers reach the client)."""
    from websockets.sync.client import connect

    url = path_url(gw, box, 8765).replace("http://", "ws://")
    with connect(url, subprotocols=["echo.v1"]) as ws:  # type: ignore[list-item]
        assert ws.response is not None
        assert ws.response.headers["x-echo-server"] == "in-the-sandbox"
        assert ws.subprotocol == "echo.v1"
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        payload = os.urandom(300_000)
        ws.send(payload)
        assert ws.recv(timeout=10) == payload
    sock = socket.create_connection(("127.0.0.1", gw.port))
    with connect(f"ws://8765-{box.id}.{DOMAIN}/chat", sock=sock) as ws:
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=10) == b"\x00\x01binary"


def test_websocket_to_an_unexposed_or_dead_port(gw: Gateway, box: Sandbox) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as info:
        connect(path_url(gw, box, 8766).replace("http://", "ws://"))
    assert info.value.response.status_code == 404
    assert b"8766" in info.value.response.body
    box.expose_port(8767)
    try:
        with pytest.raises(InvalidStatus) as info:
            connect(path_url(gw, box, 8767).replace("http://", "ws://"))
        assert info.value.response.status_code == 502 and b"8767" in info.value.response.body
    finally:
        box.unexpose_port(8767)


MANY_WEBSOCKETS = int(os.environ.get("SANDLOT_TEST_WEBSOCKETS", "10000"))


async def _open_websocket(
    host: str, port: int, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare WebSocket client (handshake only): 10,000 of the ``websockets`` library's clients
    would cost this test more memory than the gateway under test."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101") and b"in-the-sandbox" in head, head
    return reader, writer


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str) -> str:
    data = text.encode()
    assert len(data) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    writer.write(bytes([0x81, 0x80 | len(data)]) + mask + masked)
    b0, b1 = await reader.readexactly(2)
    assert b0 == 0x81 and b1 < 126
    return (await reader.readexactly(b1)).decode()


def _relay_pids() -> list[int]:
    me = str(os.getpid())
    found = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me and b"relay_worker.py" in cmdline:
            found.append(int(proc.name))
    return found


def _rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_many_idle_websockets(gw: Gateway, box: Sandbox, request: pytest.FixtureRequest) -> None:
    """10,000 WebSockets open at once and idle; each still echoes afterwards. The gateway keeps
    no descriptor for them (they are in relay processes, which start as they fill up) and the
    agent none either (it handed the connections over)."""
    xfail_on_gvisor(request, gw.runtime, GVISOR_AGENT_RELAYS, run=False)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < MANY_WEBSOCKETS + 2000:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below what the test client needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port = "127.0.0.1", gw.port
    path = f"/sandboxes/{box.id}/ports/8765/"
    fds_before = len(os.listdir("/proc/self/fd"))

    async def run() -> tuple[float, int]:
        started = time.monotonic()
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(0, MANY_WEBSOCKETS, 200):  # opened 200 at a time
            batch = [_open_websocket(host, port, path) for _ in range(200)]
            conns += await asyncio.gather(*batch)
        opened = time.monotonic() - started
        await asyncio.sleep(2)  # idle
        # Everything is open: this process holds the clients' sockets and little else.
        held = len(os.listdir("/proc/self/fd")) - fds_before
        assert MANY_WEBSOCKETS <= held < MANY_WEBSOCKETS + 200, held
        relays = _relay_pids()
        assert len(relays) >= 1
        relay_rss = sum(_rss_of(pid) for pid in relays)
        echoed = await asyncio.gather(*(_echo(r, w, f"m{i}") for i, (r, w) in enumerate(conns)))
        assert echoed == [f"m{i}" for i in range(len(conns))]
        for _, w in conns:
            w.close()
        print(
            f"\n{len(conns)} WebSockets opened in {opened:.1f}s; {len(relays)} relay "
            f"processes, {relay_rss / 1e6:.0f} MB RSS together "
            f"({relay_rss / len(conns) / 1e3:.1f} kB per connection)"
        )
        return opened, relay_rss

    asyncio.run(run())
    # all closed: the relays let go of them, the sandbox still answers
    assert httpx.get(path_url(gw, box, 8000, "after"), timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while gw.server.app.state.ports.relays.open_connections:
        assert time.monotonic() < deadline, "relayed connections not reported closed"
        time.sleep(0.1)


def test_no_relay_is_a_clear_503(gw: Gateway, box: Sandbox) -> None:
    """If no relay process can take the connection, the upgrade is refused before anything is
    sent to the sandbox -- not accepted and then dropped."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from sandlot.server.gateway.relay import Relays

    ports = gw.server.app.state.ports
    relays, ports.relays = ports.relays, Relays(max_workers=0)
    try:
        with pytest.raises(InvalidStatus) as info:
            connect(path_url(gw, box, 8765).replace("http://", "ws://"))
        response = info.value.response
        assert response.status_code == 503
        assert json.loads(response.body)["code"] == "relay_unavailable"
    finally:
        ports.relays = relays


def test_unexposing_ends_open_websockets(gw: Gateway, box: Sandbox) -> None:
    """Unexposing revokes access now: WebSockets already open on the port are closed too."""
    path = f"/sandboxes/{box.id}/ports/8765/"

    async def run() -> None:
        reader, writer = await _open_websocket("127.0.0.1", gw.port, path)
        assert await _echo(reader, writer, "before") == "before"
        await asyncio.to_thread(box.unexpose_port, 8765)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

    try:
        asyncio.run(run())
    finally:
        box.expose_port(8765)
    deadline = time.monotonic() + 10
    while gw.server.app.state.ports.relays.open_connections:
        assert time.monotonic() < deadline, "the relayed connection was not reported closed"
        time.sleep(0.1)


# -- protection, lifecycle ----------------------------------------------------------------------


def test_protected_ports(gw: Gateway) -> None:
    with gw.create(protect_ports=True, idle_timeout=0) as sb:
        start_servers(sb, {8000: "app"})
        exposed = sb.expose_port(8000)
        token = exposed["token"]
        assert token
        url = exposed["exposed_at"] + "echo"
        r = httpx.get(url, timeout=30)
        assert r.status_code == 401 and "8000" in r.json()["error"]
        assert httpx.get(url, headers={"authorization": "Bearer nope"}).status_code == 401
        r = httpx.get(url, headers={"authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200
        assert "authorization" not in r.json()["headers"]  # the token stays outside
        r = httpx.get(url + f"?a=1&sandlot_token={token}", timeout=30)
        assert r.status_code == 200 and r.json()["path"] == "/echo?a=1"
        assert "set-cookie" not in r.headers  # path form: the server's origin is shared
        r = httpx.get(url, headers={"cookie": f"sandlot_port_token={token}; app=1"}, timeout=30)
        assert r.status_code == 200 and r.json()["headers"]["cookie"] == "app=1"
        r = host_get(gw, sb, 8000, "/echo", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert host_get(gw, sb, 8000, "/echo").status_code == 401
        r = host_get(gw, sb, 8000, f"/echo?sandlot_token={token}")
        assert r.status_code == 200 and r.json()["path"] == "/echo"
        assert r.headers["set-cookie"].startswith("sandlot_port_token=")  # host form: own origin
        # another sandbox's token is no key to this port
        with gw.create(protect_ports=True, idle_timeout=0) as other:
            other_token = other.expose_port(8000)["token"]
            assert other_token != token
            r = httpx.get(url, headers={"authorization": f"Bearer {other_token}"}, timeout=30)
            assert r.status_code == 401


def test_sleeping_sandbox_wakes_on_its_port(gw: Gateway) -> None:
    with gw.create(idle_timeout=1, _experimental_enable_light_sleep=True) as sb:
        start_servers(sb, {8000: "app"})
        sb.expose_port(8000)
        deadline = time.monotonic() + 20
        while sb.refresh().status != "sleeping":
            assert time.monotonic() < deadline, "never fell asleep"
            time.sleep(0.2)
        r = httpx.get(path_url(gw, sb, 8000, "wake"), timeout=30)
        assert r.status_code == 200 and r.json()["path"] == "/wake"
        assert sb.refresh().status == "running"
        assert any(e["kind"] == "woke" for e in sb.events())


# -- TCP proxy ----------------------------------------------------------------------------------


def _echo_through(host: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=20) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_tcp_proxy(gw: Gateway) -> None:
    with gw.create(enable_tcp_proxy=True, idle_timeout=0) as sb:
        start_servers(sb, {9000: "tcp", 8000: "app"})
        assert sb.wait_tcp_proxy_ready(timeout=10)
        info = sb.get_tcp_proxy_info()
        assert info is not None and info[0] == "127.0.0.1"
        host, port = info
        # nothing bound yet: the connection is closed at once
        assert _echo_through(host, port, b"x") == b""
        sb.expose_port(9000)
        payload = os.urandom(1_000_000)
        assert _echo_through(host, port, payload) == payload + b"|total=1000000"
        # several bound ports: the first one bound stays the target
        sb.expose_port(8000)
        assert _echo_through(host, port, b"abc") == b"abc|total=3"
        sb.unexpose_port(9000)
        raw = _echo_through(host, port, b"GET /via-proxy HTTP/1.0\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200") and b'"/via-proxy"' in raw
    # the listener goes with the sandbox
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            break
        assert time.monotonic() < deadline, "TCP proxy still listening after delete"
        time.sleep(0.2)


def test_tcp_proxy_info_in_listing(gw: Gateway, box: Sandbox) -> None:
    assert box.get_tcp_proxy_info() is None  # created without enable_tcp_proxy
    auth = {"authorization": f"Bearer {gw.token}"}
    with httpx.Client(base_url=gw.url, headers=auth, timeout=60) as c:  # (a busy machine)
        data = c.get(f"/v1/sandboxes/{box.id}/ports").json()
    assert data["tcp_proxy"] is None and data["domain"] == DOMAIN
    assert json.dumps(data)  # plain JSON


def test_h2c_upgrade_request_is_answered_in_http11(gw: Gateway, box: Sandbox) -> None:
    """An h2c upgrade request reaches the sandbox's server as it is; one that does not speak
    HTTP/2 answers in HTTP/1.1, which RFC 7540 allows."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
        s.sendall(
            f"GET /sandboxes/{box.id}/ports/8000/h2c HTTP/1.1\r\nHost: x\r\n"
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".encode()
        )
        data = b""
        while b'"/h2c"' not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert b'"/h2c"' in data


def test_ports_bound_at_the_agent_follow(gw: Gateway, box: Sandbox) -> None:
    """Koyeb's SDK binds with the agent's /bind_port (through the agent gateway): such a port is
    exposed too, and unbinding it there unexposes it."""
    box.launch_process("python3 -m http.server 8002 --bind 127.0.0.1 --directory /srv/www")
    assert box.exec("python3 /srv/wait.py 8002").exit_code == 0
    agent = f"{gw.url}/sandboxes/{box.id}/koyeb-sandbox"
    auth = {"authorization": f"Bearer {box.secret}"}

    def status_within(expected: int) -> int:
        deadline = time.monotonic() + 10
        while True:
            status = httpx.get(path_url(gw, box, 8002, "hello.txt"), timeout=30).status_code
            if status == expected or time.monotonic() > deadline:
                return status
            time.sleep(0.2)

    r = httpx.post(f"{agent}/bind_port", json={"port": "8002", "multi": True}, headers=auth)
    assert r.status_code == 200
    assert status_within(200) == 200
    assert 8002 in {p["port"] for p in box.list_exposed_ports()}
    r = httpx.post(f"{agent}/unbind_port", json={"port": "8002"}, headers=auth)
    assert r.status_code == 200
    assert status_within(404) == 404


def test_deep_sleep_keeps_exposed_ports(gw: Gateway) -> None:
    """Deep sleep ends the sandbox's processes (and the agent's bound-port list with them); on
    waking, the stored ports are bound again, so the TCP proxy still finds its port."""
    with gw.create(enable_tcp_proxy=True, idle_timeout=1) as sb:
        start_servers(sb, {9000: "tcp"})
        sb.expose_port(9000)
        host, port = sb.get_tcp_proxy_info() or ("", 0)
        assert _echo_through(host, port, b"before") == b"before|total=6"
        deadline = time.monotonic() + 30
        while sb.refresh().status != "sleeping":
            assert time.monotonic() < deadline, "never fell asleep"
            time.sleep(0.2)
        # the first connection wakes it; the echo server died with the deep sleep
        assert _echo_through(host, port, b"x") == b""
        agent = sb.get_sandbox_url()
        r = httpx.get(f"{agent}/bound_ports", headers={"authorization": f"Bearer {sb.secret}"})
        assert r.json()["ports"] == ["9000"]
        sb.update_lifecycle(idle_timeout=0)
        start_servers(sb, {9000: "tcp"})
        assert _echo_through(host, port, b"after") == b"after|total=5"


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def test_h2c_prior_knowledge_through_the_tcp_proxy(gw: Gateway) -> None:
    """HTTP/2 cleartext with prior knowledge (what gRPC does) to a sandbox created with
    exposed_port_protocol="http2": the TCP proxy carries its bytes unchanged."""
    with gw.create(enable_tcp_proxy=True, exposed_port_protocol="http2", idle_timeout=0) as sb:
        start_servers(sb, {8443: "h2c"})
        assert sb.expose_port(8443)["protocol"] == "http2"
        host, port = sb.get_tcp_proxy_info() or ("", 0)
        # HPACK without Huffman: :method GET, :scheme http, :path /grpc-ish, :authority x
        block = b"\x82\x86" + b"\x44\x09/grpc-ish" + b"\x41\x01x"
        with socket.create_connection((host, port), timeout=20) as s:
            s.sendall(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                + _h2_frame(4, 0, 0)  # SETTINGS
                + _h2_frame(1, 0x4 | 0x1, 1, block)  # HEADERS, END_HEADERS | END_STREAM
            )
            frames: list[tuple[int, int, int, bytes]] = []
            buf = b""
            while not any(k == 0 and f & 1 for k, f, _, _ in frames):
                chunk = s.recv(65536)
                assert chunk, frames
                buf += chunk
                while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                    n = int.from_bytes(buf[:3], "big")
                    stream = int.from_bytes(buf[5:9], "big")
                    frames.append((buf[3], buf[4], stream, buf[9 : 9 + n]))
                    buf = buf[9 + n :]
        kinds = [(k, f, st) for k, f, st, _ in frames]
        assert (4, 0, 0) in kinds and (4, 1, 0) in kinds  # server SETTINGS, and ACK of ours
        assert (1, 4, 1, b"\x88") in frames  # :status 200 on stream 1
        assert (0, 1, 1, b"h2c says hello to /grpc-ish") in frames


def test_websocket_relay_under_any_asgi_server(local_server: RunningServer, box: Sandbox) -> None:
    """Served by an ASGI server without sandlot's WebSocket protocol class, the gateway relays
    messages instead of bytes: the same echo works (the 101 is then the server's own)."""
    from websockets.sync.client import connect

    tmp = Path(tempfile.mkdtemp(prefix="sl-ports-asgi-"))
    srv = start_server(
        local_server.engine, f"sqlite:///{tmp / 'db'}", raw_websockets=False, tcp=True
    )
    try:
        _, token = srv.app.state.control.store.create_token("ports", "test")
        with Sandbox.create(api_url=srv.url, api_token=token, idle_timeout=0) as sb:
            start_servers(sb, {8765: "ws"})
            url = sb.expose_port(8765)["exposed_at"].replace("http://", "ws://")
            with connect(url, subprotocols=["echo.v1"]) as ws:  # type: ignore[list-item]
                assert ws.response is not None
                assert "x-echo-server" not in ws.response.headers
                assert ws.subprotocol == "echo.v1"
                ws.send("relayed")
                assert ws.recv(timeout=10) == "relayed"
                ws.send(b"\x00" * 100_000)
                assert ws.recv(timeout=10) == b"\x00" * 100_000
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _read_h2_frames(s: socket.socket, buf: bytes = b"") -> list[tuple[int, int, int, bytes]]:
    """Frames until a DATA frame ends a stream."""
    frames: list[tuple[int, int, int, bytes]] = []
    while not any(k == 0 and f & 1 for k, f, _, _ in frames):
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n = int.from_bytes(buf[:3], "big")
            frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big"), buf[9 : 9 + n]))
            buf = buf[9 + n :]
        if any(k == 0 and f & 1 for k, f, _, _ in frames):
            break
        chunk = s.recv(65536)
        assert chunk, frames
        buf += chunk
    return frames


@pytest.mark.parametrize("form", ["path", "host"])
def test_h2c_upgrade_passes_through(gw: Gateway, form: str) -> None:
    """``Upgrade: h2c`` to an exposed port: the sandbox's h2c server answers 101 itself and the
    HTTP/2 connection that follows goes through as bytes (the first request is stream 1)."""
    with gw.create(exposed_port_protocol="http2", idle_timeout=0) as sb:
        start_servers(sb, {8443: "h2c"})
        sb.expose_port(8443)
        if form == "path":
            target, host = f"/sandboxes/{sb.id}/ports/8443/upgraded", "x"
        else:
            target, host = "/upgraded", f"8443-{sb.id}.{DOMAIN}"
        with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
            s.sendall(
                f"GET {target} HTTP/1.1\r\nHost: {host}\r\n"
                "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(65536)
                assert chunk, head
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0))
            frames = _read_h2_frames(s, rest)
        assert (1, 4, 1, b"\x88") in frames  # :status 200 on stream 1
        assert (0, 1, 1, b"h2c says hello to /upgraded") in frames


def test_path_form_on_the_unix_socket_server(api_url: str, local_server: RunningServer) -> None:
    """The default local server (a Unix socket): exposed_at is an http+unix URL whose path
    works over that socket."""
    with Sandbox.create(idle_timeout=0) as sb:
        start_servers(sb, {8000: "app"})
        exposed = sb.expose_port(8000)
        assert exposed["exposed_at"].startswith("http+unix://")
        assert exposed["host_url"] is None  # no --domain
        path = exposed["exposed_at"].split("/sandboxes/", 1)[1]
        transport = httpx.HTTPTransport(uds=local_server.unix_path)
        with httpx.Client(transport=transport, base_url="http://sandlot") as c:
            r = c.get(f"/sandboxes/{path}echo")
        assert r.status_code == 200 and r.json()["path"] == "/echo"
