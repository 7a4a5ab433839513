"""Every figure for sandlot, measured the way a user sees it: the SDK (sync ``Sandbox`` or
``AsyncSandbox``) against a private server on a Unix socket (:class:`bench.server.BenchServer`),
and, for ``exec_rtt_agent_ms``, straight to a sandbox's agent socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.server import BenchServer
from bench.stats import Result, ms_since, skipped, summarize
from sandlot import AsyncSandbox, Sandbox

#: Printed by the streaming workload inside the sandbox: one wall-clock timestamp per line.
#: The sandbox shares the host's clock (no time namespace), so receive - printed is the latency.
STREAM_SCRIPT = (
    "import sys,time\n"
    "for i in range({lines}):\n"
    "    sys.stdout.write('%.6f\\n' % time.time()); sys.stdout.flush(); time.sleep({gap})\n"
)


def _cgroup_memory(sandbox_id: str) -> tuple[int | None, str]:
    from sandlot.engines.local import cgroups

    layout = cgroups.detect_layout()
    name = "memory.current" if layout is cgroups.CgroupLayout.V2 else "memory.usage_in_bytes"
    return cgroups.memory_usage_bytes(layout, sandbox_id), name


class SandlotBench:
    def __init__(
        self, server: BenchServer, log: Callable[[str], None], runtime: str = "crun"
    ) -> None:
        self.srv = server
        self.log = log
        #: What every sandbox is created with beyond the defaults (the gVisor column's runtime).
        self.kw: dict[str, Any] = {} if runtime == "crun" else {"runtime": runtime}

    def create(self, image: str = "default") -> Sandbox:
        return Sandbox.create(image=image, instance_type="micro", api_url=self.srv.url, **self.kw)

    def warm_up(self) -> None:
        """First create builds/loads caches (agent runtime, page cache): not a sample."""
        with self.create() as sb:
            sb.exec("true")
        with self.create("busybox") as sb:
            sb.exec("true")

    # -- time to interactive ----------------------------------------------------------------------

    def tti_cold(self, n: int) -> Result:
        total, create, first_exec, delete = [], [], [], []
        for _ in range(n):
            t0 = time.perf_counter()
            sb = self.create()
            try:
                t1 = time.perf_counter()
                result = sb.exec("echo hi")
                t2 = time.perf_counter()
                if result.stdout != "hi\n":
                    raise RuntimeError(f"echo hi answered {result.stdout!r}")
                total.append((t2 - t0) * 1000)
                create.append((t1 - t0) * 1000)
                first_exec.append((t2 - t1) * 1000)
            finally:
                t3 = time.perf_counter()
                sb.delete()
                delete.append(ms_since(t3))
                sb.close()
        return summarize(
            total,
            create_ms=summarize(create),
            first_exec_ms=summarize(first_exec),
            delete_ms=summarize(delete),
        )

    def tti_warm(self, n: int, refill_s: float = 2.0) -> Result:
        """create -> first ``echo hi`` on a server keeping a warm pool (``--pool
        default:micro=2``); each sample waits for the pool to refill first. A sample is kept
        only if the sandbox's events say it came from the pool."""
        total, cold = [], 0
        for _ in range(n):
            time.sleep(refill_s)
            t0 = time.perf_counter()
            sb = self.create()
            try:
                result = sb.exec("echo hi")
                elapsed = ms_since(t0)
                if result.stdout != "hi\n":
                    raise RuntimeError(f"echo hi answered {result.stdout!r}")
                if self._from_pool(sb.id):
                    total.append(elapsed)
                else:
                    cold += 1
            finally:
                sb.delete()
                sb.close()
        if not total:
            return skipped(f"no create was served from the warm pool ({cold} cold)")
        return summarize(total, cold_fallbacks=cold, how="server with --pool default:micro=2")

    def _from_pool(self, sandbox_id: str) -> bool:
        transport = httpx.HTTPTransport(uds=self.srv.socket_path)
        with httpx.Client(transport=transport, base_url="http://s", timeout=10) as c:
            r = c.get(f"/v1/sandboxes/{sandbox_id}/events")
            events = r.json().get("events", []) if r.status_code == 200 else []
        return any("warm pool" in str(e.get("detail", "")) for e in events)

    # -- exec --------------------------------------------------------------------------------------

    def exec_rtt(self, n: int) -> tuple[Result, Result]:
        """``true`` through SDK -> server -> agent, then straight to the agent's socket."""
        with self.create() as sb:
            for _ in range(5):
                sb.exec("true")
            sdk = []
            for _ in range(n):
                t0 = time.perf_counter()
                r = sb.exec("true")
                sdk.append(ms_since(t0))
                assert r.exit_code == 0
            agent = []
            transport = httpx.HTTPTransport(uds=self.srv.agent_socket(sb.id))
            headers = {"authorization": f"Bearer {sb.secret}"}
            with httpx.Client(transport=transport, base_url="http://agent", timeout=30) as c:
                for _ in range(5):
                    c.post("/run", json={"cmd": "true"}, headers=headers)
                for _ in range(n):
                    t0 = time.perf_counter()
                    resp = c.post("/run", json={"cmd": "true"}, headers=headers)
                    agent.append(ms_since(t0))
                    if resp.status_code != 200 or resp.json().get("code") != 0:
                        raise RuntimeError(f"agent /run answered {resp.status_code}: {resp.text}")
        return (
            summarize(sdk, path="SDK exec() -> server gateway -> agent /run_streaming"),
            summarize(agent, path="httpx -> agent socket, POST /run"),
        )

    def exec_throughput(
        self, concurrency: list[int], sandboxes: int, ops: int, rounds: int
    ) -> dict[str, Result]:
        async def run() -> dict[str, Result]:
            boxes = await asyncio.gather(
                *[
                    AsyncSandbox.create(image="default", api_url=self.srv.url)
                    for _ in range(sandboxes)
                ]
            )
            try:
                out: dict[str, Result] = {}
                for c in concurrency:
                    rates = []
                    for _ in range(rounds):
                        counter = iter(range(ops))

                        async def worker(w: int, counter: Any = counter) -> None:
                            for i in counter:
                                r = await boxes[(w + i) % len(boxes)].exec("true")
                                assert r.exit_code == 0

                        t0 = time.perf_counter()
                        await asyncio.gather(*[worker(w) for w in range(c)])
                        rates.append(ops / (time.perf_counter() - t0))
                    out[f"c={c}"] = summarize(
                        rates, higher_is_better=True, ops_per_round=ops, sandboxes=len(boxes)
                    )
                return out
            finally:
                for sb in boxes:
                    with contextlib.suppress(Exception):
                        await sb.delete()
                    await sb.close()

        return asyncio.run(run())

    # -- streaming ---------------------------------------------------------------------------------

    def stream_latency(self, lines: int, gap_s: float = 0.02) -> Result:
        script = STREAM_SCRIPT.format(lines=lines, gap=gap_s)
        cmd = "python3 -c " + _shell_quote(script)
        with self.create() as sb:
            sb.exec("true")
            samples: list[float] = []
            buf = ""
            for event in sb.exec_stream(cmd):
                if event.type != "stdout":
                    continue
                now = time.time()
                buf += event.data["data"]
                *done, buf = buf.split("\n")
                samples += [(now - float(x)) * 1000 for x in done if x]
        if len(samples) < lines:
            raise RuntimeError(f"stream: got {len(samples)} of {lines} lines")
        return summarize(
            samples[1:] if len(samples) > 2 else samples,
            note="first line dropped (python3 start races the stream setup)",
        )

    # -- files -------------------------------------------------------------------------------------

    def files(
        self, sizes: dict[str, int], rounds: int
    ) -> tuple[dict[str, Result], dict[str, Result]]:
        write: dict[str, Result] = {}
        read: dict[str, Result] = {}
        with self.create() as sb:
            for label, size in sizes.items():
                data = os.urandom(size)
                w, r = [], []
                for i in range(rounds):
                    path = f"/root/bench-{label}-{i}.bin"
                    t0 = time.perf_counter()
                    sb.filesystem.write_file(path, data)
                    w.append(size / 2**20 / (time.perf_counter() - t0))
                    t0 = time.perf_counter()
                    back = sb.filesystem.read_bytes(path)
                    r.append(size / 2**20 / (time.perf_counter() - t0))
                    if back != data:
                        raise RuntimeError(f"file {label}: read back differs (binary safety)")
                    sb.exec(f"rm -f {path}")
                write[label] = summarize(w, higher_is_better=True, bytes=size)
                read[label] = summarize(r, higher_is_better=True, bytes=size)
        return write, read

    # -- memory ------------------------------------------------------------------------------------

    def idle_memory(self, count: int, settle_s: float) -> Result:
        async def run() -> Result:
            boxes: list[AsyncSandbox] = []
            try:
                sem = asyncio.Semaphore(4)

                async def one() -> None:
                    async with sem:
                        boxes.append(
                            await AsyncSandbox.create(
                                image="default", api_url=self.srv.url, **self.kw
                            )
                        )

                await asyncio.gather(*[one() for _ in range(count)])
                await asyncio.sleep(settle_s)
                values, source = [], ""
                for sb in boxes:
                    used, source = _cgroup_memory(sb.id)
                    if used is not None:
                        values.append(used / 2**20)
                if not values:
                    return skipped("no cgroup memory accounting readable for the sandboxes")
                return summarize(
                    values,
                    running=len(boxes),
                    source=f"cgroup {source} of each sandbox (RSS + page cache "
                    "charged to it), after all were created and "
                    f"{settle_s:g} s of idling",
                    image="default",
                )
            finally:
                await _delete_all(boxes)

        return asyncio.run(run())

    def max_idle(self, limit: int, min_available_mib: int, budget_s: float) -> Result:
        """Create idle busybox sandboxes until ``limit``, an error, low memory or the budget."""

        async def run() -> Result:
            boxes: list[AsyncSandbox] = []
            stop = f"reached the benchmark's cap of {limit}"
            t_start = time.perf_counter()
            try:
                while len(boxes) < limit:
                    avail = _mem_available_mib()
                    if avail < min_available_mib:
                        stop = f"host MemAvailable fell to {avail} MiB (guard {min_available_mib})"
                        break
                    if time.perf_counter() - t_start > budget_s:
                        stop = f"time budget of {budget_s:g} s"
                        break
                    batch = min(4, limit - len(boxes))
                    results = await asyncio.gather(
                        *[
                            AsyncSandbox.create(image="busybox", api_url=self.srv.url)
                            for _ in range(batch)
                        ],
                        return_exceptions=True,
                    )
                    errors = [r for r in results if isinstance(r, BaseException)]
                    boxes += [r for r in results if isinstance(r, AsyncSandbox)]
                    if errors:
                        stop = f"create failed: {type(errors[0]).__name__}: {errors[0]}"[:300]
                        break
                elapsed = time.perf_counter() - t_start
                death = self.srv.died()
                if death:
                    stop = f"the sandlot server died: {death}"[-600:]
                ok = None
                if boxes and not death:
                    with contextlib.suppress(Exception):
                        ok = await boxes[-1].exec("true")
                mem = [m / 2**20 for m in (_cgroup_memory(b.id)[0] for b in boxes) if m]
                return {
                    "value": len(boxes),
                    "limit": stop,
                    "image": "busybox",
                    "seconds_to_create": round(elapsed, 1),
                    "last_still_answers": bool(ok and ok.exit_code == 0),
                    "cgroup_mib_median": round(sorted(mem)[len(mem) // 2], 2) if mem else None,
                    "host_mem_available_mib_at_end": _mem_available_mib(),
                }
            finally:
                await _delete_all(boxes)

        return asyncio.run(run())

    # -- sleep and wake -----------------------------------------------------------------------

    def wake(self, n: int, light: bool, asleep_within_s: float = 20.0) -> Result:
        """Sandboxes with ``idle_timeout=1`` fall asleep (light: frozen; deep: stopped); then
        the time for ``exec("true")`` to return, which wakes it through the gateway."""
        kind = "light" if light else "deep"
        boxes: list[Sandbox] = []
        try:
            for _ in range(n):
                boxes.append(
                    Sandbox.create(
                        image="default",
                        api_url=self.srv.url,
                        idle_timeout=1,
                        _experimental_enable_light_sleep=light,
                        **self.kw,
                    )
                )
            deadline = time.monotonic() + asleep_within_s
            for sb in boxes:
                while True:
                    sb.refresh()
                    if sb.status == "sleeping" and sb.info.get("sleep_kind") == kind:
                        break
                    if time.monotonic() > deadline:
                        return skipped(
                            f"sandboxes did not fall into {kind} sleep within "
                            f"{asleep_within_s:g} s of idle_timeout=1 (status "
                            f"{sb.status!r}; lifecycle: issue 5)"
                        )
                    time.sleep(0.1)
            samples = []
            for sb in boxes:
                t0 = time.perf_counter()
                r = sb.exec("true")
                samples.append(ms_since(t0))
                assert r.exit_code == 0
        finally:
            for sb in boxes:
                with contextlib.suppress(Exception):
                    sb.delete()
                sb.close()
        return summarize(
            samples,
            how=f"{kind} sleep (idle_timeout=1) -> exec('true') returns (the exec itself included)",
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    def create_delete(self, concurrency: int, cycles: int, rounds: int) -> Result:
        async def run() -> Result:
            rates = []
            for _ in range(rounds):
                counter = iter(range(cycles))

                async def worker(counter: Any = counter) -> None:
                    for _ in counter:
                        sb = await AsyncSandbox.create(image="default", api_url=self.srv.url)
                        try:
                            await sb.delete()
                        finally:
                            await sb.close()

                t0 = time.perf_counter()
                await asyncio.gather(*[worker() for _ in range(concurrency)])
                rates.append(cycles / (time.perf_counter() - t0))
            return summarize(
                rates, higher_is_better=True, concurrency=concurrency, cycles_per_round=cycles
            )

        return asyncio.run(run())


async def _delete_all(boxes: list[AsyncSandbox]) -> None:
    sem = asyncio.Semaphore(8)

    async def one(sb: AsyncSandbox) -> None:
        async with sem:
            with contextlib.suppress(Exception):
                await sb.delete()
            with contextlib.suppress(Exception):
                await sb.close()

    await asyncio.gather(*[one(sb) for sb in boxes])


def _mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2)
