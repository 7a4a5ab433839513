"""HTTP/2 through the ports gateway (issue 7): HTTP/2 clients with prior knowledge at the server
(h2serve.py) and h2c to sandboxes created with ``exposed_port_protocol="http2"``
(h2upstream.py). Real sandboxes run a real h2c server (the ``h2`` library copied into them,
tests/sdk/sandbox_servers.py's H2_APP, and grpcio); clients are httpx (HTTP/2 and HTTP/1.1),
curl, grpcio and a raw ``h2`` client where a test needs frames (trailers, resets, malformed
input)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from sandbox_servers import H2_APP, upload_h2
from support.runtimes import FULL_FORM, selected_runtimes
from support.server import RunningServer, start_server
from test_ports import DOMAIN, Gateway, _PeakRss, gw, path_url, start_servers

from sandlot import Sandbox
from sandlot.server.gateway.h2upstream import CONNECTION_WINDOW
from sandlot.server.runner.h2serve import MAX_STREAMS

pytestmark = pytest.mark.root

__all__ = ["gw"]  # the gateway fixture, shared with test_ports.py


@pytest.fixture(scope="module", autouse=True)
def _runtime_selected_here(gw: Gateway) -> None:
    """No case here is in gVisor's default part: a runtime this run leaves out is skipped
    before the module's sandboxes are made (they ran on gVisor in every run: +1 min)."""
    chosen = selected_runtimes()
    if gw.runtime not in (chosen if chosen is not None else ["crun"]):
        pytest.skip(FULL_FORM if chosen is None else f"{gw.runtime} is not selected")


H2_PORT = 8443
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def start_h2_app(sb: Sandbox, port: int = H2_PORT) -> None:
    sb.filesystem.write_file("/srv/h2app.py", H2_APP)
    sb.launch_process(f"python3 /srv/h2app.py {port}")
    start_servers(sb, {})  # writes the helpers; the wait below is for our port
    result = sb.exec(f"python3 /srv/wait.py {port}")
    assert result.exit_code == 0, result.stderr


@pytest.fixture(scope="module")
def h2box(gw: Gateway) -> Iterator[Sandbox]:
    """A sandbox made with exposed_port_protocol="http2", its h2c server on 8443, exposed."""
    sb = gw.create(exposed_port_protocol="http2", idle_timeout=0)
    try:
        upload_h2(sb)
        start_h2_app(sb)
        assert sb.expose_port(H2_PORT)["protocol"] == "http2"
        yield sb
    finally:
        sb.delete()


@pytest.fixture(scope="module")
def h1box(gw: Gateway) -> Iterator[Sandbox]:
    """An HTTP/1.1 sandbox (Python's http.server on 8001), for HTTP/2 clients of HTTP/1.1
    ports."""
    sb = gw.create(idle_timeout=0)
    try:
        start_servers(sb, {8001: "www", 8000: "app"})
        sb.expose_port(8001)
        sb.expose_port(8000)
        yield sb
    finally:
        sb.delete()


def h2_client(gw: Gateway, **kwargs: Any) -> httpx.Client:
    """httpx speaking HTTP/2 with prior knowledge (no TLS: no ALPN, so prior knowledge)."""
    return httpx.Client(http1=False, http2=True, timeout=60, **kwargs)


def host_headers(sb: Sandbox, port: int = H2_PORT) -> dict[str, str]:
    return {"host": f"{port}-{sb.id}.{DOMAIN}"}


# -- a raw HTTP/2 client, for what httpx hides (trailers, resets, bad frames) -------------------


@dataclass
class Answer:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: bool = False


