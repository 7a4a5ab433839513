"""gVisor checkpoint/restore (engines/local/checkpoint.py) and the deep sleep built on it: a
sandbox's running processes come back with their memory; the image lives with the sandbox,
survives a new engine (a server restart), goes with the sandbox, and is refused before
anything is written when the disk cannot hold it. Real runsc sandboxes; skipped without runsc.
"""

from __future__ import annotations

import asyncio
import re
import stat
import time
from pathlib import Path

import pytest
from support.local import SandboxHandle
from support.loopfs import loop_filesystem

from sandlot.engines.base import InsufficientResources, SandboxState
from sandlot.engines.local import LocalEngine, checkpoint
from sandlot.images.store import default_store

from .test_gvisor_engine import pytestmark  # noqa: F401  (skips without runsc)

#: A shell counter: its count lives in the shell's memory, each value appended to a file.
COUNTER = "i=0; while :; do i=$((i+1)); echo $i >> /tmp/count; sleep 0.1; done"


async def _count(sb: SandboxHandle) -> list[int]:
    out = await sb.sh("cat /tmp/count 2>/dev/null || true")
    return [int(x) for x in out.split()]


async def _wait_count(sb: SandboxHandle, above: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        values = await _count(sb)
        if values and values[-1] > above:
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"the counter did not pass {above}: {values[-5:]}")
        await asyncio.sleep(0.05)


async def _start_counter(sb: SandboxHandle) -> str:
    r = await sb.client.post("/start_process", json={"cmd": COUNTER})
    assert r.status_code == 201, r.text
    await _wait_count(sb, 3)
    return str(r.json()["id"])


async def _reconnect(engine: LocalEngine, sb: SandboxHandle) -> SandboxHandle:
    await sb.aclose()
    again = SandboxHandle(await engine.inspect(sb.id), sb.secret)
    await again.wait_healthy(timeout=30)
    return again


async def test_deep_sleep_keeps_a_counting_process_and_its_memory(
    engine: LocalEngine, make_sandbox
) -> None:  # type: ignore[no-untyped-def]
    sb: SandboxHandle = await make_sandbox(runtime="gvisor")
    process_id = await _start_counter(sb)
    for _ in range(2):  # twice: a restored kernel keeps runsc's hook and must save again
        note = await engine.stop(sb.id)
        assert note is not None and "memory kept" in note
        image = checkpoint.image_dir(engine.sandboxes_dir / sb.id)
        assert checkpoint.has_image(image)
        assert (await engine.inspect(sb.id)).state is SandboxState.STOPPED
        assert engine.memory_usage(sb.id) is None  # its cgroup is gone: its memory is freed
        await engine.start(sb.id)
        assert not image.exists(), "a restored image is stale: it goes"
        sb = await _reconnect(engine, sb)  # the same secret: the agent kept it in memory
        values = await _count(sb)
        last = values[-1]
        values = await _wait_count(sb, last)
        # One count after the other: the shell's own count went on (a new one starts at 1).
        assert values == list(range(1, len(values) + 1)), values[-10:]
        listed = (await sb.client.get("/list_processes")).json()["processes"]
        assert [(p["id"], p["status"]) for p in listed] == [(process_id, "running")]
    await sb.aclose()


async def test_the_image_is_root_only_survives_a_new_engine_and_goes_with_the_sandbox(
    engine: LocalEngine, make_sandbox
) -> None:  # type: ignore[no-untyped-def]
    sb: SandboxHandle = await make_sandbox(runtime="gvisor")
    await _start_counter(sb)
    await engine.stop(sb.id)
    directory = engine.sandboxes_dir / sb.id
    image = checkpoint.image_dir(directory)
    st = image.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    files = sorted(image.iterdir())
    assert {f.name for f in files} >= {"checkpoint.img", "pages.img"}
    assert all((f.stat().st_uid, stat.S_IMODE(f.stat().st_mode)) == (0, 0o600) for f in files)
    # A server restart: a new engine on the same state directory finds and restores it.
    again = LocalEngine(engine.state_dir, images=default_store())
    assert sb.id not in await again.recover()
    await again.start(sb.id)
    sb = await _reconnect(again, sb)
    await _wait_count(sb, (await _count(sb))[-1])
    await engine.stop(sb.id)
    assert checkpoint.has_image(image)
    await sb.aclose()
    await engine.delete(sb.id)
    assert not directory.exists()


