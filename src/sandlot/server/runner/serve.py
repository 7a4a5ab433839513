"""Running the server: listen address parsing, the Unix socket's permissions, engine loading,
and one server per state directory.

Why one per state dir: two servers over one database and one engine state both run lifecycle
timers and start-up recovery on the same sandboxes (seen: ``sandlot server --listen tcp:...``
then ``sandlot token create`` autostarted a second server on the Unix socket). The server holds
an exclusive ``flock`` on ``<state>/server.lock`` for its whole life; a second one is refused
with the holder's pid. And a TCP server also serves its admin API on the state dir's Unix socket
(:func:`sandlot.paths.default_server_socket`), where the CLI finds it, so the admin commands
reach the running server instead of starting another.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from sandlot.ca_certs import ExtraCA
from sandlot.engines.base import Engine, EngineError, EngineUnavailableError
from sandlot.engines.kubernetes.settings import KubernetesSettings
from sandlot.images.trust import ImageTrust
from sandlot.local_trust import open_private_file, private_dir
from sandlot.paths import default_server_socket, state_dir
from sandlot.server.api.app import create_app
from sandlot.server.config import (
    MAX_JSON_BODY,
    TOKEN_REQUESTS,
    PoolKey,
    PortLimits,
    ServerConfig,
    unix_public_url,
)
from sandlot.server.control.serverkey import KEY_FILE_ENV, ServerKeyError
from sandlot.server.control.sqlitefiles import default_database_url
from sandlot.server.h2limits import H2Limits
from sandlot.server.runner.portslisten import (
    bind_ports_listener,
    parse_ports_listen,
    ports_url,
)
from sandlot.server.runner.protocols import PortsWebSocketProtocol, ports_http_protocol

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


@dataclass(frozen=True)
class HostPolicy:
    """How much of the host sandboxes may be promised (the local engine's admission):
    ``overcommit`` "allow" (each create must fit what is free now) or "none" (disks
    preallocated, promises never add up past the host); ``reserve``: the fraction of each host
    total kept out of reach; ``extra_ca``: what sandboxes trust beyond their image's CAs."""

    overcommit: str = "allow"
    reserve: float = 0.10
    #: The operator's extra CA certificates for every new sandbox (``--extra-ca-file``).
    extra_ca: ExtraCA | None = None


def load_engine(
    spec: str, policy: HostPolicy | None = None, kube: KubernetesSettings | None = None
) -> Engine:
    """``local`` (the default), ``kubernetes`` (Pods on a cluster, ``kube`` says which and
    how), or ``package.module:factory`` -- a callable returning an Engine (used by tests and
    for out-of-tree engines)."""
    if spec == "kubernetes":
        try:
            from sandlot.engines.kubernetes.engine import KubernetesEngine
        except ImportError as exc:
            raise EngineUnavailableError(
                f"the kubernetes engine needs its client: pip install 'sandlot[kubernetes]' ({exc})"
            ) from None
        return KubernetesEngine(kube or KubernetesSettings())
    if spec == "local":
        from sandlot.engines.local import LocalEngine
        from sandlot.engines.local.admission import Overcommit

        policy = policy or HostPolicy()
        engine: Engine = LocalEngine(
            state_dir(),
            overcommit=Overcommit(policy.overcommit),
            reserve=policy.reserve,
            extra_ca=policy.extra_ca,
        )
        return engine
    module, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"unknown engine {spec!r}: use 'local', 'kubernetes' or 'module:factory'")
    factory: Any = getattr(importlib.import_module(module), attr)
    result: Engine = factory()
    return result


def bind_unix_socket(path: str) -> socket.socket:
    """Bind the server's socket: its directory ours and 0700 (never a symlink, never one made
    by someone else: :func:`sandlot.local_trust.private_dir`) and the socket 0600, because on
    this socket file permissions are the only authentication."""
    p = Path(path)
    private_dir(p.parent)
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


