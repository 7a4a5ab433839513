"""h2serve.py's limits (h2limits.H2Limits) on a real uvicorn server with a small app: a reset
stops its handler, floods of cheap frames end in GOAWAY ENHANCE_YOUR_CALM, responses served
earn the budget back, and handlers per connection are bounded. Driven by test_h2serve.py's raw
``h2`` client. No sandboxes; no root needed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h2.errors
import h2.events
import h2.settings
import pytest
import uvicorn
from test_h2serve import Client

from sandlot.server.h2limits import H2Limits
from sandlot.server.runner.protocols import PortsWebSocketProtocol, ports_http_protocol

TESTS = Path(__file__).resolve().parents[1]
ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
LIMITS = H2Limits(max_streams=4, frame_burst=20, frame_rate=0.0)


@dataclass
class App:
    """``/ok`` answers; ``/sleep`` sleeps without listening (``cancelled`` when stopped);
    ``/stubborn`` ignores cancellation until ``release``d."""

    state: Any = field(default_factory=lambda: SimpleNamespace(h2_limits=LIMITS))
    started: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    release: asyncio.Event | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.loop = asyncio.get_running_loop()
        if self.release is None:
            self.release = asyncio.Event()
        path = scope["path"]
        self.started.append(path)
        if path == "/sleep":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        elif path == "/stubborn":
            while not self.release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await self.release.wait()
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    def set_free(self) -> None:
        assert self.loop is not None and self.release is not None
        self.loop.call_soon_threadsafe(self.release.set)


@pytest.fixture
def served() -> Iterator[tuple[App, int]]:
    app = App()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(
        app,
        http=ports_http_protocol(),
        ws=PortsWebSocketProtocol,
        lifespan="off",
        log_level="critical",
        timeout_graceful_shutdown=2,
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    yield app, sock.getsockname()[1]
    if app.loop is not None and app.release is not None:
        app.set_free()
    srv.should_exit = True
    thread.join(15)
    sock.close()


def goaway_of(c: Client) -> Any:
    while c.goaway is None:
        if not c.pump():
            break
    return c.goaway


def test_a_reset_cancels_a_handler_that_is_not_listening(served: tuple[App, int]) -> None:
    app, port = served
    c = Client(port)
    sid = c.start("/sleep")
    while "/sleep" not in app.started:
        c.h2.ping(b"pingping")
        c.flush()
        assert c.pump()
    c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    c.flush()
    assert app.cancelled.wait(10)
    assert c.wait(c.start("/ok")).body == b"ok"  # the connection goes on
    c.close()


def test_a_ping_flood_is_goawayed(served: tuple[App, int]) -> None:
    _, port = served
    c = Client(port)
    for i in range(100):
        c.h2.ping(i.to_bytes(8, "big"))
    c.flush()
    goaway = goaway_of(c)
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    c.close()


def test_a_settings_flood_is_goawayed(served: tuple[App, int]) -> None:
    _, port = served
    c = Client(port)
    for _ in range(100):
        c.h2.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
    c.flush()
    goaway = goaway_of(c)
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    c.close()


def test_responses_served_earn_back_the_odd_reset(served: tuple[App, int]) -> None:
    """A busy client that cancels one request in five: twice the budget in resets over the
    connection's life, and never refused."""
    _, port = served
    c = Client(port)
    for i in range(200):
        assert c.wait(c.start("/ok")).body == b"ok"
        if i % 5 == 0:
            c.h2.reset_stream(c.start("/sleep"), h2.errors.ErrorCodes.CANCEL)
            c.flush()
    assert c.goaway is None
    c.close()


def test_handlers_per_connection_are_bounded(served: tuple[App, int]) -> None:
    """Reset streams whose handlers do not end keep their handler slots: new streams wait for
    them (no more handlers than ``max_streams`` run), and are served once they end."""
    app, port = served
    c = Client(port)
    sids = [c.start("/stubborn") for _ in range(LIMITS.max_streams)]
    while app.started.count("/stubborn") < LIMITS.max_streams:
        c.h2.ping(b"pingping")
        c.flush()
        assert c.pump()
    for sid in sids:
        c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    c.flush()
    waiting = [c.start("/ok") for _ in range(LIMITS.max_streams)]
    c.h2.ping(b"lastping")  # answered: the server has seen the new streams
    c.flush()
    while len(app.started) < 2 * LIMITS.max_streams and not pinged(c):
        pass
    assert app.started.count("/ok") == 0  # no slot for them while the stubborn ones run
    app.set_free()
    assert all(c.wait(sid).body == b"ok" for sid in waiting)
    c.close()


def pinged(c: Client) -> bool:
    """Pump once; True if the answer to the last PING came."""
    data = c.sock.recv(65536)
    assert data, "connection closed"
    events = c.h2.receive_data(data)
    c.flush()
    return any(
        isinstance(e, h2.events.PingAckReceived) and e.ping_data == b"lastping" for e in events
    )


def test_sandlot_server_options_set_the_limits(short_dir: Path) -> None:
    """``sandlot server --h2-frame-burst 5`` is in force, and the other limit options are
    accepted (a server process as users run it; the agent-process engine, no sandboxes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "SANDLOT_TEST_AGENTS": str(short_dir / "agents"),
        "SANDLOT_STATE_DIR": str(short_dir / "state"),
        "XDG_RUNTIME_DIR": str(short_dir / "xdg"),
    }
    command = [sys.executable, "-m", "sandlot.cli", "server", "--engine"]
    command += ["support.agent_engine:from_env", "--database", f"sqlite:///{short_dir / 'db'}"]
    command += ["--listen", f"tcp:127.0.0.1:{port}", "--log-level", "warning"]
    command += ["--h2-frame-burst", "5", "--h2-frame-rate", "0", "--h2-max-streams", "64"]
    command += ["--max-exposed-ports", "1", "--max-port-requests", "8"]
    command += ["--max-tcp-connections", "8"]
    command += ["--max-requests-per-token", "16"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "died"
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        c = Client(port)
        for i in range(10):  # twice the burst
            c.h2.ping(i.to_bytes(8, "big"))
        c.flush()
        goaway = goaway_of(c)
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
