"""A hostile agent: root inside a sandbox can replace the agent, so everything the server reads
from it is attacker-controlled. Before the fix, an endless ``/bound_ports`` answer grew the server
from 74 to 735 MiB, odd answers raised ``KeyError``/``AttributeError`` 500s, a malformed head a
``ValueError`` 500, and an agent that never answered held ``expose_port`` forever.

The fake agent here listens where the engine says the sandbox's agent is, answers ``/health``
like the real one (so the sandbox gets created), and misbehaves on the routes a test names.
The server runs in this process: its memory is this process's, measured with the kernel's
peak-RSS counter (reset through ``/proc/self/clear_refs`` before each attack).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.agent_engine import AgentProcessEngine
from support.server import RunningServer, start_server

from sandlot.engines.base import AgentAddress, SandboxInfo, SandboxSpec, SandboxState

#: What an endless answer sends at most: enough to show unbounded growth on the old code
#: (which held it twice over) without risking the machine's memory.
ENDLESS_CAP = 256 * 1024 * 1024
#: Peak RSS growth allowed during an attack (the old code: several hundred MiB).
RSS_BOUND_MIB = 64

HEALTHY = b'{"status": "ok"}'


def _answer(status: int, body: bytes, extra: bytes = b"") -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n".encode()
    return head + extra + b"content-length: %d\r\n\r\n" % len(body) + body


#: Malformed answers: each must be a 502 with a message (before: 500s or a hang).
MALFORMED = {
    "list": _answer(200, b"[1, 2]"),
    "conflict-list": _answer(409, b"[]"),
    "ports-wrong-type": _answer(200, b'{"ports": ["x", {"a": 1}], "error": 5}'),
    "ports-out-of-range": _answer(200, b'{"ports": [0, 70000, -1]}'),
    "error-not-a-string": _answer(500, b'{"error": {"deep": [1]}}'),
    "not-json": _answer(200, b"<html>hello</html>"),
    "deep-json": _answer(200, b"[" * 30000 + b"]" * 30000),
    "bad-status": b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\n{}",
    "bad-length": b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n{}",
    "negative-length": b"HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n{}",
    "two-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 9\r\n\r\n{}",
    "nul-in-header": b"HTTP/1.1 200 OK\r\nx-a: b\x00c\r\ncontent-length: 2\r\n\r\n{}",
    "bare-cr-header": (
        b"HTTP/1.1 200 OK\r\nx-a: b\rset-cookie: evil=1\r\ncontent-length: 2\r\n\r\n{}"
    ),
    "negative-chunk": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-5\r\n{}",
    "not-http": b"SSH-2.0-OpenSSH\r\n\r\n",
}
ENDLESS = ("endless-chunked", "endless-to-eof", "endless-head", "endless-trailers")
SLOW = ("trickle", "silent")


class _Handler(socketserver.StreamRequestHandler):
    server: _AgentServer

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while self._one():
                pass

    def _one(self) -> bool:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.rfile.readline(65536)
            if not line:
                return False
            head += line
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = b""
        if "content-length" in headers:
            body = self.rfile.read(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        route = target.split("?", 1)[0]
        mode = self.server.agent.modes.get(route, "normal")
        self.server.agent.seen.append(route)
        if mode == "normal":
            self.wfile.write(self.server.agent.normal(method, route, body))
            return True
        if mode in MALFORMED:  # the connection stays open for whoever wants to reuse it
            self.wfile.write(MALFORMED[mode])
            return True
        self._hostile(mode)
        return False

    def _hostile(self, mode: str) -> None:
        out = self.wfile
        piece = b"1," * 32768
        if mode == "endless-chunked":
            out.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            out.write(b'%x\r\n{"ports": [\r\n' % 11)
            chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
            self._repeat(chunk)
        elif mode == "endless-to-eof":
            out.write(b'HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{"ports": [')
            self._repeat(piece)
        elif mode == "endless-head":
            out.write(b"HTTP/1.1 200 OK\r\nx-long: ")
            self._repeat(b"a" * 65536)
        elif mode == "endless-trailers":
            out.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")
            self._repeat(b"x-t: 1\r\n" * 8192)
        elif mode == "trickle":
            out.write(b"HTTP/1.1 200 OK\r\n")
            while not self.server.agent.stopped.is_set():
                out.write(b"x")
                out.flush()
                time.sleep(0.2)
        elif mode == "silent":
            self.server.agent.stopped.wait(60)

    def _repeat(self, data: bytes) -> None:
        sent = 0
        while sent < ENDLESS_CAP and not self.server.agent.stopped.is_set():
            self.wfile.write(data)
            sent += len(data)


class _AgentServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    agent: HostileAgent


class HostileAgent:
    """A fake agent: like the real one unless ``modes[route]`` names a misbehaviour."""

    def __init__(self, path: str) -> None:
        self.modes: dict[str, str] = {}
        self.ports: list[int] = []
        self.seen: list[str] = []
        self.stopped = threading.Event()
        self.server = _AgentServer(path, _Handler)
        self.server.agent = self
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def normal(self, method: str, route: str, body: bytes) -> bytes:
        if route == "/health":
            return _answer(200, HEALTHY)
        if route == "/bound_ports":
            return _answer(200, json.dumps({"ports": self.ports}).encode())
        if route in ("/bind_port", "/unbind_port"):
            port = int(json.loads(body or b"{}").get("port") or 0)
            if route == "/bind_port" and port not in self.ports:
                self.ports.append(port)
            elif port in self.ports:
                self.ports.remove(port)
            return _answer(200, json.dumps({"success": True, "ports": self.ports}).encode())
        if route == "/tunnel":
            return _answer(502, b'{"error": "nothing listens on that port"}')
        return _answer(200, b'{"ok": true}')

    def close(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()


class HostileEngine(AgentProcessEngine):
    """Sandboxes whose "agent" is a :class:`HostileAgent` (no process at all)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.agents: dict[str, HostileAgent] = {}

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        self.specs[spec.id] = spec
        directory = self._dir(spec.id)
        directory.mkdir(parents=True)
        path = str(directory / "agent.sock")
        self.agents[spec.id] = HostileAgent(path)
        self.created.append(spec.id)
        return SandboxInfo(spec.id, SandboxState.RUNNING, AgentAddress(unix_path=path))

    async def delete(self, sandbox_id: str) -> None:
        self.deleted.append(sandbox_id)
        agent = self.agents.pop(sandbox_id, None)
        if agent is not None:
            agent.close()
        shutil.rmtree(self._dir(sandbox_id), ignore_errors=True)

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        sock = str(self._dir(sandbox_id) / "agent.sock")
        return SandboxInfo(sandbox_id, SandboxState.RUNNING, AgentAddress(unix_path=sock))

    async def list(self) -> list[SandboxInfo]:
        return [await self.inspect(i) for i in list(self.agents)]

    async def close(self) -> None:
        for sandbox_id in list(self.agents):
            await self.delete(sandbox_id)