def lock_state_dir(state: Path) -> int:
    """Take the state directory for this process (the lock goes with the process, however it
    ends); returns the lock's descriptor, to be kept open. Refuses if a server holds it."""
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = open_private_file(state / "server.lock")
    except OSError as exc:
        raise RuntimeError(f"cannot use the state directory {state}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(
            f"another sandlot server (pid {holder}) is already running on the state directory "
            f"{state}: use that one (the CLI reaches it on its Unix socket), stop it first, or "
            "give this server its own SANDLOT_STATE_DIR"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def secure_state_dir(path: Path) -> None:
    """The state directory holds the database, the server key, sandboxes' disks and secrets:
    0700, for an existing installation too (sandlot used to leave it 0755)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and info.st_mode & 0o077:
        os.chmod(path, 0o700)


@dataclass(frozen=True)
class ServerOptions:
    """What ``sandlot server`` is asked for (its command line), before anything is opened or
    bound: :func:`serve` turns it into a :class:`ServerConfig`. One object rather than twenty
    parameters passed on twice."""

    listen: str | None = None
    database: str | None = None
    engine: str = "local"
    public_url: str | None = None
    log_level: str = "info"
    pools: dict[PoolKey, int] = field(default_factory=dict)
    domain: str | None = None
    #: ``--ports-listen`` (runner/portslisten.py).
    ports_listen: str | None = None
    tcp_proxy_host: str = "127.0.0.1"
    trusted_image_dirs: tuple[str, ...] = ()
    trusted_registries: tuple[str, ...] = ()
    key_file: str | None = None
    policy: HostPolicy = field(default_factory=HostPolicy)
    max_json_body: int = MAX_JSON_BODY
    h2_limits: H2Limits = field(default_factory=H2Limits)
    port_limits: PortLimits = field(default_factory=PortLimits)
    token_requests: int = TOKEN_REQUESTS
    #: With ``engine="kubernetes"``: the cluster, namespace and runtime classes.
    kubernetes: KubernetesSettings | None = None
    #: ``--runtime``: the runtime of sandboxes whose create names none.
    default_runtime: str = "crun"


def build_config(
    options: ServerOptions,
    listen: Listen,
    admin_socket: str | None = None,
    ports_listener: socket.socket | None = None,
) -> ServerConfig:
    """The app's configuration; the engine is started here (a bad trusted image directory is
    refused before it)."""
    image_trust = ImageTrust.from_dirs(options.trusted_image_dirs, options.trusted_registries)
    secure_state_dir(state_dir())
    url = (
        options.database
        or os.environ.get("SANDLOT_DATABASE_URL")
        or default_database_url(state_dir())
    )
    public_url = options.public_url
    if public_url is None and listen.unix_path is not None:
        public_url = unix_public_url(listen.unix_path)
    ports_address, ports_base = ports_url(ports_listener) if ports_listener else (None, None)
    engine = load_engine(options.engine, options.policy, options.kubernetes)
    # Replicas share a PostgreSQL store: an engine that can elect one of them (a Kubernetes
    # Lease) says which runs the timers, pools and reconcile. SQLite: one server, no election.
    elect = getattr(engine, "leadership", None)
    leadership = elect() if elect is not None and not url.startswith("sqlite") else None
    return ServerConfig(
        database_url=url,
        engines={DEFAULT_REGION: engine},
        leadership=leadership,
        default_region=DEFAULT_REGION,
        auth="socket" if listen.is_unix else "token",
        public_url=public_url,
        # SQLite means one server process: anything still "creating" at start is a leftover.
        stale_create_after=0.0 if url.startswith("sqlite") else 900.0,
        pools=dict(options.pools),
        domain=options.domain,
        tcp_proxy_host=options.tcp_proxy_host,
        image_trust=image_trust,
        admin_socket=admin_socket or listen.unix_path,
        key_file=options.key_file or os.environ.get(KEY_FILE_ENV) or None,
        max_json_body=options.max_json_body,
        h2_limits=options.h2_limits,
        port_limits=options.port_limits,
        token_requests=options.token_requests,
        ports_listen=ports_address,
        ports_url=ports_base,
        default_runtime=options.default_runtime,
    )


def serve(options: ServerOptions) -> None:
    log_level = options.log_level
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    listen = parse_listen(options.listen)
    state = state_dir()
    state_lock = lock_state_dir(state)  # noqa: F841 -- held until the process ends
    admin_socket = listen.unix_path or str(default_server_socket(state))
    ports_address = parse_ports_listen(options.ports_listen, listen.is_unix)
    ports_listener = bind_ports_listener(ports_address, state) if ports_address else None
    try:
        config = build_config(options, listen, admin_socket, ports_listener)
    except ValueError as exc:  # e.g. a trusted image directory that is not one
        raise RuntimeError(str(exc)) from exc
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
        # WebSockets and h2c upgrades to exposed ports: bytes both ways (protocols.py)
        ws=PortsWebSocketProtocol,
        http=ports_http_protocol(),
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        host=listen.host or "127.0.0.1",
        port=listen.port or 0,
    )
    # A TCP server listens on its admin socket too: one app, whose requests know which
    # socket they came in on (ServerConfig.admin_socket).
    sockets = [bind_unix_socket(admin_socket)]
    if listen.unix_path is None:
        sockets.append(uv_config.bind_socket())
    if ports_listener is not None:
        sockets.append(ports_listener)
        logging.getLogger("sandlot.server").info("exposed ports at %s", config.ports_url)
    server = _Server(uv_config, unlink=admin_socket)
    try:
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        _unlink_socket(admin_socket)


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