class RawH2:
    """A blocking h2 client on one socket to the gateway."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.flush()
        self.answers: dict[int, Answer] = {}
        self.ended: set[int] = set()
        self.goaway: h2.events.ConnectionTerminated | None = None

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def start(
        self,
        path: str,
        authority: str = "gw",
        extra: tuple[tuple[str, str], ...] = (),
        send: bool = True,
    ) -> int:
        sid = self.h2.get_next_available_stream_id()
        headers = [(":method", "GET"), (":scheme", "http"), (":authority", authority)]
        self.h2.send_headers(sid, [*headers, (":path", path), *extra], end_stream=True)
        if send:
            self.flush()
        self.answers[sid] = Answer()
        return sid

    def pump(self) -> bool:
        """Read once and process; False when the connection is closed."""
        data = self.sock.recv(65536)
        if not data:
            return False
        for event in self.h2.receive_data(data):
            sid = getattr(event, "stream_id", None)
            answer = self.answers.get(sid or 0)
            if isinstance(event, h2.events.ResponseReceived) and answer is not None:
                answer.headers = dict(event.headers)
                answer.status = int(answer.headers[b":status"])
            elif isinstance(event, h2.events.DataReceived) and answer is not None:
                answer.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.TrailersReceived) and answer is not None:
                answer.trailers = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(sid or 0)
            elif isinstance(event, h2.events.StreamReset) and answer is not None:
                answer.reset = True
                self.ended.add(sid or 0)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
        self.flush()
        return True

    def get(self, path: str, **kwargs: Any) -> Answer:
        sid = self.start(path, **kwargs)
        while sid not in self.ended:
            assert self.pump(), "connection closed"
        return self.answers[sid]

    def close(self) -> None:
        self.sock.close()


# -- HTTP/2 clients → http2 port --------------------------------------------------------------


def test_h2_client_path_and_host_form(gw: Gateway, h2box: Sandbox) -> None:
    with h2_client(gw) as c:
        r = c.get(path_url(gw, h2box, H2_PORT, "echo/a%20b?x=1"))
        assert r.status_code == 200, r.text
        assert r.http_version == "HTTP/2"
        seen = r.json()
        assert seen["path"] == "/echo/a%20b?x=1"
        assert seen["headers"][":authority"] == f"127.0.0.1:{gw.port}"
        assert seen["headers"]["x-forwarded-prefix"] == f"/sandboxes/{h2box.id}/ports/{H2_PORT}"
        # host form: the authority routes it, and the sandbox sees it as its :authority
        r = c.get(f"{gw.url}/echo?z=1", headers=host_headers(h2box))
        assert r.status_code == 200 and r.http_version == "HTTP/2", r.text
        seen = r.json()
        assert seen["path"] == "/echo?z=1"
        assert seen["headers"][":authority"] == f"{H2_PORT}-{h2box.id}.{DOMAIN}"
        assert "x-forwarded-prefix" not in seen["headers"]


def test_http11_client_to_an_http2_port(gw: Gateway, h2box: Sandbox) -> None:
    """An HTTP/1.1 client of an http2 port: the gateway translates (the sandbox's server speaks
    HTTP/2 only)."""
    r = httpx.get(path_url(gw, h2box, H2_PORT, "plain?q=1"), timeout=30)
    assert r.status_code == 200 and r.http_version == "HTTP/1.1", r.text
    seen = r.json()
    assert seen["method"] == "GET" and seen["path"] == "/plain?q=1"
    assert seen["headers"][":scheme"] == "http"
    assert "connection" not in seen["headers"]
    r = httpx.post(path_url(gw, h2box, H2_PORT, "up"), content=b"x" * 100_000, timeout=30)
    assert r.json() == {"size": 100_000, "sha256": hashlib.sha256(b"x" * 100_000).hexdigest()}


def test_curl_prior_knowledge(gw: Gateway, h2box: Sandbox, h1box: Sandbox) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    for url in (path_url(gw, h2box, H2_PORT, "curl"), path_url(gw, h1box, 8001, "hello.txt")):
        out = subprocess.run(
            [curl, "-sS", "--http2-prior-knowledge", "-w", "\n%{http_version}", url],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        body, version = out.rsplit("\n", 1)
        assert version == "2", out
        assert '"/curl"' in body or body == "hello from the sandbox\n", out


def test_many_concurrent_streams_share_connections(gw: Gateway, h2box: Sandbox) -> None:
    """100 requests at once on one client connection, multiplexed by the gateway over one
    connection to the sandbox's server."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(http1=False, http2=True, limits=limits, timeout=60) as c:
            urls = [path_url(gw, h2box, H2_PORT, f"n/{i}") for i in range(100)]
            return await asyncio.gather(*(c.get(u) for u in urls))

    responses = asyncio.run(run())
    assert [r.json()["path"] for r in responses] == [f"/n/{i}" for i in range(100)]
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert len({r.json()["conn"] for r in responses}) == 1


