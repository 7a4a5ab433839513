"""Filesystem snapshots, measured: how long a snapshot takes, and spawn -> first ``echo`` from it
against a cold create -> first ``echo`` of the same image, interleaved in one run.

``python -m bench.snapshots [--runs N] [--full]`` (root). Writes
``bench/results/snapshots.json`` and prints a table. Sizes: 1 MB and 100 MB of changed files
(1 MB files of random data); ``--full`` adds 1 GB.

- ``snapshot_ms``: ``sandbox.snapshot(name)`` through the SDK and the server: the sandbox is
  frozen, its writable layer copied into the snapshot store, and thawed.
- ``spawn_echo_ms``: ``Sandbox.create(snapshot=...)`` then ``exec("echo")``: the snapshot's
  layer is id-mapped and stacked under the new sandbox's overlay, nothing is copied, so the
  size should not show here.
- ``cold_echo_ms``: ``Sandbox.create(image=...)`` then ``exec("echo")``, the same image.
- ``spawn_over_cold``: the ratio of the medians (target: at most 1.5).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import REPO
from bench.server import BenchServer
from bench.stats import summarize

RESULTS = REPO / "bench" / "results" / "snapshots.json"
IMAGE = "default"


def _echo_after(create: Any) -> float:
    start = time.perf_counter()
    sb = create()
    try:
        assert sb.exec("echo ok").stdout == "ok\n"
        return (time.perf_counter() - start) * 1000
    finally:
        sb.delete()
        sb.close()


def measure(url: str, sizes_mb: list[int], runs: int) -> dict[str, Any]:
    from sandlot import Sandbox

    out: dict[str, Any] = {}
    for size in sizes_mb:
        shots, spawns, colds = [], [], []
        for run in range(runs):
            source = Sandbox.create(image=IMAGE, instance_type="small", api_url=url)
            try:
                source.exec(
                    f"mkdir -p /data && for i in $(seq {size}); do "
                    "head -c 1048576 /dev/urandom > /data/f$i; done",
                    timeout=600,
                )
                start = time.perf_counter()
                snap = source.snapshot(f"bench-{size}-{run}")
                shots.append((time.perf_counter() - start) * 1000)
            finally:
                source.delete()
                source.close()
            try:
                for _ in range(3):  # interleaved: a busy moment hits both alike
                    colds.append(_echo_after(lambda: Sandbox.create(image=IMAGE, api_url=url)))
                    spawns.append(_echo_after(functools.partial(snap.spawn, api_url=url)))
            finally:
                snap.delete()
        spawn, cold = summarize(spawns), summarize(colds)
        out[f"{size}MB"] = {
            "snapshot_ms": summarize(shots),
            "spawn_echo_ms": spawn,
            "cold_echo_ms": cold,
            "spawn_over_cold": round(spawn["median"] / cold["median"], 2),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.snapshots", description=__doc__)
    p.add_argument("--runs", type=int, default=3, help="snapshots per size (default 3)")
    p.add_argument("--full", action="store_true", help="also 1 GB of changed files")
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (the local engine)", file=sys.stderr)
        return 2
    sizes = [1, 100, *([1024] if args.full else [])]
    load_before = os.getloadavg()[0]
    with BenchServer() as srv:
        results = measure(srv.url, sizes, args.runs)
    results["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    for name, value in results.items():
        print(f"{name:8} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
