"""AsyncSandbox: the Koyeb Sandbox SDK's API over a sandlot server.

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import stat
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, BinaryIO

import httpx

from sandlot.sdk._common import (
    DEFAULT_CREATE_TIMEOUT,
    DEFAULT_EXEC_TIMEOUT,
    DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MAX_READ_BYTES,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_WAIT_READY_TIMEOUT,
    EVENT_NAMES,
    MAX_ANSWER_BYTES,
    CancelToken,
    CommandCancelledError,
    CommandResult,
    Connection,
    EndEvent,
    ExitEvent,
    FileContent,
    LineSplitter,
    Listener,
    OutputKeeper,
    ProcessInfo,
    StderrEvent,
    StdoutEvent,
    StreamEvent,
    StreamGuard,
    async_ensure_local_server,
    async_run_blocking,
    async_sleep,
    async_uds_transport,
    check_port,
    client_kwargs,
    control_headers,
    monotonic,
    parse_sse_line,
    raise_for_status,
    resolve_connection,
    shared_ssl_context,
    transport_error,
)
from sandlot.sdk.errors import (
    NoSandboxSecretError,
    SandboxCommandError,
    SandboxError,
    SandboxFileTooLargeError,
    SandboxNotFoundError,
    SandboxRequestError,
    SandboxServiceError,
    SandboxTimeoutError,
)

_UNSET: Any = object()
# Aliases: inside AsyncSandbox, "list" is the classmethod.
_ProcessList = list[ProcessInfo]
_EventList = list[dict[str, Any]]


async def _open_client(conn: Connection) -> httpx.AsyncClient:
    transport: httpx.AsyncBaseTransport
    if conn.unix_path is not None:
        if conn.autostart:
            await async_ensure_local_server(conn.unix_path)
        transport = async_uds_transport(conn.unix_path)
    else:
        transport = httpx.AsyncHTTPTransport(verify=shared_ssl_context())
    return httpx.AsyncClient(transport=transport, **client_kwargs(conn))


async def _request(
    client: httpx.AsyncClient,
    conn: Connection,
    method: str,
    path: str,
    what: str,
    **kwargs: Any,
) -> Any:
    """One request to the server; the answer's JSON, or the SDK's exception for an error."""
    kwargs["headers"] = control_headers(conn, kwargs.get("headers"))
    response = await _send(client, conn, method, path, what, **kwargs)
    raise_for_status(response, what)
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise SandboxServiceError(f"{what}: the answer is not JSON", response.status_code) from None


async def _send(
    client: httpx.AsyncClient, conn: Connection, method: str, path: str, what: str, **kwargs: Any
) -> httpx.Response:
    """Send a request and read its answer, at most :data:`MAX_ANSWER_BYTES` of it."""
    try:
        response = await client.send(client.build_request(method, path, **kwargs), stream=True)
        try:
            return await _read_answer(response, what)
        finally:
            await response.aclose()
    except httpx.HTTPError as exc:
        raise transport_error(exc, conn, what) from exc


async def _read_answer(response: httpx.Response, what: str) -> httpx.Response:
    """``response`` with its body read -- a sandbox's agent answers through the server, and a
    hostile one must not be able to send the client an endless body: past
    :data:`MAX_ANSWER_BYTES` the read stops with :class:`SandboxServiceError`."""
    too_large = SandboxServiceError(
        f"{what}: the answer is larger than {MAX_ANSWER_BYTES} bytes", response.status_code
    )
    length = response.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > MAX_ANSWER_BYTES:
        raise too_large
    pieces: list[bytes] = []
    total = 0
    async for piece in response.aiter_bytes():
        total += len(piece)
        if total > MAX_ANSWER_BYTES:
            raise too_large
        pieces.append(piece)
    # The body is decoded already: the copy must not claim an encoding or a length.
    headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=b"".join(pieces), request=response.request
    )


def _json_body(**fields: Any) -> bytes:
    try:
        return json.dumps(fields).encode()
    except (TypeError, ValueError) as exc:
        raise SandboxRequestError(f"invalid option: {exc}", 400) from None


class AsyncSandbox:
    """A sandbox: create one with :meth:`create`, find one with :meth:`get_from_id` or
    :meth:`list`. ``async with await AsyncSandbox.create() as sb:`` deletes it on exit."""

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
        its resolvers). Change it later with :meth:`update_network`."""
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
            body["outbound_allowlist"] = _allowlist(outbound_allowlist)
        content = _json_body(**body)
        client = await _open_client(conn)
        try:
            # The server waits for readiness; give it the create timeout plus a margin.
            info = await _request(
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
        client = await _open_client(conn)
        try:
            info = await _request(client, conn, "GET", f"/v1/sandboxes/{id}", f"get sandbox {id}")
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
        client = await _open_client(conn)
        try:
            data = await _request(
                client, conn, "GET", "/v1/sandboxes", "list sandboxes", params=params
            )
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

    async def close(self) -> None:
        """Release this handle's connections (the sandbox keeps running)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = await _open_client(self._conn)
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

    async def refresh(self) -> AsyncSandbox:
        client = await self._http()
        data = await _request(
            client, self._conn, "GET", f"/v1/sandboxes/{self.id}", f"get sandbox {self.id}"
        )
        self._info.update(data)
        return self

    async def events(self) -> _EventList:
        """The sandbox's history, oldest first: ``{at, kind, detail}`` for created, slept
        (light/deep), woke, deleted (with the reason) and error. Readable after deletion."""
        client = await self._http()
        data = await _request(
            client,
            self._conn,
            "GET",
            f"/v1/sandboxes/{self.id}/events",
            f"get events of sandbox {self.id}",
        )
        return list(data["events"])

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
            response = await _send(
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

    async def update_network(
        self, block_network: bool | None = None, outbound_allowlist: Sequence[str] | None = None
    ) -> None:
        """Change the sandbox's egress policy, live: ``block_network=True`` (no network),
        ``False`` (full outbound), or an ``outbound_allowlist`` of addresses/CIDRs."""
        body: dict[str, Any] = {"block_network": block_network}
        if outbound_allowlist is not None:
            body["outbound_allowlist"] = _allowlist(outbound_allowlist)
        await self._patch(body, f"update network of sandbox {self.id}")

    async def _patch(self, body: dict[str, Any], what: str) -> None:
        """PATCH the sandbox's settings and keep the server's answer as this handle's info."""
        client = await self._http()
        data = await _request(
            client,
            self._conn,
            "PATCH",
            f"/v1/sandboxes/{self.id}",
            what,
            content=_json_body(**body),
            headers={"content-type": "application/json"},
        )
        self._info.update(data)

    async def delete(self) -> None:
        """Tear the sandbox down. Deleting an already deleted sandbox is not an error."""
        if self._deleted:
            return
        client = await self._http()
        with contextlib.suppress(SandboxNotFoundError):
            await _request(
                client,
                self._conn,
                "DELETE",
                f"/v1/sandboxes/{self.id}",
                f"delete sandbox {self.id}",
                timeout=httpx.Timeout(120.0, connect=10.0),
            )
        self._deleted = True

    # -- ports ------------------------------------------------------------------------------------

    async def expose_port(self, port: int, exclusive: bool = False) -> dict[str, Any]:
        """Serve the sandbox's ``port`` through the server: ``{port, exposed_at, ...}``.

        ``exposed_at`` is the path form ``{server}/sandboxes/{id}/ports/{port}/``; with a server
        run with ``--domain D``, ``host_url`` is ``http://{port}-{id}.D/``. Several ports can be
        exposed at once (sandlot); ``exclusive=True`` keeps Koyeb's single port (a
        :class:`SandboxRequestError` with status 409 if another one is exposed). With
        ``protect_ports``, ``token`` is what a client must send (``Authorization: Bearer`` or
        ``?sandlot_token=``)."""
        check_port(port)
        client = await self._http()
        data = await _request(
            client,
            self._conn,
            "POST",
            f"/v1/sandboxes/{self.id}/ports",
            f"expose port {port} of sandbox {self.id}",
            content=_json_body(port=port, exclusive=bool(exclusive)),
            headers={"content-type": "application/json"},
        )
        return dict(data)

    async def unexpose_port(self, port: int | None = None) -> None:
        """Stop serving ``port`` (:class:`SandboxRequestError` 404 if it is not exposed), or
        every exposed port when ``port`` is omitted."""
        params: dict[str, str] = {}
        if port is not None:
            params["port"] = str(check_port(port))
        client = await self._http()
        await _request(
            client,
            self._conn,
            "DELETE",
            f"/v1/sandboxes/{self.id}/ports",
            f"unexpose port {port if port is not None else '(all)'} of sandbox {self.id}",
            params=params,
        )

    async def list_exposed_ports(self) -> _EventList:
        """The exposed ports (sandlot): ``[{port, exposed_at, host_url, token, ...}]``."""
        return list((await self._ports())["ports"])

    async def _ports(self) -> dict[str, Any]:
        client = await self._http()
        data = await _request(
            client,
            self._conn,
            "GET",
            f"/v1/sandboxes/{self.id}/ports",
            f"get the ports of sandbox {self.id}",
        )
        return dict(data)

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
            kwargs["content"] = _json_body(**json_body)
            headers["content-type"] = "application/json"
        client = await self._http()
        return await _request(
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
            length, content = len(content), _pieces(content)
        if length is not None:
            headers["content-length"] = str(length)
        client = await self._http()
        response = await _send(
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
                    raise_for_status(await _read_answer(response, what), what)
                yield response
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._conn, what) from exc

    # -- commands ---------------------------------------------------------------------------------

    async def exec(
        self,
        cmd: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = DEFAULT_EXEC_TIMEOUT,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
        cancel: CancelToken | None = None,
        raise_on_error: bool = False,
        max_output_bytes: int | None = None,
    ) -> CommandResult:
        """Run ``cmd`` with ``sh -c`` and return its ``stdout``, ``stderr`` and ``code``.

        ``on_stdout``/``on_stderr`` get each chunk of output as it arrives. The command is
        killed when ``timeout`` passes (:class:`SandboxTimeoutError`), when ``cancel`` is
        cancelled (:class:`CommandCancelledError`) or when the calling task is cancelled.

        The result keeps at most ``max_output_bytes`` of each stream (sandlot; default
        :attr:`max_output_bytes`, 64 MiB). Past it the command runs on to its end, its output
        still reaches ``on_stdout``/``on_stderr``, and ``result.truncated`` with
        ``stdout_dropped_bytes``/``stderr_dropped_bytes`` say how much the result lacks.
        """
        keep = self.max_output_bytes if max_output_bytes is None else max_output_bytes
        stream = AsyncExecStream(
            self, cmd, cwd=cwd, env=env, timeout=timeout, cancel=cancel, max_output_bytes=keep
        )
        if on_stdout is not None:
            out = on_stdout
            stream.add_event_listener("stdout", lambda ev: out(ev.data["data"]))
        if on_stderr is not None:
            err = on_stderr
            stream.add_event_listener("stderr", lambda ev: err(ev.data["data"]))
        result = await stream.wait()
        if raise_on_error and result.exit_code != 0:
            raise SandboxCommandError(
                f"command exited with code {result.exit_code}: {cmd}", result=result
            )
        return result

    def exec_stream(
        self,
        cmd: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        cancel: CancelToken | None = None,
        max_output_bytes: int = 0,
    ) -> AsyncExecStream:
        """Stream a command's output: add listeners for ``stdout``, ``stderr``, ``exit`` and
        ``end`` then ``await stream.wait()``, or iterate over the stream's events.

        The stream holds nothing it has delivered: its ``result`` has the exit code, and its
        ``stdout``/``stderr`` are empty (their sizes are in ``stdout_dropped_bytes`` and
        ``stderr_dropped_bytes``) unless ``max_output_bytes`` (sandlot) asks it to keep that
        much of each."""
        return AsyncExecStream(
            self,
            cmd,
            cwd=cwd,
            env=env,
            timeout=timeout,
            cancel=cancel,
            max_output_bytes=max_output_bytes,
        )

    # -- background processes -------------------------------------------------------------------

    async def launch_process(
        self, cmd: str, cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        """Start a long-lived background process; returns its id."""
        body: dict[str, Any] = {"cmd": cmd}
        if cwd is not None:
            body["cwd"] = cwd
        if env is not None:
            body["env"] = dict(env)
        data = await self._agent("POST", "/start_process", "launch process", json_body=body)
        return str(data["id"])

    async def kill_process(self, process_id: str) -> None:
        await self._agent(
            "POST", "/kill_process", f"kill process {process_id}", json_body={"id": process_id}
        )

    async def list_processes(self) -> _ProcessList:
        data = await self._agent("GET", "/list_processes", "list processes")
        return [
            ProcessInfo(
                id=str(p.get("id")),
                pid=p.get("pid"),
                status=str(p.get("status")),
                command=str(p.get("command", "")),
                raw=p,
            )
            for p in data.get("processes", [])
        ]

    async def kill_all_processes(self) -> int:
        """Stop every running background process; returns how many were stopped."""
        count = 0
        for process in await self.list_processes():
            if process.status == "running":
                try:
                    await self.kill_process(process.id)
                    count += 1
                except SandboxRequestError:
                    pass  # it finished meanwhile
        return count


class AsyncExecStream:
    """A command's output as it happens (the seed's ``exec_stream``).

    Either add listeners (``stdout``, ``stderr``, ``exit``, ``end``) and ``await wait()``, or
    ``async for event in stream`` (typed :class:`StreamEvent` objects). Leaving an
    ``async with`` block or cancelling kills the command if it still runs.
    """

    def __init__(
        self,
        sandbox: AsyncSandbox,
        cmd: str,
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        timeout: float | None,
        cancel: CancelToken | None,
        max_output_bytes: int = 0,
    ) -> None:
        if not isinstance(cmd, str):
            raise SandboxRequestError(f"cmd must be a string, not {type(cmd).__name__}", 400)
        if env is not None and not isinstance(env, Mapping):
            raise SandboxRequestError(f"env must be a mapping, not {type(env).__name__}", 400)
        if timeout is not None and timeout < 0:
            raise SandboxRequestError("timeout must not be negative", 400)
        _check_limit(max_output_bytes, "max_output_bytes")
        self._sandbox = sandbox
        self.cmd = cmd
        self._cwd = cwd
        self._env = env
        self._timeout = timeout
        self._cancel = cancel
        self._listeners: dict[str, list[Listener]] = {name: [] for name in EVENT_NAMES}
        self._started = False
        self._iterator: AsyncGenerator[StreamEvent, None] | None = None
        self._kept = {
            "stdout": OutputKeeper(max_output_bytes),
            "stderr": OutputKeeper(max_output_bytes),
        }
        self.result: CommandResult | None = None

    def add_event_listener(self, name: str, callback: Listener) -> None:
        if name not in self._listeners:
            raise ValueError(f"unknown event {name!r}; expected one of {', '.join(EVENT_NAMES)}")
        self._listeners[name].append(callback)

    def remove_event_listener(self, name: str, callback: Listener) -> None:
        if callback in self._listeners.get(name, []):
            self._listeners[name].remove(callback)

    async def __aenter__(self) -> AsyncExecStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop following the command; if it still runs, it is killed (the connection closes)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            await iterator.aclose()

    def __aiter__(self) -> AsyncGenerator[StreamEvent, None]:
        if self._iterator is None:
            self._iterator = self._events()
        return self._iterator

    async def wait(self) -> CommandResult:
        """Run the command to its end, calling the listeners; returns its result."""
        async for _event in self:
            pass
        assert self.result is not None
        return self.result

    def _dispatch(self, event: StreamEvent) -> None:
        for callback in list(self._listeners[event.type]):
            callback(event)

    async def _events(self) -> AsyncGenerator[StreamEvent, None]:
        if self._started:
            raise SandboxError("an exec stream can be consumed once")
        self._started = True
        sandbox = self._sandbox
        body: dict[str, Any] = {"cmd": self.cmd}
        if self._cwd is not None:
            body["cwd"] = self._cwd
        if self._env is not None:
            body["env"] = dict(self._env)
        if self._timeout:
            body["timeout"] = self._timeout  # the agent kills the command itself, too
        headers = sandbox._agent_headers()
        headers["content-type"] = "application/json"
        headers["accept"] = "text/event-stream"
        content = _json_body(**body)
        client = await sandbox._http()
        started = monotonic()
        what = f"exec in sandbox {sandbox.id}"
        # The client-side deadline is a little later than the agent's own, which reports a
        # timeout itself; this one only covers an agent that cannot.
        guard_after = self._timeout + 2.0 if self._timeout else None
        completed: dict[str, Any] | None = None
        try:
            async with client.stream(
                "POST",
                sandbox._agent_path("/run_streaming"),
                content=content,
                headers=headers,
                timeout=httpx.Timeout(None, connect=10.0),
            ) as response:
                if response.status_code >= 400:
                    raise_for_status(await _read_answer(response, what), what)
                guard = StreamGuard(response, guard_after, self._cancel)
                lines = LineSplitter()
                try:
                    event_name: str | None = None
                    async for piece in response.aiter_bytes():
                        for line in lines.feed(piece):
                            kind, value = parse_sse_line(line)
                            if kind == "event":
                                event_name = value
                                continue
                            if kind != "data" or value is None:
                                continue
                            payload = json.loads(value)
                            for event in self._translate(event_name, payload):
                                if isinstance(event, ExitEvent):
                                    completed = payload
                                self._dispatch(event)
                                yield event
                            event_name = None
                except (httpx.HTTPError, OSError) as exc:
                    if guard.reason in ("timeout", "cancelled"):
                        pass
                    else:
                        raise SandboxServiceError(
                            f"{what}: the output stream broke off ({exc or type(exc).__name__}): "
                            "the sandbox's agent died (it restarts by itself; the command was "
                            "lost) or the sandbox was deleted"
                        ) from exc
                finally:
                    guard.close()
                if completed is None:
                    if guard.reason == "cancelled":
                        raise CommandCancelledError(f"command cancelled: {self.cmd}")
                    if guard.reason == "timeout":
                        raise SandboxTimeoutError(
                            f"command timed out after {self._timeout:g}s: {self.cmd}"
                        )
        except httpx.HTTPError as exc:
            raise transport_error(exc, sandbox._conn, what) from exc
        if completed is None:
            raise SandboxServiceError(
                f"{what}: the output stream ended before the command did: the sandbox's agent "
                "died (it restarts by itself; the command was lost) or the sandbox was deleted"
            )
        if completed.get("timed_out"):
            raise SandboxTimeoutError(f"command timed out after {self._timeout:g}s: {self.cmd}")
        stdout, stdout_dropped = self._kept["stdout"].take()
        stderr, stderr_dropped = self._kept["stderr"].take()
        self.result = CommandResult(
            stdout=stdout,
            stderr=stderr,
            exit_code=int(completed.get("code", -1)),
            command=self.cmd,
            duration=monotonic() - started,
            signal=completed.get("signal"),
            stdout_dropped_bytes=stdout_dropped,
            stderr_dropped_bytes=stderr_dropped,
        )
        end = EndEvent("end", {})
        self._dispatch(end)
        yield end

    def _translate(self, event_name: str | None, payload: dict[str, Any]) -> list[StreamEvent]:
        if "stream" in payload:
            raw = payload.get("data", "")
            if payload.get("encoding") == "base64":
                data = base64.b64decode(raw)
                text = data.decode("utf-8", "replace")
            else:
                text = str(raw)
                data = text.encode("utf-8")
            if payload["stream"] == "stderr":
                self._kept["stderr"].add(data)
                return [StderrEvent("stderr", {"data": text})]
            self._kept["stdout"].add(data)
            return [StdoutEvent("stdout", {"data": text})]
        if "code" in payload:
            return [ExitEvent("exit", {"code": int(payload["code"])})]
        if "error" in payload or event_name == "error":
            raise SandboxServiceError(
                f"exec failed: {payload.get('error') or 'unknown error'}", body=payload
            )
        return []


class AsyncFilesystem:
    """``sandbox.filesystem``: files and directories inside the sandbox (binary-safe)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def _call(self, route: str, what: str, body: dict[str, Any]) -> Any:
        data = await self._sandbox._agent("POST", route, what, json_body=body)
        if isinstance(data, dict) and data.get("error"):
            raise SandboxRequestError(f"{what}: {data['error']}", 400, data)
        return data

    async def mkdir(self, path: str, recursive: bool = False) -> None:
        await self._call("/make_dir", f"mkdir {path}", {"path": path, "recursive": recursive})

    async def list_dir(self, path: str = ".") -> list[str]:
        data = await self._call("/list_dir", f"list {path}", {"path": path})
        return [str(e) for e in data.get("entries", [])]

    async def delete_dir(self, path: str) -> None:
        await self._call("/delete_dir", f"delete directory {path}", {"path": path})

    async def write_file(self, path: str, content: str | bytes | BinaryIO) -> None:
        """Create or replace a file with ``content`` (text is written as UTF-8, bytes as they
        are). The write is atomic; parent directories must exist.

        ``content`` may also be a file opened for binary reading (sandlot): it is sent from
        where it stands to its end in pieces, never held in memory whole."""
        what = f"write {path}"
        if isinstance(content, str):
            data = content.encode("utf-8")
        elif isinstance(content, (bytes, bytearray, memoryview)):
            data = bytes(content)
        elif callable(getattr(content, "read", None)):
            await self._sandbox._agent_raw(
                "PUT",
                "/files",
                what,
                params={"path": path},
                content=_reader_pieces(content),
                length=await async_run_blocking(_remaining_length, content),
            )
            return
        else:
            raise SandboxRequestError(
                f"content must be str, bytes or a binary file, not {type(content).__name__}", 400
            )
        await self._sandbox._agent_raw("PUT", "/files", what, params={"path": path}, content=data)

    async def write_files(
        self, files: Iterable[Mapping[str, Any]] | Mapping[str, str | bytes]
    ) -> None:
        """Write several files: ``[{"path": ..., "content": ...}, ...]`` or ``{path: content}``."""
        items: list[tuple[str, Any]]
        if isinstance(files, Mapping):
            items = [(str(p), c) for p, c in files.items()]
        else:
            items = [(str(f["path"]), f["content"]) for f in files]
        for path, content in items:
            await self.write_file(path, content)

    async def read_file(
        self, path: str, encoding: str = "utf-8", max_bytes: int | None = None
    ) -> FileContent:
        """``{content, encoding}``: text for ``encoding="utf-8"`` (the default; bytes that are
        not UTF-8 become U+FFFD), base64 text for ``encoding="base64"``. ``.bytes`` gives the
        exact bytes either way -- or use :meth:`read_bytes`, whose ``max_bytes`` this takes."""
        if encoding not in ("utf-8", "base64"):
            raise SandboxRequestError("encoding must be 'utf-8' or 'base64'", 400)
        raw = await self.read_bytes(path, max_bytes=max_bytes)
        if encoding == "base64":
            return FileContent(base64.b64encode(raw).decode("ascii"), "base64")
        return FileContent(raw.decode("utf-8", "replace"), "utf-8")

    async def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        """A file's exact bytes, at most ``max_bytes`` of them (sandlot; default the handle's
        ``max_read_bytes``, 64 MiB): a larger file, or an endless one such as a symlink to
        ``/proc/self/pagemap``, raises :class:`SandboxFileTooLargeError` once the limit is
        passed, having held no more than that. :meth:`download_file` copies big files to
        disk instead."""
        limit = self._sandbox.max_read_bytes if max_bytes is None else max_bytes
        _check_limit(limit, "max_bytes")
        pieces: list[bytes] = []
        async with self._sandbox._agent_download(path, f"read {path}") as response:
            _check_announced(response, limit, path)
            total = 0
            async for piece in response.aiter_bytes():
                total += len(piece)
                if total > limit:
                    raise _too_large(path, limit)
                pieces.append(piece)
        return b"".join(pieces)

    async def rename_file(self, old_path: str, new_path: str) -> None:
        """Rename (``mv``) a file or directory."""
        result = await self._sandbox.exec(f"mv -- {shlex.quote(old_path)} {shlex.quote(new_path)}")
        if result.exit_code != 0:
            raise SandboxRequestError(
                f"rename {old_path} -> {new_path}: {result.stderr.strip()}", 400, result.stderr
            )

    async def rm(self, path: str, recursive: bool = False) -> None:
        """Remove a file, or a directory tree with ``recursive=True``."""
        info = await self.stat(path)
        if not info.get("exists"):
            raise SandboxRequestError(f"rm {path}: No such file or directory", 404, info)
        if info.get("type") == "directory":
            if not recursive:
                raise SandboxRequestError(
                    f"rm {path}: is a directory (pass recursive=True)", 400, info
                )
            await self.delete_dir(path)
        else:
            await self._call("/delete_file", f"rm {path}", {"path": path})

    async def stat(self, path: str) -> dict[str, Any]:
        """``{exists, type, size, mode, mtime, uid, gid}`` of a path (symlinks followed)."""
        data = await self._call("/stat", f"stat {path}", {"path": path})
        return dict(data)

    async def exists(self, path: str) -> bool:
        return bool((await self.stat(path)).get("exists"))

    async def is_file(self, path: str) -> bool:
        return (await self.stat(path)).get("type") == "file"

    async def is_dir(self, path: str) -> bool:
        return (await self.stat(path)).get("type") == "directory"

    async def upload_file(self, local_path: str | os.PathLike[str], remote_path: str) -> None:
        """Copy a local file into the sandbox (binary-safe, streamed: the file is never held
        in memory whole)."""
        path = os.fspath(local_path)
        with open(path, "rb") as f:
            await self._sandbox._agent_raw(
                "PUT",
                "/files",
                f"upload {path} to {remote_path}",
                params={"path": remote_path},
                content=_reader_pieces(f),
                length=await async_run_blocking(_remaining_length, f),
            )

    async def download_file(
        self,
        local_path: str | os.PathLike[str],
        remote_path: str,
        max_bytes: int | None = None,
    ) -> None:
        """Copy a sandbox file to ``local_path`` (binary-safe). Note the seed's order:
        local path first.

        The bytes stream to disk, in constant memory, through a temporary file beside
        ``local_path`` that replaces it once complete (a failed copy leaves nothing behind).
        ``max_bytes`` (sandlot) stops the copy past that size with
        :class:`SandboxFileTooLargeError`. Without it a regular file, whose size the agent
        announces and the sandbox's disk bounds, is copied whole, and a file of unknown length
        (procfs, sysfs: perhaps endless) stops at the handle's ``max_read_bytes``."""
        if max_bytes is not None:
            _check_limit(max_bytes, "max_bytes")
        local = os.fspath(local_path)
        what = f"download {remote_path}"
        async with self._sandbox._agent_download(remote_path, what) as response:
            limit = max_bytes
            if limit is None and "content-length" not in response.headers:
                limit = self._sandbox.max_read_bytes
            if limit is not None:
                _check_announced(response, limit, remote_path)
            sink = await async_run_blocking(_LocalFile, local)
            try:
                total = 0
                async for piece in response.aiter_bytes(DOWNLOAD_CHUNK):
                    total += len(piece)
                    if limit is not None and total > limit:
                        raise _too_large(remote_path, limit)
                    await async_run_blocking(sink.write, piece)
                await async_run_blocking(sink.commit)
            finally:
                sink.discard()  # not in a thread: a cancelled task must still clean up


def _allowlist(entries: Sequence[str]) -> list[str]:
    # A lone string is a Sequence[str] too: "10.0.0.0/8" would become ten one-letter entries.
    if isinstance(entries, str):
        raise SandboxRequestError("outbound_allowlist must be a list of CIDRs", 400)
    return list(entries)


#: Request bodies go out in pieces of this size.
UPLOAD_CHUNK = 1 << 20
#: Downloads are written to disk in pieces of this size (one thread hop each in the async SDK).
DOWNLOAD_CHUNK = 1 << 20


def _check_limit(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SandboxRequestError(f"{name} must be a non-negative int, not {value!r}", 400)


def _too_large(path: str, limit: int) -> SandboxFileTooLargeError:
    return SandboxFileTooLargeError(
        f"read {path}: the file is larger than max_bytes={limit}; pass a larger max_bytes, "
        "or download_file() to copy it to disk",
        limit,
    )


def _check_announced(response: httpx.Response, limit: int, path: str) -> None:
    """Refuse before reading a byte when the agent announces more than ``limit``."""
    try:
        announced = int(response.headers.get("content-length", ""))
    except ValueError:
        return
    if announced > limit:
        raise _too_large(path, limit)


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), UPLOAD_CHUNK):
        yield bytes(view[start : start + UPLOAD_CHUNK])


async def _reader_pieces(f: BinaryIO) -> AsyncIterator[bytes]:
    while True:
        piece = await async_run_blocking(f.read, UPLOAD_CHUNK)
        if not piece:
            return
        yield piece


def _remaining_length(f: BinaryIO) -> int | None:
    """Bytes from ``f``'s position to its end when it is a regular file (the upload then has
    a Content-Length); None for a pipe or a socket (sent chunked)."""
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(0, st.st_size - f.tell())
    except (OSError, ValueError, AttributeError):  # io.BytesIO has no fileno()
        pass
    try:
        here = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(here)
        return max(0, end - here)
    except (OSError, ValueError, AttributeError):
        return None


class _LocalFile:
    """Where a download lands: a temporary file beside the target, renamed over it when
    complete; a target that exists and is not a regular file (``/dev/null``, a FIFO) is
    written to directly."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            direct = not stat.S_ISREG(os.stat(path).st_mode)
        except FileNotFoundError:
            direct = False
        if direct:
            self._tmp: str | None = None
            self._f = open(path, "wb")  # noqa: SIM115 - closed by commit() or discard()
            return
        directory, name = os.path.split(os.path.abspath(path))
        self._tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.part")
        # 0666 less the umask, as open(path, "wb") would give the file itself
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        self._f = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self._f.write(data)

    def commit(self) -> None:
        self._f.close()
        if self._tmp is not None:
            os.replace(self._tmp, self.path)
            self._tmp = None

    def discard(self) -> None:
        """Drop what was written, unless :meth:`commit` ran (then nothing is left to do)."""
        self._f.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None
