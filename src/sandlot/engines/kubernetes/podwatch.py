"""One watch on the sandboxes' Pods, shared by every create, start and inspect of an engine.

Why a watch: a create waits for its Pod to get an IP and run; polling each Pod would cost one
API request per sandbox per interval and add up to an interval of latency, while one watch per
server costs one long-lived request and tells within milliseconds. The Pods' last known
states are kept (raw JSON: building the client's model objects costs ~1 ms a Pod) so that
inspect and list need no request either.

The watch is the informer pattern: list, then watch from the list's ``resourceVersion``; when
the server says that version is too old (``410 Gone``, after a long disconnection) or the
stream fails, list again and go on. A waiter is woken by every change of its Pod and checks its
own condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio.client import CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from sandlot.engines.kubernetes.manifests import SELECTOR, sandbox_id_of
from sandlot.engines.kubernetes.rawjson import check, json_of

log = logging.getLogger("sandlot.engines.kubernetes")

Pod = dict[str, Any]
#: A waiter's condition: the Pod (None once deleted) -> a result, or None to keep waiting.
Condition = Callable[[Pod | None], Any]

#: The watch request's own timeout: the API server ends it after this long and it is renewed
#: (a bound on how long a silently broken connection goes unnoticed).
WATCH_SECONDS = 240


class PodWatcher:
    def __init__(self, core: CoreV1Api, namespace: str) -> None:
        self._core = core
        self._namespace = namespace
        self.pods: dict[str, Pod] = {}
        self._changed: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        version = await self._relist()
        self._task = asyncio.create_task(self._run(version), name="sandlot-pod-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait(self, sandbox_id: str, condition: Condition, timeout: float) -> Any:
        """The first non-None value of ``condition`` on the sandbox's Pod (checked now and at
        every change of it); TimeoutError after ``timeout`` seconds."""
        event = asyncio.Event()
        waiting = self._changed.setdefault(sandbox_id, set())
        waiting.add(event)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event.clear()
                    result = condition(self.pods.get(sandbox_id))
                    if result is not None:
                        return result
                    await event.wait()
        finally:
            waiting.discard(event)
            if not waiting:
                self._changed.pop(sandbox_id, None)

    def _notify(self, sandbox_id: str) -> None:
        for event in self._changed.get(sandbox_id, ()):
            event.set()

    def _update(self, kind: str, pod: Pod) -> None:
        sandbox_id = sandbox_id_of(pod.get("metadata", {}).get("labels"))
        if sandbox_id is None:
            return
        if kind == "DELETED":
            known = self.pods.get(sandbox_id)
            # A Pod of the same name made since (a start right after a stop) is not deleted.
            if known is not None and known["metadata"].get("uid") == pod["metadata"].get("uid"):
                del self.pods[sandbox_id]
        else:
            self.pods[sandbox_id] = pod
        self._notify(sandbox_id)

    async def _relist(self) -> str:
        body = await json_of(
            self._core.list_namespaced_pod(
                self._namespace, label_selector=SELECTOR, _preload_content=False
            )
        )
        fresh = {}
        for pod in body.get("items", []):
            sandbox_id = sandbox_id_of(pod.get("metadata", {}).get("labels"))
            if sandbox_id is not None:
                fresh[sandbox_id] = pod
        gone = set(self.pods) - set(fresh)
        self.pods = fresh
        for sandbox_id in gone | set(fresh):
            self._notify(sandbox_id)
        return str(body["metadata"]["resourceVersion"])

    async def _run(self, version: str) -> None:
        backoff = 0.1
        while True:
            try:
                version = await self._watch(version)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except _Gone:
                version = await self._relist_retrying()
            except Exception as exc:  # the connection broke or the API server restarted
                log.warning("pod watch interrupted (%s); listing again", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                version = await self._relist_retrying()

    async def _relist_retrying(self) -> str:
        backoff = 0.1
        while True:
            try:
                return await self._relist()
            except (TimeoutError, ApiException, OSError) as exc:
                log.warning("listing pods failed (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _watch(self, version: str) -> str:
        """Follow one watch request; return the last version seen when it ends."""
        resp: Any = await self._core.list_namespaced_pod(
            self._namespace,
            label_selector=SELECTOR,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=WATCH_SECONDS + 30,
        )
        try:
            if resp.status != 200:
                if resp.status == 410:
                    raise _Gone
                check(resp, await resp.read())
            while line := await resp.content.readline():
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                version = obj.get("metadata", {}).get("resourceVersion", version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._update(kind, obj)
        finally:
            resp.release()
        return version


class _Gone(Exception):
    """The watched version is too old: list again."""
