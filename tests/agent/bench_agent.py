"""Measure the agent: exec → first /health answer, memory, and /run round trip of ``true``.

    python tests/agent/bench_agent.py [--python /usr/bin/python3.11] [--runs 20]

Uses raw sockets (no HTTP library on the client side) so the numbers are the agent's. Not a
test; the figures go into the agent's notes (docs/agent.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
SECRET = "bench"


def _request(sock: socket.socket, method: str, path: str, body: bytes = b"") -> bytes:
    sock.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {SECRET}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return rest


def _start(python: str, path: str) -> subprocess.Popen[bytes]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": SRC, "SANDBOX_SECRET": SECRET}
    return subprocess.Popen([python, "-m", "sandlot.agent", "--listen", f"unix:{path}"], env=env)


def first_health(python: str, tmp: str) -> float:
    path = os.path.join(tmp, "a.sock")
    t0 = time.perf_counter()
    proc = _start(python, path)
    try:
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
            except OSError:
                s.close()
                time.sleep(0.0005)
                continue
            answer = _request(s, "GET", "/health")
            elapsed = time.perf_counter() - t0
            s.close()
            assert json.loads(answer) == {"status": "ok"}
            return elapsed
    finally:
        proc.terminate()
        proc.wait()


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Pss:", "Private_Clean:", "Private_Dirty:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def stream_latency(path: str, lines: int = 50) -> list[float]:
    """Each line carries the wall-clock time it was written; compare with when it arrives."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    cmd = f"for i in $(seq {lines}); do date +%s.%N; sleep 0.01; done"
    body = json.dumps({"cmd": cmd}).encode()
    s.sendall(
        f"POST /run_streaming HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {SECRET}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    out: list[float] = []
    buf = b""
    while len(out) < lines:
        data = s.recv(65536)
        now = time.time()
        if not data:
            break
        buf += data
        while b"\n\n" in buf:
            event, _, buf = buf.partition(b"\n\n")
            for line in event.split(b"\n"):
                if b"data: {" in line and b'"stream"' in line:
                    payload = json.loads(line.split(b"data: ", 1)[1])
                    out.append(now - float(payload["data"]))
    s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default="/usr/bin/python3.11")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--execs", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        starts = [first_health(args.python, tmp) for _ in range(args.runs)]
        path = os.path.join(tmp, "b.sock")
        proc = _start(args.python, path)
        try:
            while not os.path.exists(path):
                time.sleep(0.001)
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            _request(s, "GET", "/health")
            idle = memory_kib(proc.pid)
            body = b'{"cmd": "true"}'
            rtts = []
            for _ in range(args.execs):
                t0 = time.perf_counter()
                out = _request(s, "POST", "/run", body)
                rtts.append(time.perf_counter() - t0)
            assert json.loads(out)["code"] == 0
            health = []
            for _ in range(args.execs):
                t0 = time.perf_counter()
                _request(s, "GET", "/health")
                health.append(time.perf_counter() - t0)
            busy = memory_kib(proc.pid)
            s.close()
            latencies = stream_latency(path)
        finally:
            proc.terminate()
            proc.wait()
    ms = 1000
    print(f"python: {args.python}")
    print(
        f"exec -> first /health answer: median {statistics.median(starts) * ms:.1f} ms "
        f"(min {min(starts) * ms:.1f}, max {max(starts) * ms:.1f}, n={len(starts)})"
    )
    print(
        f"/run 'true' round trip (keep-alive, unix socket): median "
        f"{statistics.median(rtts) * ms:.2f} ms (p90 "
        f"{sorted(rtts)[int(len(rtts) * 0.9)] * ms:.2f}, n={len(rtts)})"
    )
    print(f"/health round trip: median {statistics.median(health) * ms:.3f} ms")
    print(
        f"streamed output, write -> client: median {statistics.median(latencies) * ms:.2f} ms "
        f"(p90 {sorted(latencies)[int(len(latencies) * 0.9)] * ms:.2f}, n={len(latencies)})"
    )
    print(f"memory idle (KiB): {idle}")
    print(f"memory after {args.execs} runs (KiB): {busy}")


if __name__ == "__main__":
    main()
