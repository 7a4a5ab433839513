"""Interactive terminals over WebSocket, and the WebSocket framing itself."""

from __future__ import annotations

import contextlib
import os
import struct
import time
from pathlib import Path

import pytest
from agentlib import Agent
from test_agent_exactness import _assert_dead
from wsclient import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, WSClient

from sandlot.agent.websocket import _unmask, accept_key, encode_frame


def _open(agent: Agent, **query: object) -> WSClient:
    client, head = WSClient.connect(agent.sock, agent.secret or "", **query)
    assert client is not None, head
    op, payload = client.recv_frame()
    assert op == OP_TEXT and b'"ready"' in payload
    return client


def test_command_output_and_exit_code(agent: Agent) -> None:
    c = _open(agent, cmd="echo hello; tty; stty size; exit 3", rows=30, cols=100)
    out, controls, close = c.collect()
    assert out == b"hello\r\n" + b"/dev/pts/" + out.split(b"/dev/pts/")[1].split(b"\r\n")[0] + (
        b"\r\n30 100\r\n"
    )
    assert controls[-1] == {"type": "exit", "code": 3, "signal": None}
    assert close == 1000


def test_interactive_shell_input_resize_and_ctrl_c(agent: Agent, tmp_path: Path) -> None:
    c = _open(agent, cmd="PS1='$ ' exec sh -i", cwd=str(tmp_path), env='{"MARK": "m1"}')
    c.send_frame(OP_BINARY, b"echo $MARK $(pwd)\n")
    assert f"m1 {tmp_path}".encode() in c.read_until_output(f"m1 {tmp_path}".encode())
    c.send_json({"type": "resize", "rows": 11, "cols": 33})
    c.send_json({"type": "input", "data": "stty size\n"})
    c.read_until_output(b"11 33")
    # ^C reaches the foreground job through the terminal (it is the controlling tty)
    c.send_frame(OP_BINARY, b"sleep 30; echo after-sleep\n")
    time.sleep(0.3)
    t0 = time.monotonic()
    c.send_frame(OP_BINARY, b"\x03")
    c.send_frame(OP_BINARY, b"echo interrupted\n")
    c.read_until_output(b"interrupted\r\n")
    assert time.monotonic() - t0 < 5
    c.send_frame(OP_BINARY, b"exit 0\n")
    _out, controls, close = c.collect()
    assert controls[-1]["type"] == "exit" and controls[-1]["code"] == 0
    assert close == 1000


def test_bad_control_message_is_reported_not_fatal(agent: Agent) -> None:
    c = _open(agent, cmd="cat")
    c.send_frame(OP_TEXT, b"not json")
    op, payload = c.recv_frame()
    assert op == OP_TEXT and b'"error"' in payload
    c.send_json({"type": "resize", "rows": 0, "cols": 10})
    assert b'"error"' in c.recv_frame()[1]
    c.send_frame(OP_BINARY, b"still-alive\n")
    c.read_until_output(b"still-alive")
    c.send_json({"type": "signal", "signal": "TERM"})
    _out, controls, _ = c.collect()
    assert controls[-1]["signal"] == "SIGTERM" and controls[-1]["code"] == 143


