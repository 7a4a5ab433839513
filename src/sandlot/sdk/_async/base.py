"""SandboxBase: the state and agent calls every part of AsyncSandbox shares.

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Self

import httpx

from sandlot.sdk._answers import raise_for_status, transport_error
from sandlot.sdk._async.calls import (
    UPLOAD_CHUNK,
    call,
    in_pieces,
    open_client,
    read_answer,
    send,
    to_json,
)
from sandlot.sdk._connection import Connection
from sandlot.sdk._limits import DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_MAX_READ_BYTES
from sandlot.sdk.errors import NoSandboxSecretError


class SandboxBase:
    """What every part of a sandbox handle shares: its description, its connection, and the
    requests to its agent. The sandbox class adds the rest from the mixins beside this module
    (lifecycle, ports, processes), each a subclass of this one so that it type-checks alone."""

    #: How much of each output stream :meth:`exec` keeps (sandlot). Set it on a handle, or on
    #: the class for every handle; ``exec(..., max_output_bytes=)`` wins over both.
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    #: The most ``filesystem.read_bytes``/``read_file`` return (sandlot); the same rules.
    max_read_bytes: int = DEFAULT_MAX_READ_BYTES

    def __init__(
        self, info: dict[str, Any], conn: Connection, client: httpx.AsyncClient | None = None
    ) -> None:
        self._info = info
        self._conn = conn
        self._client = client
        self._deleted = False

    async def close(self) -> None:
        """Release this handle's connections (the sandbox keeps running)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = await open_client(self._conn)
        return self._client

    # -- properties -------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return str(self._info["id"])

    @property
    def name(self) -> str:
        return str(self._info["name"])

    @property
    def status(self) -> str:
        """The status when this handle last heard from the server (see :meth:`refresh`)."""
        return "deleted" if self._deleted else str(self._info["status"])

    @property
    def image(self) -> str:
        return str(self._info["image"])

    @property
    def instance_type(self) -> str:
        return str(self._info["instance_type"])

    @property
    def region(self) -> str:
        return str(self._info["region"])

    @property
    def labels(self) -> dict[str, str]:
        return dict(self._info.get("labels") or {})

    @property
    def created_at(self) -> str:
        return str(self._info["created_at"])

    @property
    def secret(self) -> str | None:
        value = self._info.get("secret")
        return str(value) if value else None

    @property
    def info(self) -> dict[str, Any]:
        """The server's full description of this sandbox, as last fetched."""
        return dict(self._info)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id} name={self.name!r} status={self.status}>"

    async def refresh(self) -> Self:
        client = await self._http()
        data = await call(
            client, self._conn, "GET", f"/v1/sandboxes/{self.id}", f"get sandbox {self.id}"
        )
        self._info.update(data)
        return self

    async def events(self) -> list[dict[str, Any]]:
        """The sandbox's history, oldest first: ``{at, kind, detail}`` for created, slept
        (light/deep), woke, deleted (with the reason) and error. Readable after deletion."""
        client = await self._http()
        data = await call(
            client,
            self._conn,
            "GET",
            f"/v1/sandboxes/{self.id}/events",
            f"get events of sandbox {self.id}",
        )
        return list(data["events"])

    # -- the agent --------------------------------------------------------------------------------

    def _agent_path(self, route: str) -> str:
        return f"/sandboxes/{self.id}/koyeb-sandbox{route}"

    def _agent_headers(self) -> dict[str, str]:
        secret = self.secret
        if not secret:
            raise NoSandboxSecretError(
                f"this handle of sandbox {self.id} has no secret (handles from list() do not); "
                "use get_from_id()"
            )
        return {"authorization": f"Bearer {secret}"}

    async def _agent(
        self, method: str, route: str, what: str, *, json_body: Any = None, **kwargs: Any
    ) -> Any:
        headers = self._agent_headers()
        if json_body is not None:
            kwargs["content"] = to_json(**json_body)
            headers["content-type"] = "application/json"
        client = await self._http()
        return await call(
            client, self._conn, method, self._agent_path(route), what, headers=headers, **kwargs
        )

    async def _agent_raw(
        self,
        method: str,
        route: str,
        what: str,
        *,
        params: dict[str, str],
        content: bytes | AsyncIterator[bytes] | None = None,
        length: int | None = None,
    ) -> httpx.Response:
        headers = self._agent_headers()
        if content is not None:
            headers["content-type"] = "application/octet-stream"
        if isinstance(content, bytes) and len(content) > UPLOAD_CHUNK:
            # httpcore re-slices the unsent rest of a body on every partial send (quadratic
            # in the size: 100 MB went at 7 MiB/s); fixed-size pieces keep it linear.
            length, content = len(content), in_pieces(content)
        if length is not None:
            headers["content-length"] = str(length)
        client = await self._http()
        response = await send(
            client,
            self._conn,
            method,
            self._agent_path(route),
            what,
            params=params,
            content=content,
            headers=headers,
            timeout=httpx.Timeout(600.0, connect=10.0),
        )
        raise_for_status(response, what)
        return response

    @contextlib.asynccontextmanager
    async def _agent_download(self, path: str, what: str) -> AsyncIterator[httpx.Response]:
        """``GET /files?path=`` with its body left unread: the caller takes it piece by piece
        (a file can be larger than memory, or endless)."""
        headers = self._agent_headers()
        client = await self._http()
        try:
            async with client.stream(
                "GET",
                self._agent_path("/files"),
                params={"path": path},
                headers=headers,
                timeout=httpx.Timeout(600.0, connect=10.0),
            ) as response:
                if response.status_code >= 400:
                    raise_for_status(await read_answer(response, what), what)
                yield response
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._conn, what) from exc
