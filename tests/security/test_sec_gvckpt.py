"""Attacks on gVisor's deep sleep that keeps memory (engines/local/checkpoint.py), from code
inside the sandbox: it cannot keep its memory held by refusing the checkpoint, cannot change the
hook runsc runs inside it, and cannot get the engine to adopt a host socket in place of its
agent's when it wakes. Real runsc sandboxes; skipped without runsc."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.local import create_sandbox, local_engine_unavailable

from sandlot.engines.base import SandboxState
from sandlot.engines.local import LocalEngine, checkpoint
from sandlot.engines.local.mounts import mounts_under, unmount

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.root,
    pytest.mark.skipif(
        shutil.which("runsc") is None,
        reason="runsc is not installed (scripts/setup.sh builds it; SANDLOT_SKIP_RUNSC skips it)",
    ),
]

PARK_OWN_AGENT = (
    "kill -USR1 $(cat /.sandlot/run/agent.pid); "
    "while [ -e /.sandlot/run/agent.sock ]; do sleep 0.01; done"
)


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    """runsc's gofer reaches the sandbox's files as its uid: parents searchable by all."""
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    path = Path(tempfile.mkdtemp(prefix="sandlot-sec-gvckpt-", dir="/var/tmp"))
    path.chmod(0o711)
    yield path
    for point in mounts_under(path):
        unmount(point)
    shutil.rmtree(path, ignore_errors=True)


async def test_a_sandbox_that_stops_its_agent_still_sleeps_and_frees_its_memory(
    engine: LocalEngine,
) -> None:
    """SIGSTOP on its own agent: the agent never lets go of its socket, so no checkpoint can
    be made. Deep sleep must still end the sandbox (bounded by the hook's 5 s wait), leave no
    image, say why, and wake it afresh."""
    sb = await create_sandbox(engine, runtime="gvisor")
    try:
        stop_agent = (
            "sleep 600 >/dev/null 2>&1 & sleep 0.2; kill -STOP $(cat /.sandlot/run/agent.pid)"
        )
        # Its answer may never come (the agent stops): not awaited; the agent going silent is.
        request = asyncio.create_task(sb.client.post("/start_process", json={"cmd": stop_agent}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(sb.client.get("/health"), 1.0)
            except (TimeoutError, httpx.TransportError):
                break
            await asyncio.sleep(0.05)
        request.cancel()
        started = time.monotonic()
        note = await engine.stop(sb.id)
        assert time.monotonic() - started < 30
        assert note is not None and "memory not kept" in note, note
        assert (await engine.inspect(sb.id)).state is SandboxState.STOPPED
        assert not checkpoint.image_dir(engine.sandboxes_dir / sb.id).exists()
        await engine.start(sb.id)
        await sb.wait_healthy(timeout=30)
        assert (await sb.run("pidof sleep"))["code"] != 0  # a cold start: processes lost
    finally:
        await sb.aclose()


async def test_the_hook_runsc_runs_inside_cannot_be_changed_by_the_sandbox(
    engine: LocalEngine,
) -> None:
    sb = await create_sandbox(engine, runtime="gvisor")
    try:
        out = await sb.run(
            "echo 'exit 0' > /.sandlot/runtime/bin/sandlot-checkpoint; "
            "rm -f /.sandlot/runtime/bin/busybox"
        )
        assert out["code"] != 0
        assert "Read-only file system" in out["stderr"]
    finally:
        await sb.aclose()


async def test_a_symlink_in_place_of_the_agent_socket_is_never_adopted_on_wake(
    engine: LocalEngine, tmp_path: Path
) -> None:
    """The sandbox parks its own agent and puts a symlink to a host socket where the agent's
    socket goes; it then sleeps and wakes. The engine removes what is there before the restore
    and adopts only a socket it opened without following links: the host socket never sees a
    connection, and the gateway's path leads to the sandbox's own agent."""
    bait_path = tmp_path / "bait.sock"
    bait = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bait.bind(str(bait_path))
    bait.listen(8)
    bait.setblocking(False)
    sb = await create_sandbox(engine, runtime="gvisor")
    try:
        await sb.client.post(
            "/start_process",
            json={"cmd": f"{PARK_OWN_AGENT}; ln -s {bait_path} /.sandlot/run/agent.sock"},
        )
        directory = engine.sandboxes_dir / sb.id
        made = directory / "layer" / "sandlot" / "run" / "agent.sock"
        deadline = time.monotonic() + 30
        while not made.is_symlink() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert made.is_symlink()
        await engine.stop(sb.id)
        await engine.start(sb.id)
        await sb.aclose()
        from support.local import SandboxHandle

        sb = SandboxHandle(await engine.inspect(sb.id), sb.secret)
        await sb.wait_healthy(timeout=30)
        assert (await sb.sh("echo agent")) == "agent\n"
        with pytest.raises(BlockingIOError):
            bait.accept()
    finally:
        bait.close()
        await sb.aclose()
