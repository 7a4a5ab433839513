"""Exposed ports over HTTP/2: small GETs through the gateway, h2c against HTTP/1.1
(``python bench/ports_h2.py [--quick]``, root).

Two sandboxes: one runs the HTTP/1.1 app of tests/sdk/sandbox_servers.py on port 8000 (``GET /x``
answers ~300 bytes of JSON), the other, made with ``exposed_port_protocol="http2"``, runs that
file's h2c server (``H2_APP``, the ``h2`` library copied in) on 8443, whose ``GET /x`` answers
JSON of a similar size. A load generator in its own process (raw sockets; for HTTP/2 the ``h2``
library, prior knowledge) sends them through the server's TCP listener, path form, four ways:

- ``h1 → h1 port``: HTTP/1.1 all the way (what bench/ports_overhead.py calls ``gateway``);
- ``h2 → h1 port``: an HTTP/2 client (the server's h2c protocol, h2serve.py) to the same port;
- ``h1 → h2 port``: an HTTP/1.1 client, the gateway speaking h2c to the sandbox (h2upstream.py);
- ``h2 → h2 port``: HTTP/2 at both hops;
- for scale, the server's own ``GET /v1/health`` in HTTP/1.1 and HTTP/2 (no sandbox): what
  serving HTTP/2 costs the server (and the load generator) by itself.

Latency: one connection, sequential requests, median and p90. Throughput: 8 connections, each
sending requests back to back (one at a time) for a few seconds. The HTTP/2 load generator is
pure Python (h2) and costs more per request than the HTTP/1.1 one's few bytes of parsing: its
figures include that. The sandbox servers differ too (a threaded http.server against an asyncio
h2 server): compare the client sides of one port, or read the ratios, not absolute values.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "sdk"))
sys.path.insert(0, str(ROOT))

from bench.loadgen import HTTP11, MEASURE, print_table, run_rounds  # noqa: E402

#: The load generator: {"proto": "h1"|"h2", "port", "path", "n", "conc", "seconds"} → JSON.
LOADGEN = (
    r"""
import json, socket, sys

spec = json.loads(sys.argv[1])


class H1:
    def __init__(self):
        self.s = socket.create_connection(("127.0.0.1", spec["port"]))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = [b""]
        self.req = ("GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % spec["path"]).encode()

    def one(self):
        self.s.sendall(self.req)
        read_http11(self.s, self.buf)


class H2:
    def __init__(self):
        import h2.config, h2.connection, h2.events
        self.events = h2.events
        self.s = socket.create_connection(("127.0.0.1", spec["port"]))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.c = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.c.initiate_connection()
        self.s.sendall(self.c.data_to_send())
        self.headers = [(":method", "GET"), (":scheme", "http"), (":authority", "bench"),
                        (":path", spec["path"])]

    def one(self):
        sid = self.c.get_next_available_stream_id()
        self.c.send_headers(sid, self.headers, end_stream=True)
        self.s.sendall(self.c.data_to_send())
        status = None
        while True:
            data = self.s.recv(65536)
            if not data:
                raise ConnectionError("closed")
            done = False
            for ev in self.c.receive_data(data):
                if isinstance(ev, self.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"]
                elif isinstance(ev, self.events.DataReceived):
                    self.c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, self.events.StreamEnded) and ev.stream_id == sid:
                    done = True
            out = self.c.data_to_send()
            if out:
                self.s.sendall(out)
            if done:
                assert status == b"200", status
                return


Client = H2 if spec["proto"] == "h2" else H1
"""
    + HTTP11
    + MEASURE
)


WAIT = (
    "import socket, sys, time\n"
    "for _ in range(200):\n"
    "    try: socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close(); break\n"
    "    except OSError: time.sleep(0.05)\n"
    "else: sys.exit('never listened')\n"
)


def main(argv: list[str] | None = None) -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    quick = args.parse_args(argv).quick
    rounds = 1 if quick else 3
    common = (
        {"n": 200, "conc": 8, "seconds": 0.5} if quick else {"n": 2000, "conc": 8, "seconds": 3}
    )

    from sandbox_servers import H2_APP, HTTP_APP, upload_h2
    from support.server import start_server

    from sandlot import Sandbox
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore
    from sandlot.paths import state_dir

    tmp = Path(tempfile.mkdtemp(prefix="sl-h2bench-"))
    engine = LocalEngine(tmp / "state", images=ImageStore(state_dir() / "images"))
    srv = start_server(engine, f"sqlite:///{tmp / 'db'}", tcp=True)
    _, token = srv.app.state.control.store.create_token("bench", "bench")
    port = int(srv.url.rsplit(":", 1)[1])
    loadgen = tmp / "loadgen.py"
    loadgen.write_text(LOADGEN)
    results: dict[str, dict[str, float]] = {}
    try:
        h1 = Sandbox.create(api_url=srv.url, api_token=token, idle_timeout=0)
        h2 = Sandbox.create(
            api_url=srv.url, api_token=token, idle_timeout=0, exposed_port_protocol="http2"
        )
        try:
            for sb, name, code, sb_port in (
                (h1, "app", HTTP_APP, 8000),
                (h2, "h2app", H2_APP, 8443),
            ):
                if sb is h2:
                    upload_h2(sb)
                sb.filesystem.write_files({f"/srv/{name}.py": code, "/srv/wait.py": WAIT})
                sb.launch_process(f"python3 /srv/{name}.py {sb_port}")
                assert sb.exec(f"python3 /srv/wait.py {sb_port}").exit_code == 0
                sb.expose_port(sb_port)
            h1_path = f"/sandboxes/{h1.id}/ports/8000/x"
            h2_path = f"/sandboxes/{h2.id}/ports/8443/x"
            specs = {
                "h1 → h1 port": {"proto": "h1", "path": h1_path},
                "h2 → h1 port": {"proto": "h2", "path": h1_path},
                "h1 → h2 port": {"proto": "h1", "path": h2_path},
                "h2 → h2 port": {"proto": "h2", "path": h2_path},
                # For scale, no sandbox: the server's own /v1/health (its h2c cost alone).
                "h1 → /v1/health": {"proto": "h1", "path": "/v1/health"},
                "h2 → /v1/health": {"proto": "h2", "path": "/v1/health"},
            }

            def run(name: str, arg: str) -> str:
                return subprocess.run(
                    [sys.executable, str(loadgen), arg],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=120,
                ).stdout

            results = run_rounds(specs, rounds, {**common, "port": port}, run)
        finally:
            h1.delete()
            h2.delete()
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print_table("client → port", results)


if __name__ == "__main__":
    main()