def test_large_upload_and_download_are_streamed(gw: Gateway, h2box: Sandbox) -> None:
    """200 MB up and 200 MiB down through an HTTP/2 client and an http2 port, with the server's
    memory (this process) flat."""
    size = 200 * 1000 * 1000
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    sent = 0
    while sent < size:
        piece = block[: min(len(block), size - sent)]
        digest.update(piece)
        sent += len(piece)

    def body() -> Iterator[bytes]:
        left = size
        while left:
            piece = block[: min(len(block), left)]
            left -= len(piece)
            yield piece

    watch = _PeakRss()
    with h2_client(gw) as c:
        r = c.post(path_url(gw, h2box, H2_PORT, "upload"), content=body())
        assert r.status_code == 200, r.text
        assert r.json() == {"size": size, "sha256": digest.hexdigest()}
        received = 0
        with c.stream("GET", path_url(gw, h2box, H2_PORT, "big?mb=200")) as r:
            assert r.status_code == 200 and r.headers["content-length"] == str(200 << 20)
            for chunk in r.iter_raw():
                received += len(chunk)
        assert received == 200 << 20
    grew = watch.stop()
    assert grew < 64 << 20, f"the server grew by {grew / 1e6:.0f} MB"
    # and HTTP/1.1 → http2, chunked upload
    r = httpx.post(path_url(gw, h2box, H2_PORT, "upload"), content=body(), timeout=120)
    assert r.json()["size"] == size


def test_aborted_downloads_give_the_window_back(gw: Gateway, h2box: Sandbox) -> None:
    """Clients that leave mid-download: their streams are reset and the DATA already received
    for them is acknowledged, so the shared connection to the sandbox (16 MiB window, 1 MiB per
    stream) keeps its window."""
    conn = httpx.get(path_url(gw, h2box, H2_PORT, "which"), timeout=30).json()["conn"]
    for _ in range(40):
        with httpx.stream("GET", path_url(gw, h2box, H2_PORT, "big?mb=64"), timeout=30) as r:
            next(r.iter_raw())
    with httpx.stream("GET", path_url(gw, h2box, H2_PORT, "big?mb=32"), timeout=30) as r:
        assert sum(len(c) for c in r.iter_raw()) == 32 << 20  # (a stall: ReadTimeout)
    assert httpx.get(path_url(gw, h2box, H2_PORT, "which"), timeout=30).json()["conn"] == conn
    # Each abandoned stream had up to a stream window of DATA queued: unacknowledged, 40 of
    # them would have left the connection's window (as the gateway advertises it) far below
    # half; acknowledged, it is topped up again.
    pool = gw.server.app.state.ports.pools._pools[(h2box.id, H2_PORT)]
    assert pool._conn.h2.inbound_flow_control_window >= CONNECTION_WINDOW // 2


def test_trailers_reach_an_http2_client(gw: Gateway, h2box: Sandbox) -> None:
    client = RawH2(gw.port)
    try:
        answer = client.get(
            f"/sandboxes/{h2box.id}/ports/{H2_PORT}/trailers", extra=(("te", "trailers"),)
        )
    finally:
        client.close()
    assert answer.status == 200 and answer.body == b"payload"
    assert answer.headers[b"content-type"] == b"application/grpc"
    assert answer.trailers == {b"grpc-status": b"0", b"x-sum": b"42"}
    # An HTTP/1.1 client gets the body (its server does not offer trailers).
    r = httpx.get(path_url(gw, h2box, H2_PORT, "trailers"), timeout=30)
    assert r.status_code == 200 and r.content == b"payload"


