"""Where the time goes: stage timers around the local engine's create/delete, and cProfile of
the server (and of the SDK client) while it serves creates and execs.

The stage timers wrap the engine's own functions in this process (a LocalEngine on a private
state dir and the host's images); nothing in ``src/`` changes. The profiles come from a private
server started under ``python -m cProfile`` (:class:`bench.server.BenchServer`), so they show the
server's Python work per request; waits on subprocesses (mkfs, crun) are in the stage timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import functools
import inspect
import io
import pstats
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from bench.machine import make_tmp
from bench.server import BenchServer, images_dir

CREATE_STAGES = [
    ("images.resolve", "image lookup"),
    ("agent_runtime", "agent runtime lookup"),
    ("_allocate_slot", "uid-range slot (scans every sandbox's meta.json)"),
    ("disks.take", "disk quota: a pre-formatted ext4 image from the stock (mkfs if empty)"),
    ("mounts.mount_existing_disk_image", "disk quota: loop device + mount(2)"),
    ("userns.create_pinned", "the sandbox's user namespace: its uid's, limits set, pinned"),
    ("idmap.userns_fd", "user namespace fd for the id-mapping"),
    ("idmap.mount_idmapped", "id-mapped read-only image mount"),
    ("mounts.mount_overlay", "overlay mount"),
    ("build_config", "OCI config.json from typed data"),
    ("_prepare", "all of the bundle preparation (the rows above from disk quota on, + files)"),
    (
        "runtime.run_detached",
        "crun run --detach (unshare + sh + crun; namespaces, cgroups, seccomp)",
    ),
    ("agent_health", "agent start: sandlot-init -> python agent -> first /health answer"),
]
DELETE_STAGES = [
    ("runtime.kill_all", "crun kill --all KILL"),
    ("runtime.delete", "crun delete --force"),
    ("_remove_files", "unmount overlay/idmap/disk, rmdir cgroups, rm -rf"),
]


class _Timers:
    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await fn(*a, **k)
                finally:
                    self.current[label] += (time.perf_counter() - t0) * 1000

            setattr(owner, attr, awrapper)
        else:

            @functools.wraps(fn)
            def wrapper(*a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    self.current[label] += (time.perf_counter() - t0) * 1000

            setattr(owner, attr, wrapper)

    def take(self) -> dict[str, float]:
        out, self.current = dict(self.current), defaultdict(float)
        return out


async def _wait_health(sock: str, timeout: float = 30) -> None:
    transport = httpx.AsyncHTTPTransport(uds=sock)
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/health")).status_code == 200:
                    return
            await asyncio.sleep(0.001)
    raise TimeoutError("agent did not answer /health")


def engine_stages(n: int, image: str = "default") -> dict[str, Any]:
    """Median milliseconds per stage of LocalEngine.create (to a healthy agent) and delete."""
    from sandlot.engines import local as local_pkg
    from sandlot.engines.base import SandboxSpec
    from sandlot.engines.local import LocalEngine, idmap, mounts, userns
    from sandlot.engines.local import engine as engine_mod
    from sandlot.images.store import ImageStore
    from sandlot.instance_types import get_instance_type

    del local_pkg
    tmp = make_tmp("slb-st-")
    timers = _Timers()
    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, attr: str, label: str) -> None:
        patched.append((owner, attr, getattr(owner, attr)))
        timers.wrap(owner, attr, label)

    async def run() -> dict[str, Any]:
        eng = LocalEngine(tmp / "state", images=ImageStore(images_dir()))
        eng.agent_runtime()
        wrap(eng.images, "resolve", "images.resolve")
        wrap(eng, "agent_runtime", "agent_runtime")
        wrap(eng, "_allocate_slot", "_allocate_slot")
        wrap(eng, "_prepare", "_prepare")
        wrap(eng.disks, "take", "disks.take")
        wrap(mounts, "mount_existing_disk_image", "mounts.mount_existing_disk_image")
        wrap(mounts, "mount_overlay", "mounts.mount_overlay")
        wrap(userns, "create_pinned", "userns.create_pinned")
        wrap(idmap, "userns_fd", "idmap.userns_fd")
        wrap(idmap, "mount_idmapped", "idmap.mount_idmapped")
        wrap(engine_mod, "build_config", "build_config")
        wrap(eng.runtime.__class__, "run_detached", "runtime.run_detached")
        wrap(eng.runtime.__class__, "kill_all", "runtime.kill_all")
        wrap(eng.runtime.__class__, "delete", "runtime.delete")
        wrap(eng, "_remove_files", "_remove_files")
        creates: list[dict[str, float]] = []
        deletes: list[dict[str, float]] = []
        totals: list[float] = []
        del_totals: list[float] = []
        try:
            for i in range(n + 1):  # the first is a warm-up
                spec = SandboxSpec(
                    id=f"slbst{i:04d}{int(time.time()) % 100000}",
                    image=image,
                    secret="s",
                    instance_type=get_instance_type("micro"),
                )
                timers.take()
                t0 = time.perf_counter()
                info = await eng.create(spec)
                assert info.agent_address.unix_path
                t1 = time.perf_counter()
                await _wait_health(info.agent_address.unix_path)
                t2 = time.perf_counter()
                stage = timers.take()
                stage["agent_health"] = (t2 - t1) * 1000
                await asyncio.sleep(0.2)
                timers.take()
                await eng.pause(spec.id)
                t4 = time.perf_counter()
                await eng.resume(spec.id)
                stage_resume = (time.perf_counter() - t4) * 1000
                timers.take()
                t3 = time.perf_counter()
                await eng.delete(spec.id)
                dstage = timers.take()
                if i:
                    stage["engine.resume"] = stage_resume
                    creates.append(stage)
                    deletes.append(dstage)
                    totals.append((t2 - t0) * 1000)
                    del_totals.append((time.perf_counter() - t3) * 1000)
        finally:
            for owner, attr, original in reversed(patched):
                setattr(owner, attr, original)
            for leftover in list((tmp / "state" / "sandboxes").iterdir()):
                with contextlib.suppress(Exception):
                    await eng.delete(leftover.name)

        def med(rows: list[dict[str, float]], key: str) -> float:
            return round(statistics.median([r.get(key, 0.0) for r in rows]), 2)

        return {
            "image": image,
            "n": n,
            "create_to_healthy_ms": round(statistics.median(totals), 2),
            "delete_ms": round(statistics.median(del_totals), 2),
            "create": [
                {"stage": k, "what": w, "median_ms": med(creates, k)} for k, w in CREATE_STAGES
            ],
            "delete": [
                {"stage": k, "what": w, "median_ms": med(deletes, k)} for k, w in DELETE_STAGES
            ],
            "wake": [
                {
                    "stage": "engine.resume",
                    "what": "light wake in the engine: thaw a paused (frozen) sandbox",
                    "median_ms": med(creates, "engine.resume"),
                }
            ],
        }

    try:
        return asyncio.run(run())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _top(stats_path: Path, per: int, limit: int = 14) -> list[dict[str, Any]]:
    """Functions by own time (tottime), per operation, without interpreter start-up."""
    st = pstats.Stats(str(stats_path), stream=io.StringIO())
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if filename.startswith("<frozen") or func in ("<module>", "exec"):
            continue
        short = filename.split("site-packages/")[-1].split("/src/")[-1]
        short = short.split("/lib/python3.11/")[-1]
        rows.append(
            {
                "function": f"{short}:{line}({func})" if line else func,
                "calls_per_op": round(nc / per, 2),
                "own_ms_per_op": round(tt * 1000 / per, 3),
                "cum_ms_per_op": round(ct * 1000 / per, 3),
            }
        )
    rows.sort(key=lambda r: r["own_ms_per_op"], reverse=True)
    return rows[:limit]


def profile_server(creates: int, execs: int) -> dict[str, Any]:
    """cProfile of a private server while it serves ``creates`` create+delete cycles, then
    ``execs`` execs of ``true`` (start-up excluded); and of the SDK client for the execs."""
    from sandlot import Sandbox

    tmp = make_tmp("slb-prof-")
    out: dict[str, Any] = {}
    try:
        with BenchServer(profile_to=tmp / "create.prof") as srv:
            with Sandbox.create(image="default", api_url=srv.url) as sb:  # warm-up
                sb.exec("true")
            srv.profile_start()
            t0 = time.perf_counter()
            for _ in range(creates):
                with Sandbox.create(image="default", api_url=srv.url) as sb:
                    pass
            out["create_wall_ms_per_op"] = round((time.perf_counter() - t0) * 1000 / creates, 2)
            out["server_create"] = _top(srv.profile_stop(), creates)
        with (
            BenchServer(profile_to=tmp / "exec.prof") as srv,
            Sandbox.create(image="default", api_url=srv.url) as sb,
        ):
            for _ in range(20):
                sb.exec("true")
            srv.profile_start()
            client = cProfile.Profile()
            t0 = time.perf_counter()
            client.enable()
            for _ in range(execs):
                sb.exec("true")
            client.disable()
            out["exec_wall_ms_per_op_profiled"] = round(
                (time.perf_counter() - t0) * 1000 / execs, 3
            )
            out["server_exec"] = _top(srv.profile_stop(), execs)
        client_prof = tmp / "client.prof"
        client.dump_stats(str(client_prof))
        out["client_exec"] = _top(client_prof, execs)
        out["note"] = (
            "cProfile slows Python down; read the rows as shares, not absolute "
            "times. In the server, time spent waiting in the event loop is charged "
            "to whichever frame is open, so coroutine rows can look inflated."
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def exec_decomposition(n: int) -> dict[str, Any]:
    """The exec round trip taken apart by measurement, on one live sandbox: HTTP to the agent
    alone, the agent running ``true``, the same through the server's gateway, then the SDK."""
    from sandlot import Sandbox

    def timed(fn: Any) -> float:
        for _ in range(5):
            fn()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000)
        return round(statistics.median(samples), 3)

    with BenchServer() as srv, Sandbox.create(image="default", api_url=srv.url) as sb:
        auth = {"authorization": f"Bearer {sb.secret}"}
        body = {"cmd": "true"}
        agent = httpx.Client(
            transport=httpx.HTTPTransport(uds=srv.agent_socket(sb.id)),
            base_url="http://agent",
            timeout=30,
        )
        gateway = httpx.Client(
            transport=httpx.HTTPTransport(uds=srv.socket_path),
            base_url="http://sandlot",
            timeout=30,
        )
        prefix = f"/sandboxes/{sb.id}/koyeb-sandbox"

        def stream(client: httpx.Client, path: str) -> None:
            with client.stream("POST", path, json=body, headers=auth) as r:
                for _ in r.iter_bytes():
                    pass

        with agent, gateway:
            rows = [
                ("agent GET /health", timed(lambda: agent.get("/health", headers=auth))),
                (
                    "agent POST /run `true`",
                    timed(lambda: agent.post("/run", json=body, headers=auth)),
                ),
                (
                    "agent POST /run_streaming `true`",
                    timed(lambda: stream(agent, "/run_streaming")),
                ),
                (
                    "gateway GET /health",
                    timed(lambda: gateway.get(prefix + "/health", headers=auth)),
                ),
                (
                    "gateway POST /run_streaming `true`",
                    timed(lambda: stream(gateway, prefix + "/run_streaming")),
                ),
                ("SDK sb.exec('true')", timed(lambda: sb.exec("true"))),
            ]
    return {"n": n, "rows": [{"path": p, "median_ms": v} for p, v in rows]}


