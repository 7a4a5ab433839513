"""Peak memory while moving bytes: the SDK's and the server's peak RSS above idle while one
sandbox's exec, exec_stream, upload and download each move ``size`` bytes (1 GiB in a full
run). DESIGN.md's target is 64 MiB above idle for each; the bug it guards against had a 2 GiB
exec grow the client to 6.4 GiB.

Each case runs the sync SDK in a fresh client process (:data:`CLIENT`) that warms the same
path up on 1 MiB, reports its idle RSS, and waits. The server's RSS is read then, and both
processes' peaks (``VmHWM``) are reset through ``/proc/<pid>/clear_refs``; the client moves the
bytes and reports its peak, and the server's is read. Peak minus idle is the figure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from bench.machine import REPO, make_tmp
from bench.server import BenchServer
from bench.stats import Result, summarize

MiB = 2**20
CASES = ("exec", "exec_stream", "upload", "download")
REMOTE = "/root/bench-memory.bin"

CLIENT = textwrap.dedent(
    """
    import json, os, sys, time
    from sandlot.sdk import Sandbox, StdoutEvent

    case, size, small, big = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    REMOTE = sys.argv[5]

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def move(n, local, remote):
        cmd = f"yes | head -c {n}"
        if case == "exec":
            r = sb.exec(cmd, timeout=None)  # the default: 64 MiB of each stream kept
            assert r.exit_code == 0 and len(r.stdout) + r.stdout_dropped_bytes == n, r
        elif case == "exec_stream":
            got = sum(len(e.text) for e in sb.exec_stream(cmd) if isinstance(e, StdoutEvent))
            assert got == n, got
        elif case == "upload":
            sb.filesystem.upload_file(local, remote)
        else:
            sb.filesystem.download_file(local + ".back", remote)
            assert os.path.getsize(local + ".back") == n
            os.unlink(local + ".back")

    sb = Sandbox.get_from_id(os.environ["BENCH_SANDBOX"])
    warm = REMOTE + ".warm"
    if case == "download":
        sb.filesystem.upload_file(small, warm)
    move(os.path.getsize(small), small, warm)  # warm-up: the same code, 1 MiB
    if case == "download" and sb.filesystem.stat(REMOTE).get("size") != size:
        sb.filesystem.upload_file(big, REMOTE)  # the upload case failed to leave it
    print(json.dumps({"idle": status("VmRSS")}), flush=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    sys.stdin.readline()
    start = time.monotonic()
    move(size, big, REMOTE)
    print(json.dumps({"peak": status("VmHWM"), "seconds": time.monotonic() - start}), flush=True)
    sb.close()
    """
)


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def _one_case(
    srv: BenchServer, sandbox_id: str, case: str, size: int, small: Path, big: Path
) -> tuple[Result, Result]:
    assert srv.proc is not None
    server_pid = srv.proc.pid
    env = {**os.environ, "SANDLOT_URL": srv.url, "BENCH_SANDBOX": sandbox_id}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("SANDLOT_API_TOKEN", None)
    argv = [sys.executable, "-c", CLIENT, case, str(size), str(small), str(big), REMOTE]
    with subprocess.Popen(
        argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as client:
        assert client.stdin is not None and client.stdout is not None
        try:
            ready: dict[str, Any] = json.loads(client.stdout.readline() or "{}")
            if "idle" not in ready:
                raise RuntimeError(f"the client failed before {case} (exit {client.wait()})")
            server_idle = _status(server_pid, "VmRSS")
            _reset_peak(server_pid)
            client.stdin.write("go\n")
            client.stdin.flush()
            done: dict[str, Any] = json.loads(client.stdout.readline() or "{}")
            server_peak = _status(server_pid, "VmHWM")
            if "peak" not in done or client.wait() != 0:
                raise RuntimeError(f"the client failed during {case} (exit {client.wait()})")
        finally:
            if client.poll() is None:
                client.kill()
    how = f"{size / MiB:g} MiB in {done['seconds']:.1f} s"
    sdk = summarize(
        [(done["peak"] - ready["idle"]) / MiB],
        how=f"{how}; client idle {ready['idle'] / MiB:.0f} MiB",
    )
    server = summarize(
        [(server_peak - server_idle) / MiB], how=f"{how}; server idle {server_idle / MiB:.0f} MiB"
    )
    return sdk, server


def peak_rss(size: int, log: Any) -> tuple[dict[str, Result], dict[str, Result]]:
    """``({case: sdk result}, {case: server result})`` for every case of :data:`CASES`."""
    from sandlot.sdk import Sandbox

    sdk: dict[str, Result] = {}
    server: dict[str, Result] = {}
    tmp = make_tmp("slb-mem-")
    try:
        small, big = tmp / "small", tmp / "big"
        small.write_bytes(os.urandom(MiB))
        with open(big, "wb") as f:
            f.truncate(size)  # sparse: reads as zeros, costs no disk here
        with BenchServer() as srv, Sandbox.create(api_url=srv.url) as sb:
            for case in CASES:
                log(f"sandlot: peak RSS moving {size / MiB:g} MiB through {case}")
                sdk[case], server[case] = _one_case(srv, sb.id, case, size, small, big)
            sb.exec(f"rm -f {REMOTE} {REMOTE}.warm")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sdk, server