def test_client_reset_reaches_the_sandbox(gw: Gateway, h2box: Sandbox) -> None:
    client = RawH2(gw.port)
    try:
        sid = client.start(f"/sandboxes/{h2box.id}/ports/{H2_PORT}/forever")
        while len(client.answers[sid].body) < 10_000:
            assert client.pump()
        client.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        client.flush()
        # the same connection goes on
        answer = client.get(f"/sandboxes/{h2box.id}/ports/{H2_PORT}/after-reset")
        assert answer.status == 200 and b"/after-reset" in answer.body
    finally:
        client.close()
    # answered once the sandbox's server has seen /forever's stream reset
    r = httpx.get(path_url(gw, h2box, H2_PORT, "resets/forever"), timeout=30)
    assert "/forever" in r.json()


def test_slow_http2_reader_gets_backpressure(gw: Gateway, h2box: Sandbox) -> None:
    """An HTTP/2 client that stops reading (its 64 KiB windows stay closed) a large response
    from an http2 port: the gateway stops taking DATA from the sandbox (memory flat); it flows
    again when the client reads, and resetting the stream reaches the sandbox's server."""
    client = RawH2(gw.port)
    try:
        sid = client.start(f"/sandboxes/{h2box.id}/ports/{H2_PORT}/big?mb=1000")
        while len(client.answers[sid].body) < 4 << 20:
            assert client.pump()
        client.answers[sid].body = b""
        watch = _PeakRss()
        time.sleep(2.0)  # not reading: 1000 MiB would pile up somewhere without backpressure
        grew = watch.stop()
        while len(client.answers[sid].body) < 4 << 20:  # it still flows
            assert client.pump()
        client.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        client.flush()
    finally:
        client.close()
    assert grew < 32 << 20, f"the server buffered {grew / 1e6:.0f} MB"
    r = httpx.get(path_url(gw, h2box, H2_PORT, "resets/big?mb=1000"), timeout=30)
    assert "/big?mb=1000" in r.json()


def test_nothing_listening_is_502_naming_the_port(gw: Gateway, h2box: Sandbox) -> None:
    h2box.expose_port(8099)
    try:
        with h2_client(gw) as c:
            r = c.get(path_url(gw, h2box, 8099))
            assert r.status_code == 502 and r.http_version == "HTTP/2"
            assert r.json()["code"] == "bad_gateway" and "8099" in r.json()["error"]
        r = httpx.get(path_url(gw, h2box, 8099), timeout=30)
        assert r.status_code == 502 and "8099" in r.json()["error"]
    finally:
        h2box.unexpose_port(8099)


def test_sandbox_server_gone_then_back(gw: Gateway, h2box: Sandbox) -> None:
    """The h2c connection to the sandbox is lost: new requests get a 502, and once a server
    listens again the gateway reconnects."""
    url = path_url(gw, h2box, H2_PORT, "x")
    assert httpx.get(url, timeout=30).status_code == 200  # a live upstream connection
    h2box.exec("pkill -f h2app.py")
    r = httpx.get(url, timeout=30)
    assert r.status_code == 502 and str(H2_PORT) in r.json()["error"], r.text
    start_h2_app(h2box)
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.json()["path"] == "/x"


#: A sandbox server that breaks HTTP/2: its SETTINGS, then the header of a 16 MiB DATA frame.
OVERSIZED_FRAME_SERVER = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(16)
held = []
while True:
    conn, _ = srv.accept()
    conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01")
    held.append(conn)
