"""Streaming exactness: every byte, every newline, write order, binary output, kills."""

from __future__ import annotations

import base64
import os
import signal
import socket
import time
from pathlib import Path

import httpx
from agentlib import Agent, sse_events


def _joined(events: list, stream: str | None = None) -> bytes:
    out = b""
    for name, d in events:
        if name != "output" or (stream and d["stream"] != stream):
            continue
        if d.get("encoding") == "base64":
            out += base64.b64decode(d["data"])
        else:
            out += d["data"].encode()
    return out


def _stream(client: httpx.Client, cmd: str, **extra: object) -> list:
    with client.stream("POST", "/run_streaming", json={"cmd": cmd, **extra}) as r:
        assert r.status_code == 200
        return sse_events(r.iter_lines())


def test_stream_keeps_every_byte_and_newline(client: httpx.Client) -> None:
    cmd = r"printf 'a\n\nb\r\n  c  '; printf 'no-newline-at-end'"
    events = _stream(client, cmd)
    assert _joined(events) == b"a\n\nb\r\n  c  no-newline-at-end"


def test_stream_binary_is_base64(client: httpx.Client) -> None:
    events = _stream(client, r"printf 'ok\377\376bin\000x'")
    assert _joined(events) == b"ok\xff\xfebin\x00x"
    assert any(d.get("encoding") == "base64" for n, d in events if n == "output")


def test_stream_multibyte_split_across_reads_stays_text(client: httpx.Client) -> None:
    # 'é' written one byte at a time with a pause in between: it must arrive as text.
    cmd = r"printf 'caf\303'; sleep 0.1; printf '\251!\n'"
    events = _stream(client, cmd)
    outputs = [d for n, d in events if n == "output"]
    assert all("encoding" not in d for d in outputs)
    assert "".join(d["data"] for d in outputs) == "café!\n"


def test_stream_interleaves_in_write_order(client: httpx.Client) -> None:
    cmd = "for i in 1 2 3 4 5; do echo out$i; sleep 0.05; echo err$i >&2; sleep 0.05; done"
    events = _stream(client, cmd)
    order = [d["data"] for n, d in events if n == "output"]
    expected = [f"{s}{i}\n" for i in range(1, 6) for s in ("out", "err")]
    assert order == expected


def test_flood_of_10000_lines(client: httpx.Client) -> None:
    cmd = "i=0; while [ $i -lt 10000 ]; do echo line $i; echo err $i >&2; i=$((i+1)); done"
    events = _stream(client, cmd)
    expected_out = "".join(f"line {i}\n" for i in range(10000)).encode()
    expected_err = "".join(f"err {i}\n" for i in range(10000)).encode()
    assert _joined(events, "stdout") == expected_out
    assert _joined(events, "stderr") == expected_err
    assert events[-1] == ("complete", {"code": 0, "error": False})
    r = client.post("/run", json={"cmd": cmd})
    assert r.json()["stdout"].encode() == expected_out
    assert r.json()["stderr"].encode() == expected_err


def test_run_binary_output_has_exact_bytes(client: httpx.Client) -> None:
    r = client.post("/run", json={"cmd": r"printf 'a\377b'"}).json()
    assert r["stdout"] == "a\ufffdb"
    assert base64.b64decode(r["stdout_base64"]) == b"a\xffb"


def test_run_timeout_kills_the_group(client: httpx.Client, tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    t0 = time.monotonic()
    r = client.post(
        "/run",
        json={"cmd": f"sleep 60 & echo $! > {marker}; echo started; wait", "timeout": 0.5},
    )
    assert time.monotonic() - t0 < 5
    body = r.json()
    assert r.status_code == 200
    assert body["timed_out"] is True and body["code"] == 124
    assert "timed out" in body["error"]
    assert body["stdout"] == "started\n"
    _assert_dead(int(marker.read_text()))


def test_streaming_timeout(client: httpx.Client) -> None:
    events = _stream(client, "echo hi; sleep 60", timeout=0.3)
    assert _joined(events) == b"hi\n"
    name, complete = events[-1]
    assert name == "complete" and complete["timed_out"] is True and complete["error"] is True


def _assert_dead(pid: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):  # gone (ESRCH while it was going)
            return
        if state == "Z":
            return  # dead, waiting for its (non-agent) parent to reap it
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} still alive")


