"""gVisor checkpoint and restore times against the memory a process in the sandbox wrote.

Engine level (a LocalEngine in its own state directory, no server): a gVisor sandbox whose
process fills N MiB with random bytes (so no page is zero and none compresses), then per round
``checkpoint`` (runsc writing the image into the sandbox's directory: the time deep sleep
spends saving) and ``start`` until the agent answers ``/health`` again (the time a deep wake
spends restoring, the gateway's part aside). runsc's removal of the stopped sandbox after a
save (~1.5 s here, spent waiting for its sandbox process) is not counted: it is not on any
request's path.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from typing import Any

import httpx

from bench.machine import make_tmp
from bench.server import images_dir
from bench.stats import Result, summarize

MiB = 2**20
SECRET = "bench-gvisor-checkpoint"


def measure(
    sizes: dict[str, int], rounds: int, log: Callable[[str], None]
) -> tuple[dict[str, Result], dict[str, Result]]:
    return asyncio.run(_measure(sizes, rounds, log))


async def _measure(
    sizes: dict[str, int], rounds: int, log: Callable[[str], None]
) -> tuple[dict[str, Result], dict[str, Result]]:
    from sandlot.engines.local import LocalEngine, checkpoint, new_sandbox_id
    from sandlot.engines.local.mounts import mounts_under, unmount
    from sandlot.images.store import ImageStore

    state = make_tmp("slg-")
    state.chmod(0o711)  # runsc's gofer reaches the sandbox's files as the sandbox's uid
    engine = LocalEngine(state / "state", images=ImageStore(images_dir()))
    saves: dict[str, Result] = {}
    restores: dict[str, Result] = {}
    try:
        runtime = engine._runtime_named("gvisor")
        for label, size in sizes.items():
            log(f"gvisor: checkpoint/restore with {label} written")
            sandbox_id = new_sandbox_id()
            client = await _create(engine, sandbox_id, "micro" if size < 256 * MiB else "medium")
            try:
                await _fill(client, size)
                image = checkpoint.image_dir(engine.sandboxes_dir / sandbox_id)
                save_ms: list[float] = []
                restore_ms: list[float] = []
                written: list[int] = []
                for _ in range(rounds):
                    usage = engine.memory_usage(sandbox_id) or size
                    t0 = time.perf_counter()
                    saved = await checkpoint.checkpoint(
                        runtime, sandbox_id, image, memory_bytes=usage
                    )
                    save_ms.append((time.perf_counter() - t0) * 1000)
                    written.append(saved.bytes)
                    await runtime.kill_all(sandbox_id)
                    await runtime.delete(sandbox_id)
                    t0 = time.perf_counter()
                    await engine.start(sandbox_id)
                    await _healthy(client)
                    restore_ms.append((time.perf_counter() - t0) * 1000)
                how = {"bytes_written_by_the_process": size, "image_mib": max(written) / MiB}
                saves[label] = summarize(save_ms, **how)
                restores[label] = summarize(
                    restore_ms, **how, how="engine start from the checkpoint -> /health answers"
                )
            finally:
                await client.aclose()
                await engine.delete(sandbox_id)
    finally:
        for info in await engine.list():
            await engine.delete(info.id)
        for point in mounts_under(state):
            unmount(point)
        shutil.rmtree(state, ignore_errors=True)
    return saves, restores


async def _create(engine: Any, sandbox_id: str, instance_type: str) -> httpx.AsyncClient:
    from sandlot.engines.base import SandboxSpec
    from sandlot.instance_types import get_instance_type

    info = await engine.create(
        SandboxSpec(
            id=sandbox_id,
            image="default",
            instance_type=get_instance_type(instance_type),
            secret=SECRET,
            runtime="gvisor",
        )
    )
    client = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=info.agent_address.unix_path),
        base_url="http://agent",
        headers={"Authorization": f"Bearer {SECRET}"},
        timeout=120,
    )
    await _healthy(client)
    return client


async def _healthy(client: httpx.AsyncClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the gVisor sandbox's agent did not answer")
        await asyncio.sleep(0.002)


async def _fill(client: httpx.AsyncClient, size: int) -> None:
    """A process holding ``size`` bytes of random data; returns once it is all written."""
    mib = max(1, size // MiB)
    script = (
        "import os,time\n"
        f"b = bytearray(os.urandom(1 << 20)) * {mib}\n"
        "open('/tmp/filled', 'w').close()\n"
        "time.sleep(1e9)\n"
    )
    r = await client.post("/start_process", json={"cmd": f"python3 -c {_quote(script)}"})
    r.raise_for_status()
    deadline = time.monotonic() + 120
    while True:
        out = (await client.post("/run", json={"cmd": "test -e /tmp/filled"})).json()
        if out["code"] == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the process did not write {mib} MiB in time")
        await asyncio.sleep(0.05)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
