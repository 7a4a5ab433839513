"""AsyncSandbox: the Koyeb Sandbox SDK's API over a sandlot server.

The class is assembled from one mixin per concern, each in its own module: ``base`` (the
handle's state and agent calls), ``lifecycle``, ``ports`` and ``processes``; ``filesystem``
and ``exec_stream`` hold the objects it hands out. :class:`AsyncSnapshot` (Koyeb's
``Snapshot``: ``get``, ``list``, ``refresh``, ``wait_available``, ``delete``, ``spawn``) lives
here too: a sandbox makes snapshots and a snapshot spawns sandboxes, so they are one module
(``template`` sits beside them, given what it needs).

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

import datetime as dt
import shlex
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from sandlot.sdk._answers import sandboxes_in
from sandlot.sdk._async.calls import allowlist, call, open_client, to_json
from sandlot.sdk._async.filesystem import AsyncFilesystem
from sandlot.sdk._async.lifecycle import LifecycleMixin
from sandlot.sdk._async.ports import PortsMixin
from sandlot.sdk._async.processes import ProcessesMixin
from sandlot.sdk._async.template import AsyncSnapshotTemplate
from sandlot.sdk._connection import Connection, connection_arguments, resolve_connection
from sandlot.sdk._create_options import config_file_items, main_command, refuse_cloud_only
from sandlot.sdk._limits import DEFAULT_CREATE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_POLL_INTERVAL
from sandlot.sdk._primitives import async_sleep, monotonic
from sandlot.sdk.errors import SandboxError, SandboxServiceError
from sandlot.sdk.types import ConfigFile, SnapshotStatus, SnapshotType


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
        snapshot: AsyncSnapshot | str | None = None,
        config_files: Mapping[str, str | bytes | ConfigFile] | None = None,
        sandbox_secret: str | None = None,
        _experimental_deep_sleep_value: int | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        cleanup_on_failure: bool = True,
        app_id: str | None = None,
        enable_mesh: bool | None = None,
        entrypoint: Sequence[str] | None = None,
        command: str | None = None,
        args: Sequence[str] | None = None,
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
        ``"gvisor"`` (gVisor's user-space kernel between the code and the host's).

        ``snapshot``: start from a snapshot's filesystem (an :class:`AsyncSnapshot` or its id);
        the sandbox then runs the snapshot's image (leave ``image`` out).

        Koyeb's other options: ``config_files`` (``{path: content or ConfigFile}``, written
        once the sandbox is ready), ``sandbox_secret`` (the agent's secret, default: one the
        server derives), ``_experimental_deep_sleep_value`` (with light sleep: seconds before
        deep sleep), ``poll_interval`` (of the SDK's readiness polls), ``entrypoint``/
        ``command``/``args`` (the sandbox's main process, started beside the agent and
        restarted whenever it ends; listed as ``main-N`` by :meth:`list_processes`);
        ``cleanup_on_failure``
        is always what sandlot does; ``app_id`` and ``enable_mesh=True`` mean something on
        Koyeb's cloud only: :class:`UnsupportedFeatureError`."""
        refuse_cloud_only(app_id, enable_mesh)
        files = config_file_items(config_files)
        main = main_command(entrypoint, command, args)
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
        if snapshot is not None:
            body["snapshot"] = snapshot.id if isinstance(snapshot, AsyncSnapshot) else snapshot
        if sandbox_secret is not None:
            body["sandbox_secret"] = sandbox_secret
        if main is not None:
            body["command"] = main
        if _experimental_deep_sleep_value is not None:
            body["deep_sleep_value"] = _experimental_deep_sleep_value
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
        sandbox = cls(info, conn, client)
        if files:
            try:
                await sandbox.wait_ready(timeout=timeout, poll_interval=poll_interval)
                await sandbox._write_config_files(files)
            except BaseException:
                await sandbox.delete()  # as a failed create: nothing half made is left
                await sandbox.close()
                raise
        return sandbox

    async def _write_config_files(self, files: list[tuple[str, bytes, int]]) -> None:
        for path, data, mode in files:
            parent = path.rsplit("/", 1)[0]
            if parent:
                await self.filesystem.mkdir(parent, recursive=True)
            await self.filesystem.write_file(path, data)
            await self.exec(f"chmod {mode:o} {shlex.quote(path)}", raise_on_error=True)

    @classmethod
    async def create_from_snapshot(
        cls, snapshot: AsyncSnapshot | str, name: str | None = None, **create_kwargs: Any
    ) -> AsyncSandbox:
        """``create(snapshot=snapshot, ...)``: a new sandbox from a snapshot's filesystem."""
        return await cls.create(name=name, snapshot=snapshot, **create_kwargs)

    @classmethod
    def template(
        cls,
        name: str,
        image: str = "default",
        workdir: str | None = None,
        api_token: str | None = None,
        api_url: str | None = None,
        delete_builder: bool = True,
        **create_kwargs: Any,
    ) -> AsyncSnapshotTemplate:
        """A template: steps (``.file``, ``.copy``, ``.run``, ``.env``) that ``.build()`` runs in
        a builder sandbox of ``image`` and keeps as a snapshot (built once per distinct steps)."""
        return AsyncSnapshotTemplate(
            cls.create,
            AsyncSnapshot.list,
            name,
            image,
            workdir=workdir,
            api_token=api_token,
            api_url=api_url,
            delete_builder=delete_builder,
            **create_kwargs,
        )

    # -- snapshots and forks ------------------------------------------------------------------

    async def snapshot(
        self,
        name: str,
        snapshot_type: SnapshotType | str | None = None,
        wait_available: bool = True,
        timeout: float = 600,
        labels: Mapping[str, str] | None = None,
    ) -> AsyncSnapshot:
        """Keep this sandbox's filesystem changes as a snapshot named ``name`` (the sandbox is
        frozen while they are copied, then runs on). ``SnapshotType.FULL`` (memory and
        processes too) needs a runtime that can checkpoint: :class:`UnsupportedFeatureError`
        says so. With ``wait_available`` it answers once the snapshot is available (at most
        ``timeout`` seconds), else at once, while it is being made."""
        kind = SnapshotType(getattr(snapshot_type, "value", snapshot_type) or "filesystem")
        body: dict[str, Any] = {
            "name": name,
            "snapshot_type": kind.value,
            "wait_available": wait_available,
        }
        if labels is not None:
            body["labels"] = dict(labels)
        client = await self._http()
        data = await call(
            client,
            self._conn,
            "POST",
            f"/v1/sandboxes/{self.id}/snapshots",
            f"snapshot sandbox {self.id}",
            content=to_json(**body),
            headers={"content-type": "application/json"},
            timeout=httpx.Timeout(timeout + 30.0, connect=10.0),
        )
        made = AsyncSnapshot(data, self._conn)
        if wait_available and not await made.wait_available(timeout=timeout):
            raise SandboxError(f"snapshot {made.id} is {made.status.value}: {made.messages}")
        return made

    async def fork(
        self, n: int = 1, wait_ready: bool = True, timeout: float = DEFAULT_CREATE_TIMEOUT
    ) -> list[AsyncSandbox]:
        """``n`` new running sandboxes starting from this one's filesystem as it is now (sandlot;
        memory and processes are not carried: they start afresh), each with its own secret,
        network and lifecycle, and this one's options. Their snapshot goes with the last."""
        client = await self._http()
        data = await call(
            client,
            self._conn,
            "POST",
            f"/v1/sandboxes/{self.id}/fork",
            f"fork sandbox {self.id}",
            content=to_json(n=n, wait_ready=wait_ready, timeout=timeout),
            headers={"content-type": "application/json"},
            timeout=httpx.Timeout(n * (timeout + 30.0), connect=10.0),
        )
        return [
            type(self)(item, self._conn) for item in sandboxes_in(data, f"fork sandbox {self.id}")
        ]

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
        return [cls(item, conn) for item in sandboxes_in(data, "list sandboxes")]

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


