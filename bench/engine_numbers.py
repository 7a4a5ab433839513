"""Local engine figures: create -> agent healthy, delete, memory per idle sandbox.

The suite (``python -m bench``) measures this and more, with the engine's stages timed one by
one (:mod:`bench.stages`); this script stays as the small engine-only check.

Run as root: ``.venv/bin/python bench/engine_numbers.py [N]``. Prints medians for the default and
the busybox image. Memory is the sandbox cgroup's own accounting (memory.usage_in_bytes on v1,
memory.current on v2: RSS + page cache charged to the sandbox) and the PSS of its processes.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from sandlot.engines.base import SandboxSpec
from sandlot.engines.local import LocalEngine, new_sandbox_id
from sandlot.images.store import default_store
from sandlot.instance_types import get_instance_type


def pss_kib(pid: int) -> int:
    """PSS of a process and its descendants (via /proc/PID/smaps_rollup)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
        except OSError:
            pass
    return total


async def wait_health(sock: str) -> None:
    transport = httpx.AsyncHTTPTransport(uds=sock)
    async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
        while True:
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                await asyncio.sleep(0.002)


async def measure(engine: LocalEngine, image: str, n: int) -> dict[str, float]:
    creates, deletes, mem, pss = [], [], [], []
    for _ in range(n):
        spec = SandboxSpec(
            id=new_sandbox_id(), image=image, secret="s", instance_type=get_instance_type("micro")
        )
        t0 = time.perf_counter()
        info = await engine.create(spec)
        assert info.agent_address.unix_path
        await wait_health(info.agent_address.unix_path)
        creates.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(1.0)
        mem.append((engine.memory_usage(spec.id) or 0) / 2**20)
        pss.append(pss_kib(info.pid or 0) / 1024)
        t0 = time.perf_counter()
        await engine.delete(spec.id)
        deletes.append((time.perf_counter() - t0) * 1000)
    return {
        "create_to_healthy_ms": statistics.median(creates),
        "delete_ms": statistics.median(deletes),
        "idle_cgroup_mib": statistics.median(mem),
        "idle_pss_mib": statistics.median(pss),
        "samples": n,
    }


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory() as tmp:
        engine = LocalEngine(Path(tmp), images=default_store())
        engine.agent_runtime()
        results = {image: await measure(engine, image, n) for image in ("default", "busybox")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