"""


def test_sandbox_server_announcing_a_huge_frame_is_a_502(gw: Gateway, h2box: Sandbox) -> None:
    """The sandbox's server is untrusted too: a frame over the size the gateway allows ends
    that connection at its header (not after 16 MiB were buffered), and the client gets a 502."""
    h2box.filesystem.write_file("/srv/bad_h2.py", OVERSIZED_FRAME_SERVER)
    h2box.launch_process("python3 /srv/bad_h2.py 8444")
    assert h2box.exec("python3 /srv/wait.py 8444").exit_code == 0
    h2box.expose_port(8444)
    try:
        r = httpx.get(path_url(gw, h2box, 8444, "x"), timeout=30)
        assert r.status_code == 502, r.text
        assert "8444" in r.json()["error"] and "oversized" in r.json()["error"]
    finally:
        h2box.unexpose_port(8444)


#: A gRPC server (grpcio, copied into the sandbox) with raw-bytes methods, no protobuf: a unary
#: echo that sets trailing metadata, a bidirectional stream, and a method that fails.
GRPC_SERVER = r"""
import sys
sys.path.insert(0, "/srv/grpclib")
from concurrent import futures
import grpc


def echo(request, context):
    context.set_trailing_metadata((("x-echo-len", str(len(request))),))
    return b"echo:" + request


def chat(requests, context):
    for message in requests:
        yield message.upper()


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing in the sandbox")


handler = grpc.method_handlers_generic_handler("sandlot.Test", {
    "Echo": grpc.unary_unary_rpc_method_handler(echo),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
})
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""


def test_grpc_end_to_end(gw: Gateway, h2box: Sandbox) -> None:
    """grpcio at both ends (the server copied into the sandbox): unary with trailing metadata,
    a bidirectional stream, and an error status (a trailers-only response), host form."""
    grpc = pytest.importorskip("grpc")
    import typing_extensions

    files: dict[str, bytes] = {}
    root = Path(grpc.__file__).parent
    for path in root.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            files[f"/srv/grpclib/grpc/{path.relative_to(root)}"] = path.read_bytes()
    files["/srv/grpclib/typing_extensions.py"] = Path(typing_extensions.__file__).read_bytes()
    files["/srv/grpc_server.py"] = GRPC_SERVER.encode()
    dirs = sorted({str(Path(p).parent) for p in files})
    assert h2box.exec("mkdir -p " + " ".join(dirs)).exit_code == 0
    h2box.filesystem.write_files(files)
    h2box.launch_process("python3 /srv/grpc_server.py 50051")
    assert h2box.exec("python3 /srv/wait.py 50051", timeout=60).exit_code == 0
    h2box.expose_port(50051)
    authority = f"50051-{h2box.id}.{DOMAIN}"
    channel = grpc.insecure_channel(
        f"127.0.0.1:{gw.port}", options=[("grpc.default_authority", authority)]
    )
    try:
        echo = channel.unary_unary("/sandlot.Test/Echo")
        answer, call = echo.with_call(b"hello", timeout=30)
        assert answer == b"echo:hello"
        assert ("x-echo-len", "5") in list(call.trailing_metadata())
        chat = channel.stream_stream("/sandlot.Test/Chat")
        assert list(chat(iter([b"one", b"two", b"three"]), timeout=30)) == [
            b"ONE",
            b"TWO",
            b"THREE",
        ]
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/sandlot.Test/Fail")(b"", timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "no such thing in the sandbox"
    finally:
        channel.close()
        h2box.unexpose_port(50051)


# -- HTTP/2 clients → HTTP/1.1 ports, protection, the API ---------------------------------------


def test_h2_client_to_an_http11_port(gw: Gateway, h1box: Sandbox) -> None:
    with h2_client(gw) as c:
        r = c.get(path_url(gw, h1box, 8001, "hello.txt"))
        assert r.status_code == 200 and r.text == "hello from the sandbox\n"
        assert r.http_version == "HTTP/2"
        r = c.get(f"{gw.url}/echo", headers=host_headers(h1box, 8000))
        assert r.json()["headers"]["host"] == f"8000-{h1box.id}.{DOMAIN}"
        r = c.post(path_url(gw, h1box, 8000, "up"), content=iter([b"y" * 1_000_000] * 3))
        assert r.json()["size"] == 3_000_000 and r.json()["chunked"] is True
        r = c.get(path_url(gw, h1box, 9999))
        assert r.status_code == 404 and "9999" in r.json()["error"]