@pytest.fixture(scope="module")
def hostile() -> Iterator[tuple[RunningServer, HostileEngine]]:
    root = Path(tempfile.mkdtemp(prefix="sl-ha-"))
    engine = HostileEngine(root / "sb")
    srv = start_server(engine, f"sqlite:///{root / 'db'}", unix_path=root / "s.sock")
    try:
        yield srv, engine
    finally:
        srv.stop()
        for agent in list(engine.agents.values()):
            agent.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def quick_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's calls to agents time out after 1 s instead of 10 (the tests' patience)."""
    monkeypatch.setattr("sandlot.server.control.agentcalls.CALL_TIMEOUT", 1.0, raising=False)


@contextlib.contextmanager
def sandbox(
    hostile: tuple[RunningServer, HostileEngine], **create: object
) -> Iterator[tuple[httpx.Client, dict[str, str], HostileAgent]]:
    srv, engine = hostile
    with srv.client() as client:
        sb = client.post("/v1/sandboxes", json=create)
        assert sb.status_code == 201, sb.text
        info = sb.json()
        try:
            yield client, info, engine.agents[info["id"]]
        finally:
            client.delete(f"/v1/sandboxes/{info['id']}")


def _status_line(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) // 1024
    raise AssertionError(name)


@contextlib.contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """The growth of this process's peak RSS (MiB) over the block, in the yielded list."""
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from now
    before = _status_line("VmRSS")
    out: list[int] = []
    yield out
    out.append(_status_line("VmHWM") - before)
    print(f" peak RSS +{out[0]} MiB", end="")


def _json_error(response: httpx.Response) -> str:
    assert response.headers.get("content-type", "").startswith("application/json"), response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


def _port_requests_until_bound_ports_asked(
    client: httpx.Client, sandbox_id: str, agent: HostileAgent
) -> None:
    """Requests to exposed port 8080 until one made the server ask the agent which ports are
    bound (it does once its cached view is old): each is the sandbox's "nothing listens" 502."""
    agent.seen.clear()
    deadline = time.monotonic() + 30
    while "/bound_ports" not in agent.seen:
        assert time.monotonic() < deadline, "the server never asked for /bound_ports"
        r = client.get(f"/sandboxes/{sandbox_id}/ports/8080/", timeout=60)
        assert r.status_code == 502, r.text  # the stored port is kept; nothing listens there
        _json_error(r)
        time.sleep(0.2)


# -- endless answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ENDLESS)
def test_endless_answer_to_expose_is_bounded(
    hostile: tuple[RunningServer, HostileEngine], mode: str
) -> None:
    with sandbox(hostile) as (client, info, agent):
        agent.modes["/bind_port"] = mode
        with peak_rss_growth() as growth:
            r = client.post(f"/v1/sandboxes/{info['id']}/ports", json={"port": 8080}, timeout=60)
        assert r.status_code == 502, r.text
        assert "agent" in _json_error(r)
        assert growth[0] < RSS_BOUND_MIB, f"the server grew by {growth[0]} MiB"