def ready_poll_experiment(n: int) -> dict[str, Any]:
    """Cold create -> first echo with the server as it is, and with its readiness poll capped at
    1 ms (:func:`bench.server.engine_fast_ready_poll`). Both servers run at once and the samples
    alternate between them, so both see the same machine load."""
    from bench.stats import summarize
    from sandlot import Sandbox

    labels = {"as_is": "bench.server:engine", "poll_1ms": "bench.server:engine_fast_ready_poll"}
    samples: dict[str, list[float]] = {k: [] for k in labels}
    with contextlib.ExitStack() as stack:
        servers = {k: stack.enter_context(BenchServer(engine_factory=f)) for k, f in labels.items()}
        for srv in servers.values():
            with Sandbox.create(image="default", api_url=srv.url) as sb:
                sb.exec("true")
        for i in range(n):
            order = list(servers.items()) if i % 2 == 0 else list(servers.items())[::-1]
            for label, srv in order:
                t0 = time.perf_counter()
                sb = Sandbox.create(image="default", api_url=srv.url)
                try:
                    sb.exec("echo hi")
                    samples[label].append((time.perf_counter() - t0) * 1000)
                finally:
                    sb.delete()
                    sb.close()
    return {k: summarize(v) for k, v in samples.items()}


def file_write_decomposition(size: int, rounds: int = 2) -> dict[str, Any]:
    """A large binary write taken apart: straight to the agent (PUT /files), through the
    server's gateway with httpx, and with the SDK's ``filesystem.write_file``."""
    import os

    from sandlot import Sandbox

    data = os.urandom(size)

    def rate(fn: Any) -> float:
        best = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            best.append(size / 2**20 / (time.perf_counter() - t0))
        return round(statistics.median(best), 1)

    with BenchServer() as srv, Sandbox.create(image="default", api_url=srv.url) as sb:
        auth = {"authorization": f"Bearer {sb.secret}", "content-type": "application/octet-stream"}
        agent = httpx.Client(
            transport=httpx.HTTPTransport(uds=srv.agent_socket(sb.id)),
            base_url="http://agent",
            timeout=600,
        )
        gateway = httpx.Client(
            transport=httpx.HTTPTransport(uds=srv.socket_path),
            base_url="http://sandlot",
            timeout=600,
        )
        prefix = f"/sandboxes/{sb.id}/koyeb-sandbox"

        def raw_put() -> None:
            """The same PUT, written to the agent's socket in 1 MiB pieces (no HTTP library)."""
            import socket

            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(srv.agent_socket(sb.id))
                sock.sendall(
                    f"PUT /files?path=/root/big.bin HTTP/1.1\r\nHost: a\r\n"
                    f"Authorization: Bearer {sb.secret}\r\nContent-Length: "
                    f"{len(data)}\r\nConnection: close\r\n\r\n".encode()
                )
                view = memoryview(data)
                for i in range(0, len(data), 2**20):
                    sock.sendall(view[i : i + 2**20])
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
                if not answer.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"raw PUT answered {answer[:80]!r}")

        def put(client: httpx.Client, path: str) -> None:
            r = client.put(path, params={"path": "/root/big.bin"}, content=data, headers=auth)
            r.raise_for_status()

        with agent, gateway:
            rows = [
                ("agent PUT /files, raw socket, 1 MiB sends", rate(raw_put)),
                ("agent PUT /files (httpx, one bytes body)", rate(lambda: put(agent, "/files"))),
                ("gateway PUT /files (httpx)", rate(lambda: put(gateway, prefix + "/files"))),
                (
                    "SDK filesystem.write_file",
                    rate(lambda: sb.filesystem.write_file("/root/big.bin", data)),
                ),
                (
                    "agent GET /files",
                    rate(
                        lambda: (
                            agent.get(
                                "/files", params={"path": "/root/big.bin"}, headers=auth
                            ).content
                        )
                    ),
                ),
                (
                    "gateway GET /files (httpx)",
                    rate(
                        lambda: (
                            gateway.get(
                                prefix + "/files", params={"path": "/root/big.bin"}, headers=auth
                            ).content
                        )
                    ),
                ),
            ]
    return {"bytes": size, "rounds": rounds, "rows": [{"path": p, "mib_s": v} for p, v in rows]}
