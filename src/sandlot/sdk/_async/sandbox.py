"""AsyncSandbox: the Koyeb Sandbox SDK's API over a sandlot server.

The class is assembled from one mixin per concern, each in its own module: ``base`` (the
handle's state and agent calls), ``lifecycle``, ``ports`` and ``processes``; ``filesystem``
and ``exec_stream`` hold the objects it hands out.

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from sandlot.sdk._async.calls import allowlist, call, open_client, to_json
from sandlot.sdk._async.filesystem import AsyncFilesystem
from sandlot.sdk._async.lifecycle import LifecycleMixin
from sandlot.sdk._async.ports import PortsMixin
from sandlot.sdk._async.processes import ProcessesMixin
from sandlot.sdk._connection import Connection, resolve_connection
from sandlot.sdk._limits import DEFAULT_CREATE_TIMEOUT, DEFAULT_IDLE_TIMEOUT


class AsyncSandbox(LifecycleMixin, PortsMixin, ProcessesMixin):
    """A sandbox: create one with :meth:`create`, find one with :meth:`get_from_id` or
    :meth:`list`. ``async with await AsyncSandbox.create() as sb:`` deletes it on exit."""

    def __init__(
        self, info: dict[str, Any], conn: Connection, client: httpx.AsyncClient | None = None
    ) -> None:
        super().__init__(info, conn, client)
        self.filesystem = AsyncFilesystem(self)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        image: str | None = None,
        name: str | None = None,
        wait_ready: bool = True,
        instance_type: str = "micro",
        exposed_port_protocol: str | None = None,
        env: Mapping[str, str] | None = None,
        region: str | None = None,
        api_token: str | None = None,
        timeout: float = DEFAULT_CREATE_TIMEOUT,
        idle_timeout: int = DEFAULT_IDLE_TIMEOUT,
        enable_tcp_proxy: bool = False,
        privileged: bool = False,
        registry_secret: str | None = None,
        delete_after_delay: int | None = None,
        delete_after_inactivity_delay: int | None = None,
        _experimental_enable_light_sleep: bool = False,
        labels: Mapping[str, str] | None = None,
        api_url: str | None = None,
        protect_ports: bool = False,
        block_network: bool | None = None,
        outbound_allowlist: Sequence[str] | None = None,
        runtime: str | None = None,
    ) -> AsyncSandbox:
        """Create a sandbox. With ``wait_ready`` (the default) it answers once the sandbox is
        healthy, waiting at most ``timeout`` seconds (then :class:`SandboxTimeoutError`).

        ``enable_tcp_proxy``: a TCP listener on the server's host relays to the port bound by
        :meth:`expose_port` (see :meth:`get_tcp_proxy_info`). ``protect_ports`` (sandlot):
        exposed ports need their token (returned by :meth:`expose_port`) instead of being
        public; not with ``enable_tcp_proxy`` (raw TCP carries no token: the server refuses).

        Network (Koyeb's option names, a stricter default): with neither option the sandbox
        has no network at all; ``block_network=False`` gives it full outbound access;
        ``outbound_allowlist=["10.1.2.0/24", "192.0.2.7"]`` only those networks (plus DNS to
        its resolvers). Change it later with :meth:`update_network`.

        ``runtime`` (sandlot): ``"crun"`` (the default: a container on the host's kernel) or
        ``"gvisor"`` (gVisor's user-space kernel between the code and the host's)."""
        conn = resolve_connection(api_url, api_token)
        body: dict[str, Any] = {
            "image": image,
            "name": name,
            "wait_ready": wait_ready,
            "instance_type": instance_type,
            "exposed_port_protocol": exposed_port_protocol or "http",
            "env": dict(env) if isinstance(env, Mapping) else env,
            "region": region,
            "timeout": timeout,
            "idle_timeout": idle_timeout,
            "enable_tcp_proxy": enable_tcp_proxy,
            "privileged": privileged,
            "registry_secret": registry_secret,
            "delete_after_delay": delete_after_delay,
            "delete_after_inactivity_delay": delete_after_inactivity_delay,
            "enable_light_sleep": _experimental_enable_light_sleep,
            "labels": dict(labels) if isinstance(labels, Mapping) else labels,
        }
        if protect_ports:
            body["protect_ports"] = True
        if block_network is not None:
            body["block_network"] = block_network
        if outbound_allowlist is not None:
            body["outbound_allowlist"] = allowlist(outbound_allowlist)
        if runtime is not None:
            body["runtime"] = runtime
        content = to_json(**body)
        client = await open_client(conn)
        try:
            # The server waits for readiness; give it the create timeout plus a margin.
            info = await call(
                client,
                conn,
                "POST",
                "/v1/sandboxes",
                "create sandbox",
                content=content,
                headers={"content-type": "application/json"},
                timeout=httpx.Timeout(timeout + 30.0, connect=10.0),
            )
        except BaseException:
            await client.aclose()
            raise
        return cls(info, conn, client)

    @classmethod
    async def get_from_id(
        cls, id: str, api_token: str | None = None, api_url: str | None = None
    ) -> AsyncSandbox:
        """Load an existing sandbox (with its secret) by id."""
        conn = resolve_connection(api_url, api_token)
        client = await open_client(conn)
        try:
            info = await call(client, conn, "GET", f"/v1/sandboxes/{id}", f"get sandbox {id}")
        except BaseException:
            await client.aclose()
            raise
        return cls(info, conn, client)

    @classmethod
    async def list(
        cls,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        api_token: str | None = None,
        api_url: str | None = None,
    ) -> list[AsyncSandbox]:
        """Your project's sandboxes, optionally filtered by name and labels. These handles have
        no secret (:class:`NoSandboxSecretError` on sandbox calls): use :meth:`get_from_id`."""
        conn = resolve_connection(api_url, api_token)
        params: list[tuple[str, str]] = []
        if name is not None:
            params.append(("name", name))
        for key, value in (labels or {}).items():
            params.append(("label", f"{key}={value}"))
        client = await open_client(conn)
        try:
            data = await call(client, conn, "GET", "/v1/sandboxes", "list sandboxes", params=params)
        finally:
            await client.aclose()
        return [cls(item, conn) for item in data["sandboxes"]]

    # -- context manager --------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.delete()
        finally:
            await self.close()