@pytest.mark.parametrize("mode", ENDLESS)
def test_endless_bound_ports_on_a_port_request_is_bounded(
    hostile: tuple[RunningServer, HostileEngine], mode: str
) -> None:
    with sandbox(hostile) as (client, info, agent):
        r = client.post(f"/v1/sandboxes/{info['id']}/ports", json={"port": 8080})
        assert r.status_code == 200, r.text
        agent.modes["/bound_ports"] = mode
        with peak_rss_growth() as growth:
            _port_requests_until_bound_ports_asked(client, info["id"], agent)
        assert growth[0] < RSS_BOUND_MIB, f"the server grew by {growth[0]} MiB"


@pytest.mark.parametrize("mode", ["endless-chunked", "silent", "ports-wrong-type"])
def test_tcp_proxy_with_a_hostile_agent_closes_the_connection(
    hostile: tuple[RunningServer, HostileEngine], mode: str, quick_calls: None
) -> None:
    """Before: an endless ``/bound_ports`` grew the server without end (no limit, no
    timeout), a silent one held the connection forever, a wrong shape raised in a task."""
    with sandbox(hostile, enable_tcp_proxy=True) as (client, info, agent):
        proxy = client.get(f"/v1/sandboxes/{info['id']}/ports").json()["tcp_proxy"]
        agent.modes["/bound_ports"] = mode
        address = (proxy["host"], proxy["port"])
        # closed by the server, within the call's timeout
        with peak_rss_growth() as growth, socket.create_connection(address, timeout=45) as conn:
            assert conn.recv(1) == b""
        assert growth[0] < RSS_BOUND_MIB, f"the server grew by {growth[0]} MiB"
        assert "/bound_ports" in agent.seen


# -- malformed answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MALFORMED))
def test_malformed_answer_to_expose_is_a_502(
    hostile: tuple[RunningServer, HostileEngine], mode: str
) -> None:
    with sandbox(hostile) as (client, info, agent):
        agent.modes["/bind_port"] = mode
        r = client.post(f"/v1/sandboxes/{info['id']}/ports", json={"port": 8080})
        if mode in ("ports-wrong-type", "ports-out-of-range", "list"):
            # a 200 whose body the server does not need: the binding stands
            assert r.status_code in (200, 502), r.text
        else:
            assert r.status_code == 502, r.text
            _json_error(r)
        agent.modes.clear()
        assert client.get("/v1/health").status_code == 200


@pytest.mark.parametrize("mode", sorted(MALFORMED))
def test_malformed_bound_ports_is_not_a_500(
    hostile: tuple[RunningServer, HostileEngine], mode: str
) -> None:
    with sandbox(hostile) as (client, info, agent):
        assert client.post(f"/v1/sandboxes/{info['id']}/ports", json={"port": 8080}).is_success
        agent.modes["/bound_ports"] = mode
        _port_requests_until_bound_ports_asked(client, info["id"], agent)
        r = client.delete(f"/v1/sandboxes/{info['id']}/ports", params={"port": "8080"})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "mode",
    sorted(
        m
        for m in MALFORMED
        if m.startswith(("bad-", "negative-length", "two-", "nul-", "bare-", "not-http"))
    ),
)
def test_malformed_head_through_the_gateway_is_a_502(
    hostile: tuple[RunningServer, HostileEngine], mode: str
) -> None:
    """The gateway passes the agent's answers on: a head that breaks HTTP is a 502 naming the
    agent, never a 500, a hang, or a header injected into the client's answer."""
    with sandbox(hostile) as (client, info, agent):
        agent.modes["/run"] = mode
        r = client.post(
            f"/sandboxes/{info['id']}/koyeb-sandbox/run",
            json={"cmd": "true"},
            headers={"authorization": f"Bearer {info['secret']}"},
            timeout=30,
        )
        assert r.status_code == 502, r.text
        assert "agent" in _json_error(r)
        assert "set-cookie" not in r.headers


# -- slow answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", SLOW)
def test_slow_agent_times_out(
    hostile: tuple[RunningServer, HostileEngine], mode: str, quick_calls: None
) -> None:
    """Before: ``expose_port`` waited for a silent or trickling agent forever."""
    with sandbox(hostile) as (client, info, agent):
        agent.modes["/bind_port"] = mode
        started = time.monotonic()
        r = client.post(f"/v1/sandboxes/{info['id']}/ports", json={"port": 8080}, timeout=30)
        assert r.status_code == 502, r.text
        assert "within" in _json_error(r)
        assert time.monotonic() - started < 20


def test_server_survives(hostile: tuple[RunningServer, HostileEngine]) -> None:
    with sandbox(hostile) as (client, info, _agent):
        r = client.post(f"/v1/sandboxes/{info['id']}/ports", json={"port": 8080})
        assert r.status_code == 200, r.text
        assert client.get("/v1/health").status_code == 200
