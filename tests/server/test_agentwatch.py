"""The agent health probe (server/agentwatch.py) over real sandboxes of the local engine: an
agent that stays down is noticed, recorded, restarted from outside, and only after repeated
failed restarts is its sandbox marked ``error``, with the reason the SDK then raises. An exec in
flight when the agent dies gets a clear error, not a hang."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.local import IMAGES_DIR, local_engine_unavailable
from support.server import RunningServer, start_server

from sandlot import Sandbox
from sandlot.engines.local import LocalEngine
from sandlot.engines.local.mounts import mounts_under, unmount
from sandlot.images.store import ImageStore
from sandlot.sdk.errors import SandboxError
from sandlot.server.config import ProbeSettings

pytestmark = pytest.mark.root

DEADLINE = 90.0
#: Quick, for the test: a probe every 0.2 s, a restart after 2 misses, error after 2 failures.
FAST = ProbeSettings(
    interval=0.2, misses_before_restart=2, restarts_before_error=2, ready_timeout=20
)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[RunningServer, LocalEngine]]:
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="sl-watch-"))
    engine = LocalEngine(root / "state", images=ImageStore(IMAGES_DIR))
    srv = start_server(
        engine, f"sqlite:///{root / 'db'}", unix_path=root / "s.sock", agent_probe=FAST
    )
    try:
        yield srv, engine
    finally:
        srv.stop()
        for point in mounts_under(root):
            unmount(point)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sandbox(server: tuple[RunningServer, LocalEngine]) -> Iterator[Sandbox]:
    srv, _ = server
    sb = Sandbox.create(image="default", api_url=srv.url)
    try:
        yield sb
    finally:
        sb.delete()


def _events(srv: RunningServer, sandbox_id: str) -> list[dict[str, str]]:
    with srv.client() as c:
        r = c.get(f"/v1/sandboxes/{sandbox_id}/events")
        assert r.status_code == 200, r.text
        events: list[dict[str, str]] = r.json()["events"]
        return events


def _wait_for_event(srv: RunningServer, sandbox_id: str, kind: str) -> dict[str, str]:
    deadline = time.monotonic() + DEADLINE
    while True:
        for event in _events(srv, sandbox_id):
            if event["kind"] == kind:
                return event
        assert time.monotonic() < deadline, (kind, _events(srv, sandbox_id))
        time.sleep(0.05)


def _init_pid(engine: LocalEngine, sandbox_id: str) -> int:
    pid = int((engine.sandboxes_dir / sandbox_id / "init.pid").read_text())
    assert pid > 1
    return pid


def _agent_pid(init: int) -> int:
    for task in Path(f"/proc/{init}/task").iterdir():
        for child in (task / "children").read_text().split():
            if Path(f"/proc/{child}/comm").read_text().strip() == "sandlot-agent":
                return int(child)
    raise AssertionError("no agent under pid 1")


def test_inflight_exec_gets_a_clear_error(
    server: tuple[RunningServer, LocalEngine], sandbox: Sandbox
) -> None:
    _, engine = server
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(sandbox.exec("sleep 60"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    init = _init_pid(engine, sandbox.id)
    deadline = time.monotonic() + DEADLINE
    while "sleep 60" not in os.popen(f"ps -o args= --ppid {_agent_pid(init)}").read():
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.02)
    os.kill(_agent_pid(init), signal.SIGKILL)
    thread.join(DEADLINE)
    assert not thread.is_alive(), "the exec hung"
    assert isinstance(outcome[0], SandboxError), outcome
    assert "agent" in str(outcome[0]), outcome
    assert sandbox.exec("echo back").stdout == "back\n"


def test_dead_pid1_is_restarted_from_outside(
    server: tuple[RunningServer, LocalEngine], sandbox: Sandbox
) -> None:
    srv, engine = server
    sandbox.filesystem.write_file("/root/kept", "still here")
    os.kill(_init_pid(engine, sandbox.id), signal.SIGKILL)  # the whole sandbox stops
    event = _wait_for_event(srv, sandbox.id, "agent restarted")
    assert "processes were lost" in event["detail"], event
    assert sandbox.exec("cat /root/kept").stdout == "still here"
    sandbox.refresh()
    assert sandbox.status == "running"


def test_stopped_agent_is_restarted_and_its_exec_ends(
    server: tuple[RunningServer, LocalEngine], sandbox: Sandbox
) -> None:
    """``kill -STOP -1`` stops the agent, which pid 1 cannot see: the exec that sent it would
    wait for ever, and so would every later call. The probe restarts the sandbox; the exec ends
    with an error."""
    srv, _ = server
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(sandbox.exec("kill -STOP -1; sleep 1"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for_event(srv, sandbox.id, "agent restarted")
    thread.join(DEADLINE)
    assert not thread.is_alive(), "the exec hung"
    assert isinstance(outcome[0], SandboxError), outcome
    assert sandbox.exec("echo back").stdout == "back\n"


def test_repeated_failed_restarts_mark_the_sandbox_error(
    server: tuple[RunningServer, LocalEngine],
) -> None:
    srv, engine = server
    sb = Sandbox.create(image="default", api_url=srv.url)
    try:
        # Make a restart impossible: the runtime cannot read the sandbox's OCI config.
        (engine.sandboxes_dir / sb.id / "bundle" / "config.json").write_text("{}")
        os.kill(_init_pid(engine, sb.id), signal.SIGKILL)
        event = _wait_for_event(srv, sb.id, "error")
        assert "restarting it failed" in event["detail"], event
        kinds = [e["kind"] for e in _events(srv, sb.id)]
        assert kinds.count("agent restart failed") == FAST.restarts_before_error, kinds
        assert "agent unreachable" in kinds
        sb.refresh()
        assert sb.status == "error"
        with pytest.raises(SandboxError) as raised:
            sb.exec("true")
        assert "is in error" in str(raised.value) and "health probes" in str(raised.value)
        assert not sb.is_healthy()
    finally:
        sb.delete()