async def test_a_checkpoint_the_disk_cannot_hold_is_refused_before_writing(
    engine: LocalEngine, make_sandbox, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    sb: SandboxHandle = await make_sandbox(runtime="gvisor")
    hold = "python3 -c 'b = bytearray(48 << 20); import time; time.sleep(3600)'"
    r = await sb.client.post("/start_process", json={"cmd": hold})
    assert r.status_code == 201, r.text
    usage = 0
    deadline = time.monotonic() + 30
    while usage < 48 << 20 and time.monotonic() < deadline:
        usage = engine.memory_usage(sb.id) or 0
        await asyncio.sleep(0.05)
    runtime = engine._runtime_named("gvisor")
    with loop_filesystem(tmp_path, 24) as small:
        with pytest.raises(InsufficientResources, match=r"needs about \d+ MiB .* \d+ MiB are free"):
            await checkpoint.checkpoint(runtime, sb.id, small / "image", memory_bytes=usage)
        assert list(small.iterdir()) == [] or [p.name for p in small.iterdir()] == ["lost+found"]
    assert (await sb.sh("echo still running")) == "still running\n"


async def test_leave_running_checkpoints_and_the_agent_listens_again(
    engine: LocalEngine, make_sandbox
) -> None:  # type: ignore[no-untyped-def]
    sb: SandboxHandle = await make_sandbox(runtime="gvisor")
    await _start_counter(sb)
    runtime = engine._runtime_named("gvisor")
    directory = engine.sandboxes_dir / sb.id
    image = directory / "kept-image"
    saved = await checkpoint.checkpoint(
        runtime, sb.id, image, memory_bytes=engine.memory_usage(sb.id) or 0, leave_running=True
    )
    assert saved.bytes > 0 and checkpoint.has_image(image)
    from sandlot.engines.local import gvisor

    await gvisor.adopt_agent_socket(
        directory / "layer" / "sandlot" / "run" / "agent.sock", directory / "agent.sock"
    )
    sb = await _reconnect(engine, sb)
    await _wait_count(sb, (await _count(sb))[-1])
    checkpoint.remove(image)
    await sb.aclose()


async def test_deep_sleep_on_a_disk_that_cannot_hold_the_memory_stops_it_cold_and_says_why(
    engine_state: Path,
) -> None:
    """The state directory on a small disk, nearly full: deep sleep refuses the checkpoint
    before writing, stops the sandbox as crun does (memory freed, files kept) and says why."""
    import os
    import subprocess

    with loop_filesystem(engine_state, 3072) as disk:
        disk.chmod(0o711)
        small = LocalEngine(disk / "state", images=default_store())
        sb: SandboxHandle | None = None
        try:
            from support.local import create_sandbox

            sb = await create_sandbox(small, runtime="gvisor")
            await sb.sh("echo kept > /root/f")
            st = os.statvfs(disk)
            ballast = st.f_bavail * st.f_frsize - 8 * 1024 * 1024  # 8 MiB left
            subprocess.run(["fallocate", "-l", str(ballast), str(disk / "ballast")], check=True)
            note = await small.stop(sb.id)
            assert note is not None and "memory not kept" in note, note
            assert re.search(r"needs about \d+ MiB on the host's disk and \d+ MiB are free", note)
            assert str(disk) not in note
            assert not checkpoint.image_dir(small.sandboxes_dir / sb.id).exists()
            assert small.memory_usage(sb.id) is None
            (disk / "ballast").unlink()
            await small.start(sb.id)
            await sb.wait_healthy(timeout=30)
            assert (await sb.sh("cat /root/f")) == "kept\n"
        finally:
            if sb is not None:
                await sb.aclose()
            for info in await small.list():
                await small.delete(info.id)
