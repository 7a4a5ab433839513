"""Exposed ports: what the gateway adds, measured.

``python bench/ports_overhead.py [--quick]`` (root; ``--quick``: one short round, a smoke run).

One sandbox runs a small HTTP/1.1 keep-alive server (tests/sdk/sandbox_servers.py's app, its
``GET /x`` answer is ~300 bytes of JSON). The same load generator (standard library, raw sockets,
keep-alive) runs three ways:

- ``direct``:  inside the sandbox, against 127.0.0.1:8000 (no sandlot at all);
- ``tunnel``:  on the host, through one agent tunnel (``GET /tunnel?port=8000`` on the agent's
  Unix socket): the agent's relay threads only (how the gateway reaches an agent over TCP);
- ``handed socket``: on the host, on the connection the agent handed over (``Sandlot-Tunnel:
  fd``): a host process talking straight into the sandbox's network namespace -- what the
  gateway's connections are over the local engine;
- ``gateway``: on the host, to the server's TCP listener, path form
  ``/sandboxes/{id}/ports/8000/x``: uvicorn + the ports gateway + its pooled connections.

- ``tcp proxy``: the same HTTP requests through the sandbox's TCP proxy (bytes, copied by a
  relay process);
- ``ws direct`` / ``ws gateway``: WebSocket echo round trips of 32-byte text frames, inside the
  sandbox and through the gateway (after the upgrade, a relay process copies the bytes).

For scale, the agent's own ``/health`` straight on its socket and through the (older) agent
gateway ``/sandboxes/{id}/koyeb-sandbox/health``: the same server's per-request cost.

Latency: one connection, sequential requests, median and p90. Throughput: 8 connections, each
sending requests back to back for 3 s. The load generator runs in its own process (not in the
server's), but on the same 2 shared cores as everything else: read the ratios, not the absolute
values. The server runs in this process (uvicorn with uvloop and httptools, as ``sandlot
server``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Each way is measured this many times, interleaved; the table gives the medians of the runs.
ROUNDS = 3
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "sdk"))
sys.path.insert(0, str(ROOT))

from bench.loadgen import HTTP11, MEASURE, print_table, run_rounds  # noqa: E402

#: The load generator: stdlib only, so it also runs inside the sandbox.
LOADGEN = (
    r"""
import json, socket, sys

spec = json.loads(sys.argv[1])


