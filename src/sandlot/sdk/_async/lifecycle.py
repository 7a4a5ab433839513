"""LifecycleMixin: health, readiness, settings and deletion of a sandbox.

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import httpx

from sandlot.sdk._async.base import SandboxBase
from sandlot.sdk._async.calls import allowlist, call, send, to_json
from sandlot.sdk._limits import (
    DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_WAIT_READY_TIMEOUT,
)
from sandlot.sdk._primitives import async_sleep, monotonic
from sandlot.sdk.errors import (
    CommandCancelledError,
    SandboxError,
    SandboxNotFoundError,
    SandboxTimeoutError,
)
from sandlot.sdk.types import CancelToken

#: An omitted argument (None is a value: it clears a delay).
_UNSET: Any = object()


class LifecycleMixin(SandboxBase):
    """Health, readiness, settings and deletion of a sandbox."""

    # -- lifecycle --------------------------------------------------------------------------------

    def get_sandbox_url(self) -> str:
        """The sandbox's agent URL (``{server}/sandboxes/{id}/koyeb-sandbox``)."""
        return str(self._info["sandbox_url"])

    def get_domain(self) -> str:
        """Where exposed ports are served: the server's wildcard domain (ports at
        ``{port}-{id}.{domain}``) or, without one, the server's own host (ports at
        ``{server}/sandboxes/{id}/ports/{port}/``)."""
        return str(self._info.get("domain") or "")

    async def is_healthy(self) -> bool:
        """Whether the sandbox's agent answers ``/health``. With the secret (handles that have
        it), this is activity: it wakes a sleeping sandbox, as Koyeb's does; without, the
        server answers only for an awake sandbox."""
        client = await self._http()
        headers = {"authorization": f"Bearer {self.secret}"} if self.secret else {}
        try:
            response = await send(
                client,
                self._conn,
                "GET",
                self._agent_path("/health"),
                "health",
                headers=headers,
                timeout=DEFAULT_HEALTH_TIMEOUT,
            )
        except SandboxError:
            return False
        if response.status_code != 200:
            return False
        try:
            status = response.json().get("status")
        except (ValueError, AttributeError):
            return False
        return status in ("ok", "healthy", "ready")

    async def wait_ready(
        self,
        timeout: float = DEFAULT_WAIT_READY_TIMEOUT,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        cancel: CancelToken | None = None,
    ) -> bool:
        """Poll health until it succeeds (returns True) or ``timeout`` passes
        (:class:`SandboxTimeoutError`)."""
        deadline = monotonic() + timeout
        while True:
            if cancel is not None and cancel.cancelled:
                raise CommandCancelledError("wait_ready cancelled")
            if await self.is_healthy():
                return True
            if monotonic() + poll_interval > deadline:
                raise SandboxTimeoutError(
                    f"sandbox {self.id} did not become ready within {timeout:g}s"
                )
            await async_sleep(poll_interval)

    async def update_lifecycle(
        self,
        delete_after_delay: int | None = _UNSET,
        delete_after_inactivity_delay: int | None = _UNSET,
        idle_timeout: int = _UNSET,
        _experimental_enable_light_sleep: bool = _UNSET,
    ) -> None:
        """Change the auto-deletion (and sleep) settings; omitted ones stay, ``None`` clears
        a delay."""
        body: dict[str, Any] = {}
        if delete_after_delay is not _UNSET:
            body["delete_after_delay"] = delete_after_delay
        if delete_after_inactivity_delay is not _UNSET:
            body["delete_after_inactivity_delay"] = delete_after_inactivity_delay
        if idle_timeout is not _UNSET:
            body["idle_timeout"] = idle_timeout
        if _experimental_enable_light_sleep is not _UNSET:
            body["enable_light_sleep"] = _experimental_enable_light_sleep
        await self._patch(body, f"update sandbox {self.id}")

    async def update_network_policy(
        self, block_network: bool | None = None, outbound_allowlist: Sequence[str] | None = None
    ) -> None:
        """Change the sandbox's egress policy (Koyeb's name), live: ``block_network=True`` (no
        network), ``False`` (full outbound), or an ``outbound_allowlist`` of addresses/CIDRs.
        Unlike Koyeb, which redeploys the sandbox (its processes and memory are lost), sandlot
        applies it to the running sandbox; and with neither argument the sandbox gets
        sandlot's default, no network at all (Koyeb's is full outbound)."""
        await self.update_network(block_network, outbound_allowlist)

    async def update_network(
        self, block_network: bool | None = None, outbound_allowlist: Sequence[str] | None = None
    ) -> None:
        """Change the sandbox's egress policy, live: ``block_network=True`` (no network),
        ``False`` (full outbound), or an ``outbound_allowlist`` of addresses/CIDRs."""
        body: dict[str, Any] = {"block_network": block_network}
        if outbound_allowlist is not None:
            body["outbound_allowlist"] = allowlist(outbound_allowlist)
        await self._patch(body, f"update network of sandbox {self.id}")

    async def _patch(self, body: dict[str, Any], what: str) -> None:
        """PATCH the sandbox's settings and keep the server's answer as this handle's info."""
        client = await self._http()
        data = await call(
            client,
            self._conn,
            "PATCH",
            f"/v1/sandboxes/{self.id}",
            what,
            content=to_json(**body),
            headers={"content-type": "application/json"},
        )
        self._info.update(data)

    async def delete(self) -> None:
        """Tear the sandbox down. Deleting an already deleted sandbox is not an error."""
        if self._deleted:
            return
        client = await self._http()
        with contextlib.suppress(SandboxNotFoundError):
            await call(
                client,
                self._conn,
                "DELETE",
                f"/v1/sandboxes/{self.id}",
                f"delete sandbox {self.id}",
                timeout=httpx.Timeout(120.0, connect=10.0),
            )
        self._deleted = True
