"""PortsMixin: a sandbox's exposed ports and its TCP proxy.

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

from typing import Any

from sandlot.sdk._answers import check_port
from sandlot.sdk._async.base import SandboxBase
from sandlot.sdk._async.calls import call, to_json
from sandlot.sdk._limits import DEFAULT_POLL_INTERVAL, DEFAULT_WAIT_READY_TIMEOUT
from sandlot.sdk._primitives import async_sleep, monotonic
from sandlot.sdk.errors import (
    CommandCancelledError,
    SandboxRequestError,
    SandboxServiceError,
    SandboxTimeoutError,
)
from sandlot.sdk.types import CancelToken, ExposedPort


class PortsMixin(SandboxBase):
    """Exposed ports and the TCP proxy."""

    # -- ports ------------------------------------------------------------------------------------

    async def expose_port(self, port: int, exclusive: bool = False) -> ExposedPort:
        """Serve the sandbox's ``port`` through the server: an :class:`ExposedPort`
        (``.port``, ``.exposed_at``, ...; also readable as ``exposed["exposed_at"]``).

        ``exposed_at`` is the path form ``{server}/sandboxes/{id}/ports/{port}/``; with a server
        run with ``--domain D``, ``host_url`` is ``http://{port}-{id}.D/``. Several ports can be
        exposed at once (sandlot); ``exclusive=True`` keeps Koyeb's single port (a
        :class:`SandboxRequestError` with status 409 if another one is exposed). With
        ``protect_ports``, ``token`` is what a client must send (``Authorization: Bearer`` or
        ``?sandlot_token=``)."""
        check_port(port)
        client = await self._http()
        data = await call(
            client,
            self._conn,
            "POST",
            f"/v1/sandboxes/{self.id}/ports",
            f"expose port {port} of sandbox {self.id}",
            content=to_json(port=port, exclusive=bool(exclusive)),
            headers={"content-type": "application/json"},
        )
        return self._exposed_port(data, f"exposing port {port}")

    async def unexpose_port(self, port: int | None = None) -> None:
        """Stop serving ``port`` (:class:`SandboxRequestError` 404 if it is not exposed), or
        every exposed port when ``port`` is omitted."""
        params: dict[str, str] = {}
        if port is not None:
            params["port"] = str(check_port(port))
        client = await self._http()
        await call(
            client,
            self._conn,
            "DELETE",
            f"/v1/sandboxes/{self.id}/ports",
            f"unexpose port {port if port is not None else '(all)'} of sandbox {self.id}",
            params=params,
        )

    async def list_exposed_ports(self) -> list[ExposedPort]:
        """The exposed ports (sandlot), as :meth:`expose_port` returns each."""
        ports = (await self._ports()).get("ports")
        if not isinstance(ports, list):
            raise SandboxServiceError("the server's list of exposed ports is not a list")
        return [self._exposed_port(p, "listing exposed ports") for p in ports]

    def _exposed_port(self, data: Any, what: str) -> ExposedPort:
        try:
            return ExposedPort.from_answer(data)
        except ValueError as exc:
            raise SandboxServiceError(f"{what} of sandbox {self.id}: {exc}") from None

    async def _ports(self) -> dict[str, Any]:
        client = await self._http()
        data = await call(
            client,
            self._conn,
            "GET",
            f"/v1/sandboxes/{self.id}/ports",
            f"get the ports of sandbox {self.id}",
        )
        return dict(data)

    async def wait_tcp_proxy_ready(
        self,
        timeout: float = DEFAULT_WAIT_READY_TIMEOUT,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        cancel: CancelToken | None = None,
    ) -> bool:
        """Poll until the TCP proxy's address is known (True), or ``timeout`` passes
        (:class:`SandboxTimeoutError`). A sandbox created without ``enable_tcp_proxy`` has none
        (:class:`SandboxRequestError` at once)."""
        if not self._info.get("enable_tcp_proxy"):
            raise SandboxRequestError(
                f"sandbox {self.id} was created without enable_tcp_proxy", 400
            )
        deadline = monotonic() + timeout
        while True:
            if cancel is not None and cancel.cancelled:
                raise CommandCancelledError("wait_tcp_proxy_ready cancelled")
            if await self.get_tcp_proxy_info() is not None:
                return True
            if monotonic() + poll_interval > deadline:
                raise SandboxTimeoutError(
                    f"the TCP proxy of sandbox {self.id} was not ready within {timeout:g}s"
                )
            await async_sleep(poll_interval)

    async def get_tcp_proxy_info(self) -> tuple[str, int] | None:
        """``(host, port)`` of the TCP proxy (a listener on the server's host relaying raw TCP
        to the port bound by :meth:`expose_port`; with several, the first one exposed), or None
        if there is none (the sandbox was created without ``enable_tcp_proxy``)."""
        proxy = (await self._ports())["tcp_proxy"]
        if not proxy:
            return None
        return str(proxy["host"]), int(proxy["port"])