def connect():
    if spec["kind"] == "tcp":
        s = socket.create_connection((spec["host"], spec["port"]))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    s = socket.socket(socket.AF_UNIX)
    s.connect(spec["unix"])
    if spec["kind"] == "unix":  # the agent itself, no tunnel
        return s
    head = "GET /tunnel?port=%d HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer %s\r\n" % (
        spec["port"], spec["secret"])
    if spec["kind"] == "handed":  # the agent hands over its connection to the port
        s.sendall((head + "Connection: Upgrade\r\nUpgrade: tcp\r\nSandlot-Tunnel: fd\r\n\r\n")
                  .encode())
        head, fds, _, _ = socket.recv_fds(s, 4096, 1)
        assert head.startswith(b"HTTP/1.1 200") and len(fds) == 1, head
        s.close()
        s = socket.socket(fileno=fds[0])
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    s.sendall((head + "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


REQUEST = ("GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % spec["path"]).encode()
#: A masked 32-byte text frame (mask 0: the payload goes as is), echoed unmasked.
FRAME = bytes([0x81, 0x80 | 32]) + bytes(4) + b"x" * 32
ECHOED = bytes([0x81, 32]) + b"x" * 32


class Client:
    def __init__(self):
        self.s = connect()
        self.buf = [b""]
        if spec.get("ws"):
            self.s.sendall((
                "GET %s HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade"
                "\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
                "\r\n\r\n" % spec["path"]).encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += self.s.recv(1)
            assert head.startswith(b"HTTP/1.1 101"), head

    def one(self):
        if not spec.get("ws"):
            self.s.sendall(REQUEST)
            read_http11(self.s, self.buf)
            return
        self.s.sendall(FRAME)
        got = b""
        while len(got) < len(ECHOED):
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            got += chunk
        assert got == ECHOED, got
"""
    + HTTP11
    + MEASURE
)


def main(argv: list[str] | None = None) -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    quick = args.parse_args(argv).quick
    rounds = 1 if quick else ROUNDS
    from sandbox_servers import HTTP_APP, WS_ECHO
    from support.server import start_server

    from sandlot import Sandbox
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore
    from sandlot.paths import state_dir

    tmp = Path(tempfile.mkdtemp(prefix="sl-portbench-"))
    engine = LocalEngine(tmp / "state", images=ImageStore(state_dir() / "images"))
    srv = start_server(engine, f"sqlite:///{tmp / 'db'}", tcp=True)
    _, token = srv.app.state.control.store.create_token("bench", "bench")
    port = int(srv.url.rsplit(":", 1)[1])
    loadgen = tmp / "loadgen.py"
    loadgen.write_text(LOADGEN)
    common = (
        {"n": 200, "conc": 8, "seconds": 0.5} if quick else {"n": 2000, "conc": 8, "seconds": 3}
    )
    results: dict[str, dict[str, float]] = {}
    try:
        sb = Sandbox.create(
            api_url=srv.url,
            api_token=token,
            instance_type="medium",
            idle_timeout=0,
            enable_tcp_proxy=True,
        )
        try:
            sb.filesystem.write_file("/srv/app.py", HTTP_APP)
            sb.filesystem.write_file("/srv/ws.py", WS_ECHO)
            sb.filesystem.write_file("/srv/loadgen.py", LOADGEN)
            sb.launch_process("python3 /srv/app.py 8000")
            sb.launch_process("python3 /srv/ws.py 8765")
            time.sleep(1.0)
            sb.expose_port(8000)  # first bound: the TCP proxy's target
            sb.expose_port(8765)
            assert sb.wait_tcp_proxy_ready(timeout=10)
            proxy = sb.get_tcp_proxy_info()
            assert proxy is not None
            row = srv.app.state.control.store.get_sandbox(sb.id)
            specs = {
                "direct": {"kind": "tcp", "host": "127.0.0.1", "port": 8000, "path": "/x"},
                "tunnel": {
                    "kind": "tunnel",
                    "unix": row.agent_unix_path,
                    "port": 8000,
                    "secret": sb.secret,
                    "path": "/x",
                },
                "handed socket": {
                    "kind": "handed",
                    "unix": row.agent_unix_path,
                    "port": 8000,
                    "secret": sb.secret,
                    "path": "/x",
                },
                "gateway": {
                    "kind": "tcp",
                    "host": "127.0.0.1",
                    "port": port,
                    "path": f"/sandboxes/{sb.id}/ports/8000/x",
                },
                # The TCP proxy: the same HTTP requests, relayed as bytes (relay process).
                "tcp proxy": {"kind": "tcp", "host": proxy[0], "port": proxy[1], "path": "/x"},
                # WebSocket echo round trips (32-byte text frames), direct and through the
                # gateway (upgrade, then the relay process).
                "ws direct": {
                    "kind": "tcp",
                    "host": "127.0.0.1",
                    "port": 8765,
                    "path": "/",
                    "ws": True,
                },
                "ws gateway": {
                    "kind": "tcp",
                    "host": "127.0.0.1",
                    "port": port,
                    "path": f"/sandboxes/{sb.id}/ports/8765/",
                    "ws": True,
                },
                # For scale: the agent's /health, straight and through the agent gateway.
                "agent /health": {"kind": "unix", "unix": row.agent_unix_path, "path": "/health"},
                "agent gateway /health": {
                    "kind": "tcp",
                    "host": "127.0.0.1",
                    "port": port,
                    "path": f"/sandboxes/{sb.id}/koyeb-sandbox/health",
                },
            }

            def run(name: str, arg: str) -> str:
                if name in ("direct", "ws direct"):  # inside the sandbox
                    quoted = arg.replace("'", "'\\''")
                    result = sb.exec(f"python3 /srv/loadgen.py '{quoted}'", timeout=120)
                    assert result.exit_code == 0, result.stderr
                    return result.stdout
                return subprocess.run(
                    [sys.executable, str(loadgen), arg],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=120,
                ).stdout

            results = run_rounds(specs, rounds, common, run)
        finally:
            sb.delete()
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    direct, handed, gateway = results["direct"], results["handed socket"], results["gateway"]
    print_table("path", results)
    print()
    print(
        f"gateway adds {gateway['median_ms'] - handed['median_ms']:.3f} ms over the handed "
        f"socket and {gateway['median_ms'] - direct['median_ms']:.3f} ms over direct (median); "
        f"throughput {gateway['rps'] / handed['rps']:.2f}x the handed socket's, "
        f"{gateway['rps'] / direct['rps']:.2f}x direct"
    )


if __name__ == "__main__":
    main()
