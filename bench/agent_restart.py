"""The agent's death, measured: how long until a sandbox answers again, and what keeping it
alive costs an idle sandbox.

``python -m bench.agent_restart [--kills N] [--idle M]`` (root). Writes
``bench/results/agent_restart.json`` and prints a table.

- ``death_to_exec_ms``: the agent of a live sandbox is SIGKILLed (from the host, so the moment
  of death is known; ``kill -9 -1`` inside does the same to it), then ``exec("true")`` is sent
  through the SDK and the server at once, and again until one succeeds: death -> first
  successful exec. ``sandlot-init`` (pid 1) sees the death in ``waitpid`` and forks a new agent
  from its already-imported modules; the exec waits in the agent socket's backlog meanwhile.
- ``death_to_health_ms``: the same, straight on the agent's socket (``/health``): what the
  supervisor alone costs, without the SDK and the server.
- ``idle_sandbox_mib``: cgroup memory of each of M idle sandboxes (what the host pays), with
  the PSS and private memory of its pid 1 and its agent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import REPO
from bench.server import BenchServer
from bench.stats import summarize

RESULTS = REPO / "bench" / "results" / "agent_restart.json"


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _agent_pid(init: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in _children(init):
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "sandlot-agent":
                    return child
            except OSError:
                continue
        time.sleep(0.001)
    raise RuntimeError("no agent under the sandbox's pid 1")


def _rollup(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) / 1024
    return {
        "pss_mib": round(fields.get("Pss", 0.0), 2),
        # Written pages (heap, stacks): what each sandbox pays for on its own. Clean private
        # pages are its copy of a file no other process maps yet (one sandbox: busybox).
        "private_dirty_mib": round(fields.get("Private_Dirty", 0.0), 2),
        "rss_mib": round(fields.get("Rss", 0.0), 2),
    }


def _health(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def measure(kills: int, idle: int, instance_type: str = "micro") -> dict[str, Any]:
    from sandlot import Sandbox
    from sandlot.engines.local import cgroups

    results: dict[str, Any] = {}
    with BenchServer() as srv:
        sb = Sandbox.create(image="default", instance_type=instance_type, api_url=srv.url)
        try:
            init = int((srv.state / "sandboxes" / sb.id / "init.pid").read_text())
            sb.exec("true")
            via_sdk, direct, failed = [], [], 0
            for i in range(2 * kills):
                agent = _agent_pid(init)
                t0 = time.perf_counter()
                os.kill(agent, signal.SIGKILL)
                if i % 2 == 0:
                    while True:
                        try:
                            sb.exec("true")
                            break
                        except Exception:
                            failed += 1
                    via_sdk.append((time.perf_counter() - t0) * 1000)
                else:
                    while not _health(srv.agent_socket(sb.id)):
                        failed += 1
                    direct.append((time.perf_counter() - t0) * 1000)
                _agent_pid(init)
            results["death_to_exec_ms"] = summarize(
                via_sdk, failed_attempts=failed, instance_type=instance_type
            )
            results["death_to_health_ms"] = summarize(direct)
        finally:
            sb.delete()
        if not idle:
            return results
        boxes = [Sandbox.create(image="default", api_url=srv.url) for _ in range(idle)]
        try:
            time.sleep(3)  # settle, as the suite's idle figure does
            layout = cgroups.detect_layout()
            usage, inits, agents = [], [], []
            for box in boxes:
                used = cgroups.memory_usage_bytes(layout, box.id)
                if used is not None:
                    usage.append(used / 2**20)
                init = int((srv.state / "sandboxes" / box.id / "init.pid").read_text())
                inits.append(_rollup(init))
                agents.append(_rollup(_agent_pid(init)))
            results["idle_sandbox_mib"] = summarize(usage, image="default")
            for name, rows in (("pid1", inits), ("agent", agents)):
                results[f"idle_{name}"] = {
                    k: round(sorted(r[k] for r in rows)[len(rows) // 2], 2) for k in rows[0]
                }
        finally:
            for box in boxes:
                box.delete()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agent_restart", description=__doc__)
    p.add_argument("--kills", type=int, default=30, help="agent deaths per way (default 30)")
    p.add_argument("--idle", type=int, default=10, help="idle sandboxes measured (default 10)")
    p.add_argument(
        "--instance-type",
        default="micro",
        help="of the sandbox whose agent dies (default micro: 0.5 vCPU, which the agent's "
        "start shares with the sandbox's commands)",
    )
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (the local engine)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    results = measure(args.kills, args.idle, args.instance_type)
    # The machine is shared: a loaded one stretches every start-up figure.
    results["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    for name, value in results.items():
        print(f"{name:22} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
