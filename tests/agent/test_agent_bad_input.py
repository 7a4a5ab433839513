"""Every kind of bad input gets a clear 4xx/5xx JSON answer or a clean kill -- and the agent
stays up, without zombies or leaked descriptors."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agentlib import Agent, start_agent


def _raw(agent: Agent, data: bytes, *, read: bool = True) -> bytes:
    s = agent.raw()
    try:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One agent for the many table-driven cases below (each case is independent)."""
    a = start_agent(tmp_path_factory.mktemp("bad-input"))
    try:
        with a.client() as c:
            yield c
    finally:
        a.stop()


def _auth(agent: Agent) -> bytes:
    return f"Authorization: Bearer {agent.secret}\r\n".encode()


@pytest.mark.parametrize(
    ("route", "body", "needle"),
    [
        ("/run", b"{not json", "invalid JSON"),
        ("/run", b"[1, 2]", "must be an object"),
        ("/run", b'"cmd"', "must be an object"),
        ("/run", b"{}", "'cmd' is required"),
        ("/run", b'{"cmd": 5}', "'cmd' is required"),
        ("/run", b'{"cmd": ""}', "must not be empty"),
        ("/run", b'{"cmd": "true", "env": []}', "'env' must be an object"),
        ("/run", b'{"cmd": "true", "env": {"A": 1}}', "must be a string"),
        ("/run", b'{"cmd": "true", "env": {"A=B": "x"}}', "invalid environment"),
        ("/run", b'{"cmd": "true", "cwd": 3}', "'cwd' must be a string"),
        ("/run", b'{"cmd": "true", "timeout": "soon"}', "'timeout' must be a number"),
        ("/run", b'{"cmd": "true", "timeout": -1}', "must be > 0"),
        ("/run", b'{"cmd": "a\\u0000b"}', "NUL"),
        ("/run_streaming", b"{}", "'cmd' is required"),
        ("/run_streaming", b'{"cmd": "true", "cwd": "/nonexistent"}', "Invalid working"),
        ("/start_process", b'{"cmd": null}', "'cmd' is required"),
        ("/start_process", b'{"cmd": "true", "stdin": "yes"}', "must be a boolean"),
        ("/write_file", b'{"path": "/tmp/x"}', "'content' is required"),
        ("/write_file", b'{"content": "x"}', "'path' is required"),
        ("/write_file", b'{"path": "/tmp/x", "content": "@@", "encoding": "base64"}', "base64"),
        ("/write_file", b'{"path": "/tmp/x", "content": "", "encoding": "rot13"}', "encoding"),
        ("/write_file", b'{"path": "/tmp/x", "content": "", "mode": "999"}', "mode"),
        ("/write_file", b'{"path": "/tmp/x", "content": "\\ud800"}', "not valid Unicode"),
        ("/read_file", b'{"path": ""}', "'path' is required"),
        ("/read_file", b'{"path": ["a"]}', "'path' is required"),
        ("/read_file", b'{"path": "/tmp", "encoding": 1}', "encoding"),
        ("/list_dir", b'{"path": "/", "details": "yes"}', "must be a boolean"),
        ("/stat", b"{}", "'path' is required"),
        ("/delete_file", b'{"path": "a\\u0000"}', "NUL"),
        ("/kill_process", b"{}", "'id'"),
        ("/kill_process", b'{"id": 7}', "'id'"),
        ("/bind_port", b"{}", "Port is required"),
        ("/bind_port", b'{"port": "80a"}', "port number"),
        ("/wait_process", b'{"id": "x", "timeout": "1"}', "must be a number"),
        ("/write_stdin", b"{}", "'id'"),
    ],
)
def test_bad_fields_get_400(client: httpx.Client, route: str, body: bytes, needle: str) -> None:
    r = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_unknown_route_and_wrong_method(client: httpx.Client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and "no such route" in r.json()["error"]
    r = client.get("/run")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert "not allowed" in r.json()["error"]
    r = client.post("/list_processes")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    r = client.delete("/files", params={"path": "/tmp"})
    assert r.status_code == 405 and r.headers["allow"] == "GET, PUT"


def test_declared_huge_body_is_refused_without_reading(agent: Agent) -> None:
    head = (
        b"POST /write_file HTTP/1.1\r\nHost: a\r\n"
        + _auth(agent)
        + b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
    )
    t0 = time.monotonic()
    out = _raw(agent, head + b'{"path": "/tmp/x", "content": "')
    assert time.monotonic() - t0 < 5
    assert out.startswith(b"HTTP/1.1 413 ")
    assert b"too large" in out and b"Connection: close" in out


def test_chunked_body_over_limit(tmp_path: Path) -> None:
    a = start_agent(tmp_path, env={"SANDLOT_AGENT_MAX_BODY": "1000"})
    try:
        with a.client() as c:

            def gen() -> Iterator[bytes]:
                yield b'{"cmd": "echo '
                yield b"x" * 5000
                yield b'"}'

            r = c.post("/run", content=gen())
            assert r.status_code == 413
            assert "too large" in r.json()["error"]
            assert c.get("/health").json() == {"status": "ok"}
    finally:
        a.stop()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nNo-Colon-Here\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\n folded: header\r\n\r\n", 400),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
        (b"POST /run HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST /run HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
        (b"POST /run HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
)
def test_malformed_http(agent: Agent, raw: bytes, status: int) -> None:
    out = _raw(agent, raw)
    assert out.startswith(f"HTTP/1.1 {status} ".encode()), out[:200]
    assert out.rstrip().endswith(b"}")


def test_bad_chunked_encoding(agent: Agent) -> None:
    out = _raw(
        agent,
        b"POST /run HTTP/1.1\r\nHost: a\r\n"
        + _auth(agent)
        + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n0\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 400 ")


def test_client_vanishing_mid_body(agent: Agent, client: httpx.Client) -> None:
    for _ in range(5):
        _raw(
            agent,
            b"POST /write_file HTTP/1.1\r\nHost: a\r\n"
            + _auth(agent)
            + b'Content-Length: 100\r\n\r\n{"path"',
            read=False,
        )
        s = agent.raw()
        s.sendall(
            b"PUT /files?path=/tmp/sandlot-agent-partial HTTP/1.1\r\nHost: a\r\n"
            + _auth(agent)
            + b"Content-Length: 100000\r\n\r\n"
            + b"x" * 1000
        )
        s.close()
    time.sleep(0.2)
    assert client.get("/health").json() == {"status": "ok"}
    assert not Path("/tmp/sandlot-agent-partial").exists()


def test_client_vanishing_before_reading_answer(agent: Agent, client: httpx.Client) -> None:
    for _ in range(5):
        s = agent.raw()
        s.sendall(
            b"POST /run HTTP/1.1\r\nHost: a\r\n"
            + _auth(agent)
            + b"Content-Length: 41\r\n\r\n"
            + b'{"cmd": "seq 1 100000; echo done"}      '
        )
        s.shutdown(socket.SHUT_RDWR)
        s.close()
    time.sleep(0.3)
    assert client.post("/run", json={"cmd": "echo alive"}).json()["stdout"] == "alive\n"
    assert agent.zombies() == []


def test_no_sh_is_a_clear_error(tmp_path: Path) -> None:
    a = start_agent(tmp_path, env={"PATH": str(tmp_path / "empty")})
    try:
        with a.client() as c:
            r = c.post("/run", json={"cmd": "true"})
            assert r.status_code == 500 and "no 'sh'" in r.json()["error"]
            r = c.post("/start_process", json={"cmd": "true"})
            assert r.status_code == 500 and "no 'sh'" in r.json()["error"]
            with c.stream("POST", "/run_streaming", json={"cmd": "true"}) as resp:
                text = resp.read().decode()
            assert "event: error" in text and "no 'sh'" in text
            assert c.get("/health").status_code == 200
    finally:
        a.stop()


def test_expect_100_continue(agent: Agent) -> None:
    s = agent.raw()
    body = b'{"cmd": "echo hi"}'
    s.sendall(
        b"POST /run HTTP/1.1\r\nHost: a\r\n"
        + _auth(agent)
        + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
    s.sendall(body)
    out = s.recv(65536)
    s.close()
    assert out.startswith(b"HTTP/1.1 200 ") and b'"stdout":"hi\\n"' in out


def test_agent_stays_clean_after_abuse(agent: Agent, client: httpx.Client) -> None:
    client.get("/health")
    base_fds = agent.fd_count()
    for raw in [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nX\r\n\r\n"]:
        _raw(agent, raw)
    _raw(agent, b"\r\n\r\n", read=False)  # blank lines, then the client leaves
    for _ in range(3):
        client.post("/run", json={"cmd": "true", "timeout": 0.1})
        client.post("/run", content=b"{", headers={"Content-Type": "application/json"})
    time.sleep(0.2)
    assert agent.fd_count() <= base_fds + 1
    assert agent.zombies() == []
    assert agent.proc.poll() is None


def test_reading_a_fifo_does_not_block(client: httpx.Client, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for r in (
        client.post("/read_file", json={"path": str(fifo)}),
        client.get("/files", params={"path": str(fifo)}),
    ):
        assert r.status_code == 400 and "Not a regular file" in r.json()["error"]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/run", b'{"cmd": "echo \\ud800"}'),
        ("/run", b'{"cmd": "true", "cwd": "/tmp/\\ud800"}'),
        ("/run", b'{"cmd": "true", "env": {"A": "\\udfff"}}'),
        ("/start_process", b'{"cmd": "\\ud800"}'),
        ("/read_file", b'{"path": "/tmp/\\ud800"}'),
        ("/write_file", b'{"path": "/tmp/\\ud800", "content": "x"}'),
        ("/stat", b'{"path": "\\udbff"}'),
    ],
)
def test_lone_surrogates_are_400_not_500(
    shared_client: httpx.Client, route: str, body: bytes
) -> None:
    r = shared_client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text


def test_non_utf8_file_names_round_trip(client: httpx.Client, tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: not UTF-8
    (tmp_path / name).write_bytes(b"x")
    r = client.post("/list_dir", json={"path": str(tmp_path)})
    assert r.status_code == 200
    assert "caf\udce9" in r.json()["entries"]
    # query parameters are percent-decoded to the same bytes
    r = client.get(f"/files?path={tmp_path}/caf%E9")
    assert r.status_code == 200 and r.content == b"x"


@pytest.mark.parametrize("size", [b"0x5", b"+5", b"5_0", b"-1", b""])
def test_chunk_sizes_must_be_plain_hex(agent: Agent, size: bytes) -> None:
    out = _raw(
        agent,
        b"POST /run HTTP/1.1\r\nHost: a\r\n"
        + _auth(agent)
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + size
        + b"\r\nhello\r\n0\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 400 ")


def test_rejected_expect_continue_is_answered_without_waiting(agent: Agent) -> None:
    s = agent.raw(timeout=5)
    s.sendall(
        b"POST /run HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer wrong\r\n"
        b"Expect: 100-continue\r\nContent-Length: 100\r\n\r\n"
    )
    out = s.recv(65536)
    s.close()
    assert out.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in out