def test_http2_client_reset_closes_the_http11_tunnel(gw: Gateway, h1box: Sandbox) -> None:
    """An HTTP/2 client resetting a stream to an HTTP/1.1 port: the gateway closes that tunnel,
    which is how the sandbox's server learns its client left."""
    h1box.exec("rm -f /tmp/big-aborted")
    client = RawH2(gw.port)
    try:
        sid = client.start(f"/sandboxes/{h1box.id}/ports/8000/big?mb=1000")
        while len(client.answers[sid].body) < 1 << 20:
            assert client.pump()
        client.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        client.flush()
        assert client.get("/v1/health").status == 200  # the connection goes on
    finally:
        client.close()
    deadline = time.monotonic() + 10
    while not h1box.filesystem.exists("/tmp/big-aborted"):  # the app notes it in a file
        assert time.monotonic() < deadline, "the sandbox's server never saw the client leave"
        time.sleep(0.2)


def test_sse_reaches_an_http2_client_unbuffered(gw: Gateway, h1box: Sandbox) -> None:
    arrivals: list[float] = []
    with h2_client(gw) as c, c.stream("GET", path_url(gw, h1box, 8000, "sse")) as r:
        assert r.http_version == "HTTP/2" and r.headers["content-type"] == "text/event-stream"
        start = time.monotonic()
        for line in r.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 4
    assert arrivals[0] < 0.3, arrivals  # the first event did not wait for the others
    assert all(b - a > 0.2 for a, b in itertools.pairwise(arrivals)), arrivals


