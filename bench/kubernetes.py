"""The kubernetes engine against a local API server (``python bench/kubernetes.py``, root):
creates per second and the warm-pool claim's median, the targets of DESIGN.md (>= 50 creates/s,
claim p50 <= 50 ms).

The control plane is the tests' (tests/support/kube.py: etcd + kube-apiserver on 127.0.0.1);
the "node" is the tests' stand-in kubelet (support/loopkubelet.py), which marks each Pod
running through the API:

- creates/s: ``engine.create`` of N sandboxes, C at a time, each returning once its Pod runs
  (Secret, PVC, NetworkPolicy and Pod made, the watch seeing it run); the stand-in starts no
  agents here, so the figure is the API server's and the engine's alone, not a node's;
- claim p50: ``Sandbox.create`` through a server keeping a warm pool (the stand-in runs the
  pool's agents), the pool refilled before each claim: what a user waits for a pooled sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


async def _creates(settings: object, n: int, concurrency: int) -> float:
    from sandlot.engines.base import SandboxSpec
    from sandlot.engines.kubernetes.engine import KubernetesEngine
    from sandlot.instance_types import get_instance_type

    engine = KubernetesEngine(settings)  # type: ignore[arg-type]
    gate = asyncio.Semaphore(concurrency)
    nano = get_instance_type("nano")

    async def one(i: int) -> None:
        async with gate:
            await engine.create(SandboxSpec(f"bench{i:05d}", "debian", nano, secret="x"))

    try:
        await engine.list()  # connect and start the watch before the clock starts
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
        for info in await engine.list():
            await engine.delete(info.id)
        return n / elapsed
    finally:
        await engine.close()


def _claims(settings: object, n: int) -> list[float]:
    import os

    from support.server import start_server

    from sandlot import Sandbox
    from sandlot.engines.kubernetes.engine import KubernetesEngine
    from sandlot.server.config import PoolKey

    tmp = Path(tempfile.mkdtemp(prefix="sl-k8s-bench-"))
    srv = start_server(
        KubernetesEngine(settings),  # type: ignore[arg-type]
        f"sqlite:///{tmp / 'db'}",
        unix_path=tmp / "s.sock",
        pools={PoolKey("default", "micro"): 2},
    )
    os.environ["SANDLOT_URL"] = srv.url
    store = srv.app.state.control.store
    times: list[float] = []
    try:
        for _ in range(n):
            deadline = time.monotonic() + 60
            while len(store.sandboxes_with_status(["pooled"])) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("the pool did not refill")
                time.sleep(0.05)
            start = time.perf_counter()
            sb = Sandbox.create(image="default", instance_type="micro")
            times.append((time.perf_counter() - start) * 1000)
            sb.delete()
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--creates", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--claims", type=int, default=20)
    args = p.parse_args()

    from support import kube
    from support.loopkubelet import LoopKubelet

    from sandlot.engines.kubernetes.settings import KubernetesSettings

    reason = kube.missing()
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 1
    with kube.control_plane() as cp:
        ns = cp.namespace("bench")
        settings = KubernetesSettings(namespace=ns, kubeconfig=str(cp.kubeconfig()))
        with LoopKubelet(cp, ns, run_agents=False):
            rate = asyncio.run(_creates(settings, args.creates, args.concurrency))
        with LoopKubelet(cp, ns):
            claims = _claims(settings, args.claims)
    print(f"creates/s ({args.creates}, {args.concurrency} at a time): {rate:.1f}  (target >= 50)")
    q = statistics.quantiles(claims, n=10)
    print(
        f"warm claim ms ({args.claims}): p50 {statistics.median(claims):.1f}  p90 {q[-1]:.1f}"
        "  (target p50 <= 50)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
