"""One replica at a time: leader election on a ``coordination.k8s.io`` Lease.

With several server replicas on one store, the sandboxes' lifecycle timers, warm pools, agent
probes and start-up reconcile must run in exactly one of them, as one state directory has one
server locally. The replica holding the Lease runs them (``ServerConfig.leadership``); the
others serve requests only. A holder renews every :attr:`LeaseElector.renew_every` seconds;
the others take the Lease over once its record has not changed for ``duration`` seconds *of
their own clock* (the holder's timestamps are not compared with the local clock, so clock skew
between nodes does not matter), and every write goes through the API server's optimistic
concurrency (``resourceVersion``): two candidates never both win. A holder that cannot renew
within ``duration`` stops its work before another may start it.

Requests that wake a sleeping sandbox are served by whichever replica receives them; two at
once make the same Pod (the second create finds it and waits for it: see the engine's start).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio.client import CoordinationV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from sandlot.engines.kubernetes.rawjson import json_of

log = logging.getLogger("sandlot.engines.kubernetes.lease")

LEASE_NAME = "sandlot-server"


def default_identity() -> str:
    """The Pod's name (its hostname) and the process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(
        self,
        api: Callable[[], Awaitable[CoordinationV1Api]],
        namespace: str,
        *,
        name: str = LEASE_NAME,
        identity: str | None = None,
        duration: float = 15.0,
        renew_every: float = 5.0,
    ) -> None:
        self._get_api = api
        self._api: CoordinationV1Api | None = None
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.duration = duration
        self.renew_every = renew_every
        self.is_leader = False
        #: The record last seen and when (local monotonic clock): expiry is judged by it.
        self._seen: tuple[str, float] | None = None

    async def api(self) -> CoordinationV1Api:
        if self._api is None:
            self._api = await self._get_api()
        return self._api

    async def lead(self, work: Callable[[], Awaitable[None]]) -> None:
        """Forever: wait to hold the Lease, run ``work`` while holding it, cancel ``work`` when
        it is lost (and try again)."""
        while True:
            while not await self.try_acquire():
                await asyncio.sleep(self.renew_every)
            log.info("lease %s held by %s: running the owned loops", self.name, self.identity)
            task = asyncio.create_task(_run(work))
            try:
                await self._keep(task)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                self.is_leader = False
            log.warning("lease %s lost by %s: owned loops stopped", self.name, self.identity)

    async def _keep(self, task: asyncio.Task[None]) -> None:
        last_renewed = time.monotonic()
        while not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), self.renew_every)
            if task.done():
                return
            try:
                if await self.try_acquire():
                    last_renewed = time.monotonic()
                    continue
                return  # someone else holds it
            except (ApiException, OSError, TimeoutError) as exc:
                log.warning("renewing lease %s failed: %s", self.name, exc)
            # Stop before the others may take it over (a margin of one renewal).
            if time.monotonic() - last_renewed > self.duration - self.renew_every:
                return

    async def release(self) -> None:
        """Give the Lease up at once (a clean shutdown), so that another replica takes over
        without waiting ``duration``."""
        if not self.is_leader:
            return
        self.is_leader = False
        with contextlib.suppress(ApiException, OSError):
            lease = await self._read()
            if lease is not None and lease["spec"].get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = None
                api = await self.api()
                await json_of(
                    api.replace_namespaced_lease(
                        self.name, self.namespace, _body(lease), _preload_content=False
                    )
                )

    async def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease; True if held afterwards."""
        lease = await self._read()
        now = time.monotonic()
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": round(self.duration),
            "renewTime": _now(),
        }
        if lease is None:
            spec["acquireTime"] = spec["renewTime"]
            spec["leaseTransitions"] = 0
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name},
                "spec": spec,
            }
            try:
                api = await self.api()
                await json_of(
                    api.create_namespaced_lease(self.namespace, _body(body), _preload_content=False)
                )
            except ApiException as exc:
                if exc.status == 409:  # another candidate made it first
                    return False
                raise
            self.is_leader = True
            return True
        held = lease["spec"].get("holderIdentity")
        record = lease["metadata"]["resourceVersion"]
        if self._seen is None or self._seen[0] != record:
            self._seen = (record, now)
        if held and held != self.identity and now - self._seen[1] < self.duration:
            self.is_leader = False
            return False
        old = lease["spec"]
        if held != self.identity:
            spec["acquireTime"] = spec["renewTime"]
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0) + 1
        else:
            spec["acquireTime"] = old.get("acquireTime") or spec["renewTime"]
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0)
        lease["spec"] = spec
        try:
            api = await self.api()
            written = await json_of(
                api.replace_namespaced_lease(
                    self.name, self.namespace, _body(lease), _preload_content=False
                )
            )
        except ApiException as exc:
            if exc.status == 409:  # changed since the read: someone else renewed or took it
                self.is_leader = False
                return False
            raise
        self._seen = (written["metadata"]["resourceVersion"], time.monotonic())
        self.is_leader = True
        return True

    async def _read(self) -> dict[str, Any] | None:
        try:
            api = await self.api()
            return await json_of(
                api.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


async def _run(work: Callable[[], Awaitable[None]]) -> None:
    await work()


def _body(manifest: dict[str, Any]) -> Any:
    return manifest
