"""Interactive terminals: a command on a pseudo-terminal, driven over a WebSocket.

``GET /pty?cmd=...&rows=24&cols=80&cwd=...&env=<JSON object>`` upgrades to a WebSocket:

- agent → client: first a text message ``{"type": "ready", "id", "pid"}``, then the
  terminal's output as **binary** messages (raw bytes), and at the end a text message
  ``{"type": "exit", "code", "signal"}`` followed by a close frame (1000).
- client → agent: **binary** messages are input bytes; text messages are JSON:
  ``{"type": "input", "data": "..."}``, ``{"type": "resize", "rows": R, "cols": C}``,
  ``{"type": "signal", "signal": "INT"}`` (to the terminal's process group).

The command runs as ``sh -c <cmd>`` in a new session whose controlling terminal is the pty.
Closing the WebSocket hangs the terminal up (SIGHUP to its group, SIGKILL 1 s later).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Mapping

from sandlot.agent import commands
from sandlot.agent.http11 import ClientGone, HTTPError, Request
from sandlot.agent.processes import new_id
from sandlot.agent.websocket import OP_BINARY, OP_TEXT, WebSocket, handshake

DEFAULT_COMMAND = "if command -v bash >/dev/null 2>&1; then exec bash -i; else exec sh -i; fi"
READ_SIZE = 65536
INPUT_STALL_LIMIT = 60.0


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_controlling_tty() -> None:  # runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    commands.prefer_for_oom(os.getpid())  # here, before exec, no shell can fork first


def _size(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not 1 <= int(value) <= 10000:
        raise HTTPError(400, f"'{name}' must be an integer between 1 and 10000")
    return int(value)


class Terminal:
    def __init__(self, proc: subprocess.Popen[bytes], master: int) -> None:
        self.id = new_id()
        self.proc = proc
        self.master = master

    def resize(self, rows: int, cols: int) -> None:
        _set_size(self.master, rows, cols)  # the kernel sends SIGWINCH to the foreground group

    def write(self, data: bytes) -> None:
        """Input to the terminal; if the program has not read any of it for a minute, the
        session is given up (OSError) rather than blocking this thread for ever."""
        view = memoryview(data)
        stalled_since = time.monotonic()
        while view:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                if time.monotonic() - stalled_since > INPUT_STALL_LIMIT:
                    raise OSError("terminal input not read for a minute") from None
                select.select([], [self.master], [], 1.0)
                continue
            view = view[n:]
            stalled_since = time.monotonic()

    def hang_up(self, grace: float = 1.0) -> None:
        if self.proc.poll() is None:
            commands.kill_group(self.proc.pid, signal.SIGHUP)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        commands.kill_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def open_terminal(
    req: Request,
    *,
    default_cwd: str,
    base_env: Mapping[str, str],
    track: Callable[[int, bool], None],
) -> None:
    """Handle ``GET /pty``: validate, upgrade, run the session until either side ends."""
    q = req.query
    body = {"cmd": q.get("cmd") or DEFAULT_COMMAND, "cwd": q.get("cwd") or None}
    if "env" in q:
        try:
            body["env"] = json.loads(q["env"])
        except ValueError:
            raise HTTPError(400, "'env' must be a JSON object of strings") from None
    cmd, cwd, env = commands.parse_command_request(body, default_cwd=default_cwd)
    rows = _size(q.get("rows"), "rows", 24)
    cols = _size(q.get("cols"), "cols", 80)
    full_env = {"TERM": "xterm-256color", **base_env, **(env or {})}
    ws = handshake(req)
    master, slave = os.openpty()
    try:
        _set_size(slave, rows, cols)
        proc = subprocess.Popen(
            [commands.find_sh(full_env), "-c", cmd],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=full_env,
            start_new_session=True,
            preexec_fn=_take_controlling_tty,
            close_fds=True,
        )
    except (OSError, commands.SpawnError) as exc:
        os.close(master)
        os.close(slave)
        ws.send_text(json.dumps({"type": "error", "error": f"cannot start terminal: {exc}"}))
        ws.close(1011, "cannot start")
        return
    os.close(slave)
    os.set_blocking(master, False)
    term = Terminal(proc, master)
    track(proc.pid, True)
    try:
        ws.send_text(json.dumps({"type": "ready", "id": term.id, "pid": proc.pid}))
        _session(ws, term)
    finally:
        track(proc.pid, False)
        os.close(master)


def _session(ws: WebSocket, term: Terminal) -> None:
    reader_done = threading.Event()
    output = threading.Thread(target=_pump_output, args=(ws, term, reader_done), daemon=True)
    output.start()
    try:
        while True:
            message = ws.receive()
            if message is None:
                break
            opcode, payload = message
            if opcode == OP_BINARY:
                term.write(payload)
            elif opcode == OP_TEXT:
                _control(ws, term, payload)
    except OSError:
        pass
    finally:
        reader_done.set()
        term.hang_up()
        output.join(10)
        ws.conn.close()


def _control(ws: WebSocket, term: Terminal, payload: bytes) -> None:
    try:
        msg = json.loads(payload)
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "input" and isinstance(msg.get("data"), str):
            term.write(msg["data"].encode("utf-8", "surrogateescape"))
        elif kind == "resize":
            rows, cols = msg.get("rows"), msg.get("cols")
            if not all(isinstance(v, int) and 1 <= v <= 10000 for v in (rows, cols)):
                raise ValueError("resize needs integer rows and cols between 1 and 10000")
            term.resize(rows, cols)
        elif kind == "signal":
            name = str(msg.get("signal", "")).upper()
            sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
            commands.kill_group(term.proc.pid, sig)
        else:
            raise ValueError(f"unknown control message: {payload[:100]!r}")
    except (ValueError, KeyError, TypeError, UnicodeEncodeError) as exc:
        with contextlib.suppress(ClientGone):
            ws.send_text(json.dumps({"type": "error", "error": str(exc)}))


def _pump_output(ws: WebSocket, term: Terminal, reader_done: threading.Event) -> None:
    """Terminal output → binary messages; at the end, the exit message and a close frame."""
    poller = select.poll()
    poller.register(term.master, select.POLLIN)
    exited_at: float | None = None
    last_sent = time.monotonic()
    try:
        while not reader_done.is_set():
            # Only a poll that started after the exit was seen may conclude "no more output".
            exited_before_poll = exited_at is not None
            events = poller.poll(100 if exited_at is None else 50)
            data = b""
            if events:
                try:
                    data = os.read(term.master, READ_SIZE)
                except BlockingIOError:
                    data = b""
                except OSError:  # EIO: every holder of the terminal's other side is gone
                    break
                if not data and events[0][1] & select.POLLHUP:
                    break
            if data:
                ws.send_binary(data)
                last_sent = time.monotonic()
            if exited_at is None and term.proc.poll() is not None:
                exited_at = time.monotonic()
            if (
                exited_before_poll
                and exited_at is not None
                and (not data or time.monotonic() - exited_at > 2)
            ):
                break  # the shell is gone; background jobs holding the pty are not waited for
            if time.monotonic() - last_sent > 30:
                ws.ping()
                last_sent = time.monotonic()
        if reader_done.is_set():
            return
        term.hang_up()
        rc = term.proc.returncode
        assert rc is not None
        ws.send_text(
            json.dumps(
                {"type": "exit", "code": commands.exit_code(rc), "signal": commands.signal_name(rc)}
            )
        )
        ws.close(1000, "terminal exited")
        # Give the client a moment to answer the close, then make the reader stop.
        if not reader_done.wait(2):
            try:
                import socket

                ws.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    except ClientGone:
        pass
