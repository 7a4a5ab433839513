"""What the port benchmarks share: the measuring half of their load generators, the HTTP/1.1
client they all use, and running interleaved rounds into a table.

A load generator is a standalone script (standard library only, so it also runs inside a
sandbox): its own part defines ``Client`` -- a class whose instances open one connection and
whose ``one()`` makes one exchange on it -- and :data:`MEASURE` does the rest.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Callable
from typing import Any

#: ``read_http11(sock, buf)``: read one keep-alive HTTP/1.1 response (``buf``: a one-item list
#: holding what was read beyond the previous one) and check it is a 200.
HTTP11 = r"""
def read_http11(s, buf):
    while b"\r\n\r\n" not in buf[0]:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf[0] += chunk
    head, _, rest = buf[0].partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        rest += s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    buf[0] = rest[length:]
"""

#: Latency (one connection, ``n`` sequential exchanges after 100 to warm up) and throughput
#: (``conc`` connections for ``seconds``), printed as one JSON line.
MEASURE = r"""
import statistics as _statistics, threading as _threading, time as _time

_c = Client()
for _ in range(100):
    _c.one()
_lat = []
for _ in range(spec["n"]):
    _t = _time.perf_counter()
    _c.one()
    _lat.append((_time.perf_counter() - _t) * 1e3)
_lat.sort()
_counts = [0] * spec["conc"]
_stop = _time.monotonic() + spec["seconds"]


def _worker(i):
    w = Client()
    while _time.monotonic() < _stop:
        w.one()
        _counts[i] += 1


_threads = [_threading.Thread(target=_worker, args=(i,)) for i in range(spec["conc"])]
for _t in _threads:
    _t.start()
for _t in _threads:
    _t.join()
print(json.dumps({"median_ms": _statistics.median(_lat), "p90_ms": _lat[int(len(_lat) * 0.9)],
                  "rps": sum(_counts) / spec["seconds"]}))
"""


def run_rounds(
    specs: dict[str, dict[str, Any]],
    rounds: int,
    common: dict[str, Any],
    run: Callable[[str, str], str],
) -> dict[str, dict[str, float]]:
    """Run every spec ``rounds`` times, interleaved (so a change of the machine's load hits all
    alike); ``run(name, json_arg)`` runs the load generator and returns its output. Medians."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in specs}
    for _round, (name, spec) in itertools.product(range(rounds), specs.items()):
        runs[name].append(json.loads(run(name, json.dumps({**spec, **common}))))
        print(name, runs[name][-1], flush=True)
    return {
        name: {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        for name, samples in runs.items()
    }


def print_table(first_column: str, results: dict[str, dict[str, float]]) -> None:
    print()
    print(f"| {first_column} | median latency | p90 | requests/s (8 connections) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median_ms']:.3f} ms | {r['p90_ms']:.3f} ms | {r['rps']:.0f} |")
