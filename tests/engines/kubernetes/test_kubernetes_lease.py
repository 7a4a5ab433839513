"""Leader election on a real Lease: one replica at a time runs the owned loops; a crashed
holder's work moves to another after the lease duration, a released one at once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import pytest
from support.kube import ControlPlane

from sandlot.engines.kubernetes.engine import KubernetesEngine
from sandlot.engines.kubernetes.lease import LeaseElector
from sandlot.engines.kubernetes.settings import KubernetesSettings

pytestmark = pytest.mark.anyio


def _elector(engine: KubernetesEngine, name: str) -> LeaseElector:
    return LeaseElector(
        engine.coordination, engine.namespace, identity=name, duration=1.5, renew_every=0.2
    )


def _worker(log: list[str], name: str) -> Callable[[], Awaitable[None]]:
    async def work() -> None:
        log.append(f"{name} start")
        try:
            await asyncio.Event().wait()
        finally:
            log.append(f"{name} stop")

    return work


async def _until(pred: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_one_holder_and_takeover_after_a_crash(
    kube_settings: KubernetesSettings, control_plane: ControlPlane, namespace: str
) -> None:
    a_engine, b_engine = KubernetesEngine(kube_settings), KubernetesEngine(kube_settings)
    log: list[str] = []
    a, b = _elector(a_engine, "replica-a"), _elector(b_engine, "replica-b")
    a_task = asyncio.create_task(a.lead(_worker(log, "a")))
    try:
        await _until(lambda: log == ["a start"])
        b_task = asyncio.create_task(b.lead(_worker(log, "b")))
        await asyncio.sleep(1.0)  # several of b's attempts: it must not start meanwhile
        assert log == ["a start"] and a.is_leader and not b.is_leader
        _, body = control_plane.request(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/sandlot-server"
        )
        assert json.loads(body)["spec"]["holderIdentity"] == "replica-a"

        # a "crashes": its task ends without releasing the Lease
        a_task.cancel()
        crashed = time.monotonic()
        await _until(lambda: "b start" in log)
        assert time.monotonic() - crashed >= 1.0  # only once the record went stale
        assert log.index("a stop") < log.index("b start")
        b_task.cancel()
        await asyncio.gather(b_task, return_exceptions=True)
    finally:
        a_task.cancel()
        await asyncio.gather(a_task, return_exceptions=True)
        await a_engine.close()
        await b_engine.close()


async def test_a_released_lease_is_taken_over_at_once(
    kube_settings: KubernetesSettings, namespace: str
) -> None:
    a_engine, b_engine = KubernetesEngine(kube_settings), KubernetesEngine(kube_settings)
    a = LeaseElector(a_engine.coordination, namespace, identity="a", duration=30)
    b = LeaseElector(b_engine.coordination, namespace, identity="b", duration=30)
    try:
        assert await a.try_acquire()
        assert not await b.try_acquire()
        await a.release()
        assert await b.try_acquire()  # no 30 s wait after a clean shutdown
        assert not await a.try_acquire()
    finally:
        await a_engine.close()
        await b_engine.close()
