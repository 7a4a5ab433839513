"""The server killed with SIGKILL (a real `sandlot server` process over the real LocalEngine)
while sandboxes sleep or while its warm pool fills: after a restart nothing is lost, doubled or
left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sdk.conftest import IMAGES_DIR, local_engine_unavailable

from sandlot import Sandbox


class ServerProcess:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "s.sock"
        self.url = f"unix:{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        env = {
            **os.environ,
            "SANDLOT_STATE_DIR": str(self.root / "state"),
            "SANDLOT_IMAGES_DIR": str(IMAGES_DIR),
        }
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandlot.cli", "server", "--listen", self.url, *extra],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock))) as c:
                    if c.get("http://s/v1/health").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, (self.root / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def engine_sandboxes(self) -> list[str]:
        d = self.root / "state" / "sandboxes"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="sl-crash-"))
    srv = ServerProcess(root)
    yield srv
    srv.stop()
    # whatever is left: delete it through a fresh server
    srv.start()
    for sb in Sandbox.list(api_url=srv.url):
        Sandbox.get_from_id(sb.id, api_url=srv.url).delete()
    srv.stop()
    subprocess.run(["rm", "-rf", str(root)], check=False)


def _wait_status(url: str, sid: str, status: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while Sandbox.get_from_id(sid, api_url=url).info["status"] != status:
        assert time.monotonic() < deadline, f"{sid} never became {status}"
        time.sleep(0.2)


@pytest.mark.parametrize("light", [True, False])
def test_sigkill_while_asleep_then_wake(server: ServerProcess, light: bool) -> None:
    server.start()
    sb = Sandbox.create(
        image="busybox", idle_timeout=1, api_url=server.url, _experimental_enable_light_sleep=light
    )
    sb.exec("echo kept > /root/f")
    _wait_status(server.url, sb.id, "sleeping")
    server.kill()
    server.start()
    again = Sandbox.get_from_id(sb.id, api_url=server.url)
    assert again.exec("cat /root/f").stdout == "kept\n"
    # A light wake lets the request through first and records "woke" just after it.
    deadline = time.monotonic() + 10
    while "woke" not in (kinds := [e["kind"] for e in again.events()]):
        assert time.monotonic() < deadline, kinds
        time.sleep(0.05)
    assert kinds.count("created") == 1
    again.delete()
    assert server.engine_sandboxes() == []


def test_sigkill_while_pool_fills(server: ServerProcess) -> None:
    server.start("--pool", "busybox:nano=3")
    deadline = time.monotonic() + 20
    while not server.engine_sandboxes():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.kill()  # some pooled, some half-made
    server.start()  # no pools configured now: every pooled sandbox must go
    deadline = time.monotonic() + 20
    while server.engine_sandboxes():
        assert time.monotonic() < deadline, server.engine_sandboxes()
        time.sleep(0.1)
    assert Sandbox.list(api_url=server.url) == []