def test_protected_port_over_h2(gw: Gateway) -> None:
    with gw.create(protect_ports=True, idle_timeout=0) as sb:
        start_servers(sb, {8000: "app"})
        token = sb.expose_port(8000)["token"]
        url = path_url(gw, sb, 8000, "echo")
        with h2_client(gw) as c:
            r = c.get(url)
            assert r.status_code == 401 and "8000" in r.json()["error"]
            assert c.get(url, headers={"authorization": "Bearer nope"}).status_code == 401
            r = c.get(url, headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200 and r.http_version == "HTTP/2"
            assert "authorization" not in r.json()["headers"]
            r = c.get(f"{gw.url}/echo?sandlot_token={token}", headers=host_headers(sb, 8000))
            assert r.status_code == 200 and r.json()["path"] == "/echo"
        # Cookies split over several header fields (as browsers send them over HTTP/2): joined,
        # so the token cookie is found and stripped, the others reach the sandbox.
        client = RawH2(gw.port)
        try:
            cookies = (("cookie", "app=1"), ("cookie", f"sandlot_port_token={token}"))
            answer = client.get(f"/sandboxes/{sb.id}/ports/8000/echo", extra=cookies)
        finally:
            client.close()
        assert answer.status == 200, answer.body
        assert json.loads(answer.body)["headers"]["cookie"] == "app=1"


def test_control_api_over_h2c(gw: Gateway, h2box: Sandbox) -> None:
    auth = {"authorization": f"Bearer {gw.token}"}
    with h2_client(gw) as c:
        r = c.get(f"{gw.url}/v1/health")
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        r = c.get(f"{gw.url}/v1/sandboxes/{h2box.id}", headers=auth)
        assert r.status_code == 200 and r.json()["id"] == h2box.id
        assert c.get(f"{gw.url}/v1/sandboxes/{h2box.id}").status_code == 401
        r = c.get(f"{gw.url}/v1/sandboxes/{h2box.id}/ports", headers=auth)
        assert [p["protocol"] for p in r.json()["ports"]] == ["http2"]


def test_h2c_on_the_unix_socket_server(local_server: RunningServer) -> None:
    """`sandlot server`'s default listener, the Unix socket, speaks HTTP/2 too."""
    assert local_server.unix_path is not None
    transport = httpx.HTTPTransport(uds=local_server.unix_path, http1=False, http2=True)
    with httpx.Client(transport=transport, base_url="http://sandlot", timeout=30) as c:
        r = c.get("/v1/sandboxes")
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        assert "sandboxes" in r.json()


# -- bad clients ----------------------------------------------------------------------------------


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each frame in ``data``."""
    out = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        out.append(
            (data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9 : 9 + length])
        )
        data = data[9 + length :]
    return out


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd",  # DATA on stream 0
        b"\xff" * 64,  # not frames at all (a 16 MiB frame announced)
        b"\x00\x40\x01\x00\x00\x00\x00\x00\x01",  # 16385 bytes: over the frame size
        b"\x00\x00\x02\x01\x05\x00\x00\x00\x01\xff\xff",  # HEADERS with an undecodable block
    ],
    ids=["data-on-stream-0", "noise", "oversized-frame", "bad-hpack"],
)
def test_malformed_client_gets_goaway(gw: Gateway, garbage: bytes) -> None:
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        sock.sendall(PREFACE + settings + garbage)
        frames = _frames(_read_until_closed(sock))
    goaways = [f for f in frames if f[0] == 7]
    assert goaways, frames
    error_code = int.from_bytes(goaways[0][3][4:8], "big")
    assert error_code != 0  # an error, named
    with h2_client(gw) as c:  # the server is fine
        assert c.get(f"{gw.url}/v1/health").status_code == 200


def test_oversized_headers_get_goaway(gw: Gateway) -> None:
    client = RawH2(gw.port)
    try:
        client.start("/v1/health", extra=(("x-big", "a" * 100_000),))
        while client.pump():
            pass
    finally:
        client.close()
    assert client.goaway is not None and client.goaway.error_code != 0
    with h2_client(gw) as c:
        assert c.get(f"{gw.url}/v1/health").status_code == 200


def test_too_many_streams_get_goaway(gw: Gateway) -> None:
    """More concurrent streams than the server allows (sent before its SETTINGS arrived, so the
    client's h2 does not hold them back): GOAWAY, and the server goes on."""
    client = RawH2(gw.port)
    try:
        for _ in range(MAX_STREAMS + 2):
            client.start("/v1/health", send=False)
        client.flush()  # all at once: none can finish before the server sees the last
        while client.pump():
            pass
    finally:
        client.close()
    assert client.goaway is not None and client.goaway.error_code != 0
    with h2_client(gw) as c:
        assert c.get(f"{gw.url}/v1/health").status_code == 200


def test_first_bytes_like_the_preface_are_http11(gw: Gateway) -> None:
    """A request whose first bytes could begin the preface ("PR"), sent in two writes: held back
    until they cannot, then parsed as HTTP/1.1."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"PR")
        sock.sendall(b"OPFIND /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 405")


def test_graceful_shutdown_says_goaway(gw: Gateway) -> None:
    """A server shutting down ends an idle HTTP/2 connection with GOAWAY (NO_ERROR)."""
    tmp = Path(tempfile.mkdtemp(prefix="sl-h2-"))
    srv = start_server(gw.server.engine, f"sqlite:///{tmp / 'db'}", tcp=True)
    port = int(srv.url.rsplit(":", 1)[1])
    client = RawH2(port)
    try:
        assert client.get("/v1/health").status == 200
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        while client.pump():
            pass
        stopper.join(30)
        assert not stopper.is_alive()
        assert client.goaway is not None and client.goaway.error_code == 0
    finally:
        client.close()
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_json_answers_are_json(gw: Gateway) -> None:
    """A 404 of the API over HTTP/2 is the API's own JSON error."""
    with h2_client(gw) as c:
        r = c.get(f"{gw.url}/v1/nope")
        assert r.status_code == 404 and r.http_version == "HTTP/2"
        json.loads(r.text)
