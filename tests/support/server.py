"""A real sandlot server (uvicorn) in a background thread, on a Unix socket or 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from sandlot.engines.base import Engine
from sandlot.images.trust import ImageTrust
from sandlot.server.api.app import create_app
from sandlot.server.config import Leadership, ProbeSettings, ServerConfig, unix_public_url
from sandlot.server.runner.protocols import (
    HEAD_TIMEOUT,
    PortsWebSocketProtocol,
    ports_http_protocol,
)
from sandlot.server.runner.serve import bind_unix_socket


@dataclass
class RunningServer:
    app: Any
    server: uvicorn.Server
    thread: threading.Thread
    engine: Engine
    unix_path: str | None
    url: str  # for SANDLOT_URL / api_url

    def client(self, token: str | None = None, project: str | None = None) -> httpx.Client:
        headers = {}
        if token:
            headers["authorization"] = f"Bearer {token}"
        if project:
            headers["x-sandlot-project"] = project
        if self.unix_path:
            return httpx.Client(
                transport=httpx.HTTPTransport(uds=self.unix_path),
                base_url="http://sandlot",
                headers=headers,
                timeout=60,
            )
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self, keep_sandboxes: bool = False) -> None:
        """Stop the server; with ``keep_sandboxes`` (a restart test), its sandboxes stay."""
        self.server.should_exit = True
        self.thread.join(30)
        if not keep_sandboxes:
            self._delete_leftovers()

    def _delete_leftovers(self) -> None:
        """Sandboxes this server made that nobody deleted (a test that failed half-way) are
        removed from the engine: a failing test must not leave processes, mounts or cgroups
        running. Only this server's own (its database's): an engine may be shared."""
        store = self.app.state.control.store
        statuses = ["creating", "running", "paused", "sleeping", "pooling", "pooled", "claiming"]
        ids = {row.id for row in store.sandboxes_with_status([*statuses, "error"])}
        store.close()
        if not ids:
            return

        async def delete() -> None:
            try:
                for info in await self.engine.list():
                    if info.id in ids:
                        with contextlib.suppress(Exception):
                            await self.engine.delete(info.id)
            finally:
                await self.engine.close()  # what this loop opened (an API client, say)

        asyncio.run(delete())


def start_server(
    engine: Engine,
    database_url: str,
    *,
    unix_path: Path | None = None,
    tcp: bool = False,
    stale_create_after: float = 0.0,
    pools: dict[Any, int] | None = None,
    domain: str | None = None,
    raw_websockets: bool = True,
    head_timeout: float = HEAD_TIMEOUT,
    trusted_image_dirs: tuple[Path, ...] = (),
    trusted_registries: tuple[str, ...] = (),
    agent_probe: ProbeSettings | None = None,
    leadership: Leadership | None = None,
    key_file: Path | None = None,
    default_runtime: str = "crun",
) -> RunningServer:
    if tcp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        public = url
    else:
        assert unix_path is not None
        sock = bind_unix_socket(str(unix_path))
        url = f"unix:{unix_path}"
        public = unix_public_url(str(unix_path))
    config = ServerConfig(
        database_url=database_url,
        engines={"local": engine},
        default_region="local",
        auth="token" if tcp else "socket",
        public_url=public,
        stale_create_after=stale_create_after,
        pools=dict(pools or {}),
        domain=domain,
        image_trust=ImageTrust.from_dirs(trusted_image_dirs, trusted_registries),
        agent_probe=agent_probe or ProbeSettings(),
        leadership=leadership,
        key_file=str(key_file) if key_file else None,
        default_runtime=default_runtime,
    )
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=2,
            # as `sandlot server` runs it; without: the ASGI relay any ASGI server gets
            ws=PortsWebSocketProtocol if raw_websockets else "auto",
            http=ports_http_protocol(head_timeout) if raw_websockets else "auto",
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    return RunningServer(app, server, thread, engine, None if tcp else str(unix_path), url)
