"""Running the server: listen address parsing, the Unix socket's permissions, engine loading."""

from __future__ import annotations

import importlib
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from sandlot.engines.base import Engine, EngineError
from sandlot.paths import default_server_socket, state_dir
from sandlot.server.app import ServerConfig, create_app, unix_public_url
from sandlot.server.db import default_database_url
from sandlot.server.pool import PoolKey
from sandlot.server.serverkey import KEY_FILE_ENV, ServerKeyError
from sandlot.server.wsraw import PortsWebSocketProtocol, ports_http_protocol

DEFAULT_REGION = "local"


@dataclass(frozen=True)
class Listen:
    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_unix(self) -> bool:
        return self.unix_path is not None


def parse_listen(value: str | None) -> Listen:
    """``unix:/path/to.sock`` or ``tcp:HOST:PORT`` (default: the per-user Unix socket)."""
    if not value:
        return Listen(unix_path=str(default_server_socket()))
    kind, sep, rest = value.partition(":")
    if sep and kind == "unix" and rest:
        return Listen(unix_path=rest)
    if sep and kind == "tcp":
        host, sep2, port = rest.rpartition(":")
        if sep2 and host and port.isdigit() and 0 < int(port) < 65536:
            return Listen(host=host.strip("[]"), port=int(port))
    raise ValueError(f"--listen must be unix:PATH or tcp:HOST:PORT, not {value!r}")


def load_engine(spec: str) -> Engine:
    """``local`` (the default), or ``package.module:factory`` -- a callable returning an Engine
    (used by tests and for out-of-tree engines)."""
    if spec == "local":
        from sandlot.engines.local import LocalEngine

        engine: Engine = LocalEngine(state_dir())
        return engine
    module, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"unknown engine {spec!r}: use 'local' or 'module:factory'")
    factory: Any = getattr(importlib.import_module(module), attr)
    result: Engine = factory()
    return result


def bind_unix_socket(path: str) -> socket.socket:
    """Bind the server's socket: its directory 0700 and the socket 0600, because on this socket
    file permissions are the only authentication."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = p.parent.stat()
    if info.st_uid != os.geteuid():
        raise RuntimeError(
            f"{p.parent} belongs to uid {info.st_uid}, not to us; refusing to use it"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(p.parent, 0o700)
    if p.exists() or p.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            p.unlink()  # stale socket of a server that died
        else:
            raise RuntimeError(f"a sandlot server is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(512)
    return sock


def secure_state_dir(path: Path) -> None:
    """The state directory holds the database, the server key, sandboxes' disks and secrets:
    0700, for an existing installation too (sandlot used to leave it 0755)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and info.st_mode & 0o077:
        os.chmod(path, 0o700)


def build_config(
    listen: Listen,
    database: str | None,
    engine: str,
    public_url: str | None,
    pools: dict[PoolKey, int] | None = None,
    domain: str | None = None,
    tcp_proxy_host: str = "127.0.0.1",
    key_file: str | None = None,
) -> ServerConfig:
    secure_state_dir(state_dir())
    url = database or os.environ.get("SANDLOT_DATABASE_URL") or default_database_url(state_dir())
    if public_url is None and listen.unix_path is not None:
        public_url = unix_public_url(listen.unix_path)
    return ServerConfig(
        database_url=url,
        engines={DEFAULT_REGION: load_engine(engine)},
        default_region=DEFAULT_REGION,
        auth="socket" if listen.is_unix else "token",
        public_url=public_url,
        # SQLite means one server process: anything still "creating" at start is a leftover.
        stale_create_after=0.0 if url.startswith("sqlite") else 900.0,
        pools=dict(pools or {}),
        domain=domain,
        tcp_proxy_host=tcp_proxy_host,
        key_file=key_file or os.environ.get(KEY_FILE_ENV) or None,
    )


def serve(
    listen_value: str | None,
    database: str | None = None,
    engine: str = "local",
    public_url: str | None = None,
    log_level: str = "info",
    pools: dict[PoolKey, int] | None = None,
    domain: str | None = None,
    tcp_proxy_host: str = "127.0.0.1",
    key_file: str | None = None,
) -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    listen = parse_listen(listen_value)
    try:
        config = build_config(
            listen, database, engine, public_url, pools, domain, tcp_proxy_host, key_file
        )
    except EngineError as exc:
        # e.g. the local engine without root: a message for the user, not a traceback
        raise RuntimeError(f"cannot start the engine: {exc}") from exc
    except OSError as exc:
        raise RuntimeError(f"cannot use the state directory {state_dir()}: {exc.strerror}") from exc
    try:
        app = create_app(config)
    except ServerKeyError as exc:
        raise RuntimeError(f"cannot open the database: {exc}") from exc
    uv_config = uvicorn.Config(
        app,
        # WebSockets and h2c upgrades to exposed ports: bytes both ways (wsraw.py)
        ws=PortsWebSocketProtocol,
        http=ports_http_protocol(),
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        host=listen.host or "127.0.0.1",
        port=listen.port or 0,
    )
    if listen.unix_path is not None:
        sock = bind_unix_socket(listen.unix_path)
        server = _Server(uv_config, unlink=listen.unix_path)
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
            _unlink_socket(listen.unix_path)
    else:
        uvicorn.Server(uv_config).run()


def _unlink_socket(path: str) -> None:
    if Path(path).is_socket():
        Path(path).unlink(missing_ok=True)


class _Server(uvicorn.Server):
    """Removes its Unix socket at shutdown. (After a SIGTERM uvicorn re-raises the signal once
    it has shut down, so code after ``run()`` may never run.)"""

    def __init__(self, config: uvicorn.Config, unlink: str) -> None:
        super().__init__(config)
        self._unlink = unlink

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        _unlink_socket(self._unlink)
