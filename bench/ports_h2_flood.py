"""Other tenants during an HTTP/2 rapid-reset flood (``python bench/ports_h2_flood.py [--quick]``,
root).

Two sandboxes, each running the HTTP/1.1 app of tests/sdk/sandbox_servers.py on port 8000
(exposed). An attacker (tests/support/h2flood.py, its own process) sends HEADERS+RST_STREAM
pairs to the first one's port, connection after connection, as fast as it can; a second client
(another process: one keep-alive HTTP/1.1 connection per target, sequential GETs) measures the
server's ``GET /v1/health`` and the *other* sandbox's port, first with the server idle, then
for as long again during the flood. Reported: median and p99 latency per target and phase, how
many requests completed (none may fail), what the flood managed, and the server's RSS (it runs
in this process; the clients do not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "sdk"))
sys.path.insert(0, str(ROOT))

from bench.loadgen import HTTP11  # noqa: E402

FLOOD = ROOT / "tests" / "support" / "h2flood.py"

#: The second client: {"port", "paths", "seconds"} → per path its latencies' median, p99, count
#: and errors, as one JSON line.
PROBE = (
    HTTP11
    + r"""
import json, socket, statistics, sys, time

spec = json.loads(sys.argv[1])
conns = {}
lat = {p: [] for p in spec["paths"]}
errors = {p: 0 for p in spec["paths"]}


def connect():
    s = socket.create_connection(("127.0.0.1", spec["port"]), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s, [b""]


stop = time.monotonic() + spec["seconds"]
while time.monotonic() < stop:
    for path in spec["paths"]:
        if path not in conns:
            conns[path] = connect()
        s, buf = conns[path]
        t = time.perf_counter()
        try:
            s.sendall(("GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % path).encode())
            read_http11(s, buf)
        except (OSError, AssertionError, ConnectionError):
            errors[path] += 1
            conns.pop(path)[0].close()
            continue
        lat[path].append((time.perf_counter() - t) * 1e3)
out = {}
for path, values in lat.items():
    values.sort()
    out[path] = {
        "median_ms": statistics.median(values) if values else None,
        "p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))] if values else None,
        "max_ms": values[-1] if values else None,
        "count": len(values),
        "errors": errors[path],
    }
print(json.dumps(out))
"""
)

WAIT = (
    "import socket, sys, time\n"
    "for _ in range(200):\n"
    "    try: socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close(); break\n"
    "    except OSError: time.sleep(0.05)\n"
    "else: sys.exit('never listened')\n"
)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    quick = args.parse_args(argv).quick
    seconds = 3.0 if quick else 15.0

    from sandbox_servers import HTTP_APP
    from support.server import start_server

    from sandlot import Sandbox
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore
    from sandlot.paths import state_dir

    tmp = Path(tempfile.mkdtemp(prefix="sl-floodbench-"))
    engine = LocalEngine(tmp / "state", images=ImageStore(state_dir() / "images"))
    srv = start_server(engine, f"sqlite:///{tmp / 'db'}", tcp=True)
    _, token = srv.app.state.control.store.create_token("bench", "bench")
    port = int(srv.url.rsplit(":", 1)[1])
    probe = tmp / "probe.py"
    probe.write_text(PROBE)
    try:
        boxes = [Sandbox.create(api_url=srv.url, api_token=token, idle_timeout=0) for _ in "ab"]
        try:
            for sb in boxes:
                sb.filesystem.write_files({"/srv/app.py": HTTP_APP, "/srv/wait.py": WAIT})
                sb.launch_process("python3 /srv/app.py 8000")
                assert sb.exec("python3 /srv/wait.py 8000").exit_code == 0
                sb.expose_port(8000)
            target, other = boxes
            paths = {"/v1/health": "/v1/health", "other sandbox's port": ""}
            paths["other sandbox's port"] = f"/sandboxes/{other.id}/ports/8000/x"
            spec = {"port": port, "paths": list(paths.values()), "seconds": seconds}

            def measure() -> subprocess.Popen[str]:
                return subprocess.Popen(
                    [sys.executable, str(probe), json.dumps(spec)],
                    stdout=subprocess.PIPE,
                    text=True,
                )

            idle = json.loads(measure().communicate(timeout=seconds + 120)[0])
            before = rss_mb()
            cpu_before = time.process_time()
            flood = subprocess.Popen(
                [
                    sys.executable,
                    str(FLOOD),
                    str(port),
                    f"/sandboxes/{target.id}/ports/8000/x",
                    str(10**9),
                    str(10**6),
                    str(seconds),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.2)  # the flood under way first
            during = json.loads(measure().communicate(timeout=seconds + 300)[0])
            try:
                flooded = json.loads(flood.communicate(timeout=120)[0])
            except subprocess.TimeoutExpired:
                flood.kill()
                flood.communicate()
                flooded = {"sent": None, "goaways": [], "seconds": None}
            after = rss_mb()
            flooded["server_cpu_seconds"] = round(time.process_time() - cpu_before, 2)
            report(paths, idle, during, flooded, before, after)
        finally:
            for sb in boxes:
                try:
                    sb.delete()
                except Exception as exc:  # a server still swamped (the code before the fix)
                    print(f"deleting {sb.id}: {exc}", file=sys.stderr)
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def report(
    paths: dict[str, str],
    idle: dict[str, Any],
    during: dict[str, Any],
    flooded: dict[str, Any],
    before: float,
    after: float,
) -> None:
    goaways = flooded.get("goaways") or []
    print(
        f"\nflood: {flooded.get('sent')} streams on {len(goaways)} connections in "
        f"{flooded.get('seconds')} s, {sum(1 for g in goaways if g == 11)} ended by GOAWAY "
        f"ENHANCE_YOUR_CALM; server RSS {before:.0f} MB before, {after:.0f} MB after; CPU "
        f"seconds meanwhile: server {flooded.get('server_cpu_seconds')}, flood "
        f"{flooded.get('cpu_seconds')}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print()
    print("| target | idle: median | idle: p99 | flood: median | flood: p99 | flood: max | "
          "requests idle / flood | failed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, path in paths.items():
        i, d = idle[path], during[path]
        print(
            f"| {name} | {_ms(i['median_ms'])} | {_ms(i['p99_ms'])} | {_ms(d['median_ms'])} | "
            f"{_ms(d['p99_ms'])} | {_ms(d['max_ms'])} | {i['count']} / {d['count']} | "
            f"{i['errors'] + d['errors']} |",
            flush=True,
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


if __name__ == "__main__":
    main()