def test_client_disconnect_hangs_up_the_terminal(agent: Agent, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    c = _open(agent, cmd=f"echo $$ > {marker}; sleep 60 & exec sleep 60")
    deadline = time.monotonic() + 5
    while not marker.exists() or not marker.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    c.close()
    _assert_dead(int(marker.read_text()))
    time.sleep(0.2)
    assert agent.zombies() == []


def test_ping_pong_and_client_close(agent: Agent) -> None:
    c = _open(agent, cmd="sleep 30")
    c.send_frame(OP_PING, b"hi")
    assert c.recv_frame() == (OP_PONG, b"hi")
    c.send_frame(OP_CLOSE, struct.pack("!H", 1000))
    op, payload = c.recv_frame()
    assert op == OP_CLOSE and struct.unpack("!H", payload[:2])[0] == 1000


def test_fragmented_input(agent: Agent) -> None:
    c = _open(agent, cmd="cat")
    c.send_frame(OP_BINARY, b"frag", fin=False)
    c.send_frame(OP_PING, b"")  # control frames may arrive between fragments
    c.send_frame(OP_CONT, b"ment", fin=False)
    c.send_frame(OP_CONT, b"ed\n")
    assert c.recv_frame()[0] == OP_PONG
    c.read_until_output(b"fragmented")
    c.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (encode_frame(OP_BINARY, b"x"), 1002),  # unmasked client frame
        (bytes([0x80 | 0x3, 0x80]) + os.urandom(4), 1002),  # reserved opcode
        (bytes([0xC0 | OP_BINARY, 0x80]) + os.urandom(4), 1002),  # RSV1 without extension
        (encode_frame(OP_PING, b"x" * 126, mask=b"abcd"), 1002),  # control frame too long
        (encode_frame(OP_PING, b"", fin=False, mask=b"abcd"), 1002),  # fragmented control
        (encode_frame(OP_CONT, b"x", mask=b"abcd"), 1002),  # continuation out of nowhere
        (encode_frame(OP_TEXT, b"\xff\xfe", mask=b"abcd"), 1007),  # text not UTF-8
        (bytes([0x80 | OP_BINARY, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + b"abcd", 1009),
    ],
)
def test_protocol_violations_close_with_rfc_codes(agent: Agent, frame: bytes, code: int) -> None:
    c = _open(agent, cmd="cat")
    c.sock.sendall(frame)
    while True:
        op, payload = c.recv_frame()
        if op == OP_CLOSE:
            break
    assert struct.unpack("!H", payload[:2])[0] == code
    c.close()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ("", 426),
        ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n", 426),
        (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: short\r\n",
            400,
        ),
    ],
)
def test_bad_upgrade_requests(agent: Agent, headers: str, status: int) -> None:
    s = agent.raw()
    s.sendall(
        f"GET /pty?cmd=true HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {agent.secret}\r\n"
        f"{headers}\r\n".encode()
    )
    out = s.recv(65536)
    s.close()
    assert out.startswith(f"HTTP/1.1 {status} ".encode())


def test_bad_pty_parameters(agent: Agent) -> None:
    for query in (
        {"cmd": "true", "rows": "0"},
        {"cmd": "true", "cols": "x"},
        {"cmd": "true", "env": "[1]"},
        {"cmd": "true", "cwd": "/nonexistent"},
    ):
        client, head = WSClient.connect(agent.sock, agent.secret or "", **query)
        assert client is None and head.startswith(b"HTTP/1.1 400 "), head


def test_terminal_needs_auth(agent: Agent) -> None:
    client, head = WSClient.connect(agent.sock, "wrong", cmd="true")
    assert client is None and head.startswith(b"HTTP/1.1 401 ")


def test_accept_key_and_masking() -> None:
    # The example from RFC 6455 section 1.3
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert _unmask(_unmask(b"hello world", b"\x01\x02\x03\x04"), b"\x01\x02\x03\x04") == (
        b"hello world"
    )
    assert encode_frame(OP_TEXT, b"Hello") == b"\x81\x05Hello"
    masked = encode_frame(OP_TEXT, b"Hello", mask=b"\x37\xfa\x21\x3d")
    assert masked == b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # RFC 6455 section 5.7
    assert encode_frame(OP_BINARY, b"x" * 256)[:4] == b"\x82\x7e\x01\x00"
    assert encode_frame(OP_BINARY, b"x" * 65536)[:10] == b"\x82\x7f" + struct.pack("!Q", 65536)


def test_large_output_arrives_whole(agent: Agent) -> None:
    c = _open(agent, cmd="stty -opost; head -c 300000 /dev/zero | tr '\\0' 'a'")
    out, controls, _ = c.collect()
    assert out == b"a" * 300000
    assert controls[-1]["code"] == 0


def test_last_output_before_exit_is_never_lost(agent: Agent) -> None:
    """Regression: output written just before the exit could be dropped when the exit was
    noticed right after an empty poll."""
    for i in range(20):
        c = _open(agent, cmd=f"sleep 0.0{i % 10}; printf last-{i}")
        out, controls, _ = c.collect()
        assert out == f"last-{i}".encode(), (i, out)
        assert controls[-1]["type"] == "exit"


def test_unread_input_gives_up_instead_of_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from sandlot.agent import terminal

    monkeypatch.setattr(terminal, "INPUT_STALL_LIMIT", 0.3)
    master, slave = os.openpty()
    # raw mode: the line discipline then holds input back instead of dropping it
    proc = subprocess.Popen(
        ["sh", "-c", "stty raw -echo; echo ready; exec sleep 30"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    os.set_blocking(master, False)
    term = terminal.Terminal(proc, master)
    try:
        deadline = time.monotonic() + 5
        seen = b""
        while b"ready" not in seen and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                seen += os.read(master, 100)
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(OSError, match="not read"):
            term.write(b"x" * 1_000_000)  # far more than a pty's input buffer
        assert time.monotonic() - t0 < 5
    finally:
        term.hang_up(0.1)
        os.close(master)