def _time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _enum(kind: Any, value: Any, default: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        return default


class AsyncSnapshot:
    """A snapshot, as the server last described it (:meth:`refresh` asks again)."""

    def __init__(self, info: dict[str, Any], conn: Connection) -> None:
        if not isinstance(info, dict) or not isinstance(info.get("id"), str):
            raise SandboxServiceError("the server's answer does not describe a snapshot")
        self._conn = conn
        self._update(info)

    def _update(self, info: dict[str, Any]) -> None:
        self._info = dict(info)
        self.id: str = info["id"]
        self.name: str = str(info.get("name", ""))
        #: The sandbox it was taken of (Koyeb: ``service_id``).
        self.sandbox_id: str = str(info.get("sandbox_id", ""))
        self.snapshot_type: SnapshotType = _enum(
            SnapshotType, info.get("snapshot_type"), SnapshotType.FILESYSTEM
        )
        self.status: SnapshotStatus = _enum(
            SnapshotStatus, info.get("status"), SnapshotStatus.INVALID
        )
        self.created_at: dt.datetime | None = _time(info.get("created_at"))
        self.available_at: dt.datetime | None = _time(info.get("available_at"))
        size = info.get("size")
        self.size: int | None = size if isinstance(size, int) else None
        self.messages: list[str] = [str(m) for m in info.get("messages") or []]
        self.image: str = str(info.get("image", ""))
        self.region: str = str(info.get("region", ""))
        self.project_id: str = str(info.get("project_id", ""))
        self.labels: dict[str, str] = dict(info.get("labels") or {})
        #: Koyeb's fields with no meaning here, for code that reads them.
        self.deployment_id: str | None = None
        self.organization_id: str = ""
        #: What the template that built it did (Koyeb's name; empty otherwise).
        self.operations: list[str] = getattr(self, "operations", [])

    @property
    def service_id(self) -> str:
        """Koyeb's name for the sandbox the snapshot was taken of."""
        return self.sandbox_id

    @property
    def info(self) -> dict[str, Any]:
        """The server's full description, as last fetched."""
        return dict(self._info)

    def __repr__(self) -> str:
        return f"<Snapshot id={self.id} name={self.name!r} status={self.status.value}>"

    # -- the API --------------------------------------------------------------------------------

    @staticmethod
    async def _request(conn: Connection, method: str, path: str, what: str, **kw: Any) -> Any:
        client = await open_client(conn)
        try:
            return await call(client, conn, method, path, what, **kw)
        finally:
            await client.aclose()

    @classmethod
    async def get(
        cls, snapshot_id: str, api_token: str | None = None, api_url: str | None = None
    ) -> AsyncSnapshot:
        """A snapshot of your project by id (:class:`SandboxNotFoundError` if there is none)."""
        conn = resolve_connection(api_url, api_token)
        path = f"/v1/snapshots/{quote(str(snapshot_id), safe='')}"
        return cls(await cls._request(conn, "GET", path, f"get snapshot {snapshot_id}"), conn)

    @classmethod
    async def list(
        cls,
        sandbox_id: str | None = None,
        snapshot_type: SnapshotType | None = None,
        status: SnapshotStatus | None = None,
        limit: int = 50,
        offset: int = 0,
        api_token: str | None = None,
        api_url: str | None = None,
        labels: Mapping[str, str] | None = None,
        service_id: str | None = None,
    ) -> list[AsyncSnapshot]:
        """Your project's snapshots, oldest first, optionally filtered (``service_id`` is
        Koyeb's name for ``sandbox_id``); deleted ones only with ``status=DELETED``."""
        conn = resolve_connection(api_url, api_token)
        params: list[tuple[str, str]] = []
        if sandbox_id or service_id:
            params.append(("sandbox_id", str(sandbox_id or service_id)))
        if snapshot_type is not None:
            params.append(("snapshot_type", SnapshotType(snapshot_type).value))
        if status is not None:
            params.append(("status", SnapshotStatus(status).value))
        for key, value in (labels or {}).items():
            params.append(("label", f"{key}={value}"))
        data = await cls._request(conn, "GET", "/v1/snapshots", "list snapshots", params=params)
        items = data.get("snapshots") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise SandboxServiceError("list snapshots: the answer has no 'snapshots' list")
        return [cls(item, conn) for item in items[offset : offset + limit]]

    async def refresh(self) -> None:
        """Read the snapshot's state again."""
        path = f"/v1/snapshots/{quote(self.id, safe='')}"
        self._update(await self._request(self._conn, "GET", path, f"get snapshot {self.id}"))

    async def wait_available(self, timeout: float = 600, poll_interval: float = 0.5) -> bool:
        """Wait until the snapshot is available: True; False if it failed or ``timeout``
        passed first."""
        deadline = monotonic() + timeout
        while True:
            await self.refresh()
            if self.status is SnapshotStatus.AVAILABLE:
                return True
            if self.status in (SnapshotStatus.FAILED, SnapshotStatus.DELETED):
                return False
            if monotonic() >= deadline:
                return False
            await async_sleep(min(poll_interval, max(deadline - monotonic(), 0.0)))

    async def delete(self) -> bool:
        """Delete the snapshot. Refused (:class:`SandboxRequestError`, 409) while a sandbox
        spawned from it, or a snapshot taken of one, still uses it."""
        path = f"/v1/snapshots/{quote(self.id, safe='')}"
        self._update(await self._request(self._conn, "DELETE", path, f"delete snapshot {self.id}"))
        return True

    async def spawn(
        self,
        name: str | None = None,
        wait_ready: bool = True,
        timeout: float = DEFAULT_CREATE_TIMEOUT,
        **create_kwargs: Any,
    ) -> AsyncSandbox:
        """A new sandbox from this snapshot: ``AsyncSandbox.create(snapshot=self, ...)``."""
        if "snapshot" in create_kwargs:
            raise SandboxError("spawn() takes no snapshot: it spawns this one")
        url, token = connection_arguments(self._conn)
        create_kwargs.setdefault("api_url", url)
        create_kwargs.setdefault("api_token", token)
        return await AsyncSandbox.create(
            name=name, wait_ready=wait_ready, timeout=timeout, snapshot=self, **create_kwargs
        )