def _raw_request(agent: Agent, path: str, body: bytes) -> socket.socket:
    s = agent.raw()
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {agent.secret}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return s


def test_streaming_client_disconnect_kills_group(agent: Agent, tmp_path: Path) -> None:
    marker = tmp_path / "pids"
    cmd = (
        f"sleep 60 & echo $! > {marker}; echo $$ >> {marker}; "
        "while :; do echo tick; sleep 0.05; done"
    )
    s = _raw_request(agent, "/run_streaming", f'{{"cmd": "{cmd}"}}'.encode())
    assert b"tick" in s.recv(65536) or b"tick" in s.recv(65536)
    s.close()
    deadline = time.monotonic() + 5
    while not marker.exists() or len(marker.read_text().split()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for pid in marker.read_text().split():
        _assert_dead(int(pid))
    time.sleep(0.1)
    assert agent.zombies() == []


def test_silent_command_killed_when_client_disconnects(agent: Agent, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    s = _raw_request(agent, "/run", f'{{"cmd": "echo $$ > {marker}; exec sleep 60"}}'.encode())
    deadline = time.monotonic() + 5
    while not marker.exists() or not marker.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    s.close()
    _assert_dead(int(marker.read_text()))


def test_background_child_holding_pipes_does_not_hang_run(
    client: httpx.Client, tmp_path: Path
) -> None:
    marker = tmp_path / "bg.pid"
    t0 = time.monotonic()
    r = client.post("/run", json={"cmd": f"sleep 30 & echo $! > {marker}; echo done"})
    assert r.json()["stdout"] == "done\n"
    assert time.monotonic() - t0 < 5
    os.kill(int(marker.read_text()), signal.SIGKILL)


def test_closed_pipes_but_running_command(client: httpx.Client) -> None:
    r = client.post("/run", json={"cmd": "exec >&- 2>&-; sleep 0.3; exit 4"})
    assert r.json()["code"] == 4


def test_no_fd_leak_and_no_zombies(agent: Agent, client: httpx.Client) -> None:
    client.post("/run", json={"cmd": "true"})
    before = agent.fd_count()
    for _ in range(20):
        client.post("/run", json={"cmd": "echo x; echo y >&2"})
        _stream(client, "echo z")
    time.sleep(0.1)
    assert agent.fd_count() <= before + 1
    assert agent.zombies() == []
    assert os.path.exists(agent.sock)


def test_http10_client_gets_an_unchunked_stream(agent: Agent) -> None:
    s = agent.raw()
    body = b'{"cmd": "echo one; echo two"}'
    s.sendall(
        b"POST /run_streaming HTTP/1.0\r\nAuthorization: Bearer "
        + (agent.secret or "").encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    head, _, rest = out.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert rest.startswith(b"event: output\ndata: ")
    assert rest.endswith(b'event: complete\ndata: {"code":0,"error":false}\n\n')


def test_run_with_input(client: httpx.Client) -> None:
    r = client.post("/run", json={"cmd": "cat; echo; wc -c < /dev/null", "input": "héllo"})
    assert r.json()["stdout"] == "héllo\n0\n"
    data = bytes(range(256)) * 1000  # larger than a pipe buffer: must not deadlock
    r = client.post(
        "/run",
        json={
            "cmd": "cat",
            "input": base64.b64encode(data).decode(),
            "input_encoding": "base64",
        },
    ).json()
    assert base64.b64decode(r["stdout_base64"]) == data
    events = _stream(client, "tr a-z A-Z", input="streamed\n")
    assert _joined(events) == b"STREAMED\n"
    # a command that does not read its input is fine too
    assert (
        client.post("/run", json={"cmd": "echo x", "input": "y" * 200000}).json()["stdout"] == "x\n"
    )
    r = client.post("/run", json={"cmd": "cat", "input": "@@", "input_encoding": "base64"})
    assert r.status_code == 400 and "'input'" in r.json()["error"]
