"""What the async SDK and its generated sync twin share: result and event types, the cancel
token, configuration, error mapping, and the sync/async primitives that ``unasync`` swaps
(``async_sleep`` in ``_async/`` becomes ``sync_sleep`` in ``_sync/``, and so on)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import enum
import functools
import heapq
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx

from sandlot.local_trust import LocalTrustError, open_private_file, private_dir, signal_server
from sandlot.paths import default_server_socket
from sandlot.sdk.errors import (
    MissingApiTokenError,
    SandboxError,
    SandboxNotFoundError,
    SandboxRequestError,
    SandboxServiceError,
    SandboxTimeoutError,
    UnsupportedFeatureError,
)

T = TypeVar("T")
log = logging.getLogger("sandlot")

DEFAULT_CREATE_TIMEOUT = 300.0
DEFAULT_WAIT_READY_TIMEOUT = 60.0
DEFAULT_HEALTH_TIMEOUT = 5.0
DEFAULT_EXEC_TIMEOUT = 30.0
DEFAULT_POLL_INTERVAL = 0.5
DEFAULT_IDLE_TIMEOUT = 300
#: How much of each output stream ``exec`` keeps (the rest is counted, not kept): a command
#: printing 2 GiB once grew the client to 6.4 GiB. Change it per call (``max_output_bytes=``)
#: or per handle (``sandbox.max_output_bytes``).
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
#: The most ``read_bytes``/``read_file`` return unless told otherwise (``max_bytes=``, or
#: ``sandbox.max_read_bytes``): a sandbox's file can be endless (a symlink to
#: ``/proc/self/pagemap`` streamed until the client died of MemoryError). ``download_file``
#: streams to disk instead and has no limit unless given one.
DEFAULT_MAX_READ_BYTES = 64 * 1024 * 1024
#: The largest answer (JSON, or an error's body) the SDK reads: a sandbox's agent answers
#: through the server and may be hostile. A file's bytes and a stream's events are not answers
#: (they have their own limits).
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: The longest server-sent-event line the SDK accepts. The agent sends at most 64 KiB of output
#: per event (~384 KiB once JSON-escaped); anything far longer is a broken or hostile agent, and
#: unbounded it would be held whole in memory.
MAX_EVENT_LINE = 4 * 1024 * 1024
#: Server start when the SDK launches the local server itself.
SERVER_START_TIMEOUT = 60.0


# -- results and events -----------------------------------------------------------------------


class CommandStatus(enum.StrEnum):
    FINISHED = "finished"
    FAILED = "failed"


@dataclasses.dataclass
class CommandResult:
    """What ``exec`` returns: ``stdout``, ``stderr`` and ``code`` (also ``exit_code``)."""

    stdout: str
    stderr: str
    exit_code: int
    command: str = ""
    duration: float = 0.0
    #: The signal that killed the command, when one did (e.g. "SIGKILL").
    signal: str | None = None
    #: Bytes of output this result does not hold (sandlot): past ``max_output_bytes`` the
    #: command keeps running and its output is counted, not kept. ``stdout`` is then the first
    #: ``max_output_bytes`` (cut at a character boundary) and ``stdout_dropped_bytes`` the rest.
    stdout_dropped_bytes: int = 0
    stderr_dropped_bytes: int = 0

    @property
    def code(self) -> int:
        return self.exit_code

    @property
    def truncated(self) -> bool:
        """Whether some output is missing from ``stdout``/``stderr`` (see the dropped counts)."""
        return bool(self.stdout_dropped_bytes or self.stderr_dropped_bytes)

    @property
    def status(self) -> CommandStatus:
        return CommandStatus.FINISHED if self.exit_code == 0 else CommandStatus.FAILED

    @property
    def success(self) -> bool:
        return self.exit_code == 0


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One event of ``exec_stream``. ``type`` is ``stdout``, ``stderr``, ``exit`` or ``end``;
    ``data`` is the seed's payload (``{"data": text}`` for output, ``{"code": n}`` for exit)."""

    type: str
    data: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StdoutEvent(StreamEvent):
    @property
    def text(self) -> str:
        return str(self.data["data"])


@dataclasses.dataclass(frozen=True)
class StderrEvent(StreamEvent):
    @property
    def text(self) -> str:
        return str(self.data["data"])


@dataclasses.dataclass(frozen=True)
class ExitEvent(StreamEvent):
    @property
    def code(self) -> int:
        return int(self.data["code"])


@dataclasses.dataclass(frozen=True)
class EndEvent(StreamEvent):
    pass


EVENT_NAMES = ("stdout", "stderr", "exit", "end")


class OutputKeeper:
    """The first ``limit`` bytes of one output stream, and a count of the rest.

    What was kept grows to ``limit`` and no further whatever the command prints; the text is
    cut at a UTF-8 character boundary so it never ends in half a character, and the bytes cut
    are counted as dropped, so ``len(kept) + dropped`` is exactly what the command wrote."""

    __slots__ = ("_buf", "dropped", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self._buf = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.limit - len(self._buf)
        if len(data) <= room:
            self._buf += data
            return
        if room > 0:
            self._buf += data[:room]
        self.dropped += len(data) - max(0, room)

    def take(self) -> tuple[str, int]:
        """``(text, dropped)``; the keeper is empty afterwards."""
        buf, self._buf = self._buf, bytearray()
        dropped = self.dropped
        if dropped:
            cut = _utf8_incomplete_tail(buf)
            if cut:
                del buf[len(buf) - cut :]
                dropped += cut
        return buf.decode("utf-8", "replace"), dropped


def _utf8_incomplete_tail(buf: bytearray) -> int:
    """How many bytes at the end of ``buf`` start a UTF-8 character they do not finish."""
    for back in range(1, min(4, len(buf)) + 1):
        byte = buf[-back]
        if byte < 0x80:
            return 0
        if byte >= 0xC0:  # a lead byte: how long is its character?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if need > back else 0
    return 0


Listener = Callable[[StreamEvent], Any]


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    id: str
    pid: int | None
    status: str
    command: str
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)


@dataclasses.dataclass(frozen=True)
class FileContent:
    """``read_file``'s result: ``content`` (text, or base64 text if ``encoding == "base64"``)."""

    content: str
    encoding: str = "utf-8"

    @property
    def bytes(self) -> bytes:
        if self.encoding == "base64":
            return base64.b64decode(self.content)
        return self.content.encode("utf-8")


class CommandCancelledError(SandboxError):
    """``exec`` was cancelled through its :class:`CancelToken`; the command was killed."""


class CancelToken:
    """Python's AbortSignal: pass it as ``exec(..., cancel=token)`` and call :meth:`cancel` from
    anywhere (another thread or task) to kill the command. A token can be shared by several
    commands and stays cancelled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._callbacks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def _subscribe(self, cb: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(cb)

                def unsubscribe() -> None:
                    with self._lock:
                        if cb in self._callbacks:
                            self._callbacks.remove(cb)

                return unsubscribe
        cb()
        return lambda: None


class _Watchdog:
    """One daemon thread that runs callbacks at deadlines. (A ``threading.Timer`` per command
    costs a thread start, ~0.1 ms, on every exec; scheduling here costs ~2 us.)"""

    def __init__(self) -> None:
        self._seq = itertools.count()
        self._cond = threading.Condition()
        #: [deadline, seq, callback or None once cancelled]
        self._heap: list[list[Any]] = []
        self._thread: threading.Thread | None = None

    def schedule(self, delay: float, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` in ``delay`` seconds; returns a function that cancels it."""
        entry: list[Any] = [time.monotonic() + delay, next(self._seq), callback]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="sandlot-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()

        def cancel() -> None:
            entry[2] = None

        return cancel

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2] is None:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        callback = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(wait)
            if callback is not None:
                with contextlib.suppress(Exception):  # must not kill the thread
                    callback()


_watchdog = _Watchdog()


class StreamGuard:
    """Ends a streaming response early -- on a deadline or a cancel token -- by shutting its
    socket down, which wakes a blocked read in any thread or event loop. The reader then sees
    the stream end and asks :attr:`reason` why."""

    def __init__(self, response: httpx.Response, timeout: float | None, cancel: CancelToken | None):
        self.reason: str | None = None
        self._response = response
        self._lock = threading.Lock()
        self._cancel_timer: Callable[[], None] = lambda: None
        self._unsubscribe: Callable[[], None] = lambda: None
        if timeout is not None and timeout > 0:
            self._cancel_timer = _watchdog.schedule(timeout, lambda: self._fire("timeout"))
        if cancel is not None:
            self._unsubscribe = cancel._subscribe(lambda: self._fire("cancelled"))

    def _fire(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
        stream = self._response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        # a socket.socket, or asyncio's TransportSocket wrapper: both can shut down
        shutdown = getattr(sock, "shutdown", None)
        if shutdown is not None:
            with contextlib.suppress(OSError):
                shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = "done"
        self._cancel_timer()
        self._unsubscribe()


# -- sync/async primitives (unasync maps async_* to sync_*) ------------------------------------


async def async_sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


def sync_sleep(seconds: float) -> None:
    time.sleep(seconds)


async def async_run_blocking(fn: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(lambda: fn(*args))


def sync_run_blocking(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


def async_uds_transport(path: str) -> httpx.AsyncBaseTransport:
    """The async SDK's transport to the local server (see :mod:`sandlot.sdk._uds`)."""
    from sandlot.sdk._uds import AsyncUnixTransport

    return AsyncUnixTransport(path)


def sync_uds_transport(path: str) -> httpx.BaseTransport:
    from sandlot.sdk._uds import UnixTransport

    return UnixTransport(path, shared_ssl_context())


def monotonic() -> float:
    return time.monotonic()


# -- configuration ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where the server is and how to authenticate to it."""

    #: ``http(s)://host:port`` for TCP, or None for a Unix socket.
    base_url: str
    unix_path: str | None
    api_token: str | None
    #: True when this is the default local server, which the SDK starts if needed.
    autostart: bool

    @property
    def description(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else self.base_url


def resolve_connection(api_url: str | None, api_token: str | None) -> Connection:
    """Arguments win over ``SANDLOT_URL`` / ``SANDLOT_API_TOKEN``; with neither, the default
    local server on its Unix socket."""
    url = api_url or os.environ.get("SANDLOT_URL") or None
    token = api_token or os.environ.get("SANDLOT_API_TOKEN") or None
    if url is None:
        return Connection("http://sandlot", str(default_server_socket()), token, autostart=True)
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"invalid api_url {url!r}: expected unix:/path/to/sandlot.sock")
        return Connection("http://sandlot", path, token, autostart=False)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"invalid api_url {url!r}: expected http(s)://host:port or unix:/path/to.sock"
        )
    if token is None:
        raise MissingApiTokenError(
            f"the sandlot server at {url} needs an API token: pass api_token= or set "
            "SANDLOT_API_TOKEN (create one with `sandlot token create` on the server)"
        )
    return Connection(url.rstrip("/"), None, token, autostart=False)


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context per process. Building one loads the CA bundle (~20 ms here), and each
    httpx transport would otherwise build its own: that was most of a warm-pool create."""
    return ssl.create_default_context()


def client_kwargs(conn: Connection) -> dict[str, Any]:
    """Keyword arguments for httpx.Client / httpx.AsyncClient (the transport is added by the
    caller, which knows which of the two it builds). No default Authorization header: the API
    token goes only on control requests (:func:`control_headers`), never to a sandbox."""
    headers = {"user-agent": "sandlot-python"}
    return {
        "base_url": conn.base_url,
        "headers": headers,
        "timeout": httpx.Timeout(60.0, connect=10.0),
    }


def control_headers(conn: Connection, headers: dict[str, str] | None) -> dict[str, str]:
    """Headers of a request to the control API: the API token unless the caller set one."""
    merged = dict(headers or {})
    if conn.api_token and "authorization" not in merged:
        merged["authorization"] = f"Bearer {conn.api_token}"
    return merged


_server_lock = threading.Lock()


def ensure_local_server(path: str) -> None:
    """Start the local server on ``path`` in the background unless something answers there.

    The server runs detached in its own session (it outlives this process, like a user
    daemon) and logs to ``sandlot-server.log`` next to its socket. A lock file keeps two
    processes from starting two servers at once. The socket's directory must be ours and
    private (:func:`sandlot.local_trust.private_dir`): it is checked before anything in it is
    opened or connected to.
    """
    import fcntl
    import subprocess
    import sys

    if path in _checked and _socket_answers(path):
        return
    with _server_lock:
        try:
            directory = private_dir(Path(path).parent)
        except (LocalTrustError, OSError) as exc:
            raise SandboxServiceError(f"cannot use the local sandlot server: {exc}") from None
        lock_fd = open_private_file(directory / "autostart.lock")
        with os.fdopen(lock_fd, "r+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path not in _checked:
                _checked.add(path)
                _stop_if_outdated(path)
            if _socket_answers(path):
                return
            log_path = directory / "sandlot-server.log"
            log_fd = open_private_file(log_path, os.O_WRONLY | os.O_APPEND)
            with os.fdopen(log_fd, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "sandlot.cli", "server", "--listen", f"unix:{path}"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    close_fds=True,
                )
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while time.monotonic() < deadline:
                if _socket_answers(path):
                    return
                if proc.poll() is not None:
                    raise SandboxServiceError(
                        f"the local sandlot server exited at start (code {proc.returncode}); "
                        f"its log {log_path} ends with:\n{_tail(str(log_path))}"
                    )
                time.sleep(0.02)
            raise SandboxTimeoutError(
                f"the local sandlot server did not start within {SERVER_START_TIMEOUT:g}s; "
                f"see {log_path}"
            )


#: Socket paths whose server's build this process has compared with its own.
_checked: set[str] = set()


def _stop_if_outdated(path: str) -> None:
    """Stop the server on ``path`` if it is this installation of sandlot but an older build
    (upgraded or edited since it started); :func:`ensure_local_server` then starts the new one.
    Its sandboxes live on: a server recovers them at start. A server of another installation
    (another virtualenv sharing the default socket) is left alone, or two projects would stop
    each other's servers in turn. The pid its health names is signalled only if it is the
    process behind the socket (:func:`sandlot.local_trust.signal_server`)."""
    import signal

    from sandlot._build import PACKAGE_DIR, build_id

    health = _local_health(path)
    if health is None:
        return
    if health.get("package") != str(PACKAGE_DIR) or health.get("build") in (None, build_id()):
        return
    pid = health.get("pid")
    if not isinstance(pid, int) or pid <= 1:
        return
    if not signal_server(path, pid, signal.SIGTERM):
        log.warning("the local sandlot server on %s runs an older build; not ours to stop", path)
        return
    log.warning(
        "the local sandlot server (pid %d) runs an older build of this installation: restarting it",
        pid,
    )
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while _socket_answers(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _local_health(path: str) -> dict[str, Any] | None:
    """``GET /v1/health`` on the Unix socket; None if nothing sensible (or trusted) answers."""
    try:
        with httpx.Client(transport=sync_uds_transport(path), timeout=5.0) as client:
            response = client.get("http://sandlot/v1/health")
        answer = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


async def async_ensure_local_server(path: str) -> None:
    await anyio.to_thread.run_sync(ensure_local_server, path)


def sync_ensure_local_server(path: str) -> None:
    ensure_local_server(path)


def _socket_answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- errors -------------------------------------------------------------------------------------


def error_message(body: Any, fallback: str) -> str:
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
    if isinstance(body, str) and body.strip():
        return body.strip()
    return fallback


def raise_for_status(response: httpx.Response, what: str) -> None:
    """Map an HTTP error answer to the SDK's exceptions. ``response`` must have been read."""
    status = response.status_code
    if status < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    message = f"{what}: {error_message(body, f'HTTP {status}')}"
    code = body.get("code") if isinstance(body, dict) else None
    if status == 404 and code == "not_found":
        raise SandboxNotFoundError(message, status, body)
    if status == 501 or code == "unsupported":
        raise UnsupportedFeatureError(message)
    if status == 504 or code == "timeout":
        raise SandboxTimeoutError(message)
    if 400 <= status < 500:
        raise SandboxRequestError(message, status, body)
    raise SandboxServiceError(message, status, body)


def transport_error(exc: Exception, conn: Connection, what: str) -> SandboxError:
    if isinstance(exc, httpx.TimeoutException):
        return SandboxTimeoutError(f"{what}: timed out talking to {conn.description}")
    return SandboxServiceError(
        f"{what}: cannot reach the sandlot server at {conn.description}: "
        f"{exc or type(exc).__name__}"
    )


class LineSplitter:
    """Bytes of a server-sent-event stream to lines, none longer than ``limit``.

    httpx's own line iterator holds a line however long it grows; an agent is inside the
    sandbox, so its answers are hostile input and a line without end must not become a
    client without memory."""

    __slots__ = ("_pending", "limit")

    def __init__(self, limit: int = MAX_EVENT_LINE) -> None:
        self.limit = limit
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[str]:
        self._pending += data
        if b"\n" not in data:
            self._check(len(self._pending))
            return []
        *lines, rest = self._pending.split(b"\n")
        self._pending = rest
        self._check(max(len(rest), *(len(line) for line in lines)))
        return [line.rstrip(b"\r").decode("utf-8", "replace") for line in lines]

    def _check(self, length: int) -> None:
        if length > self.limit:
            raise SandboxServiceError(
                f"the sandbox's agent sent an event longer than {self.limit} bytes; "
                "it is broken or not sandlot's agent"
            )


def parse_sse_line(line: str) -> tuple[str | None, str | None]:
    """``event: x`` → ("event", x); ``data: y`` → ("data", y); other lines → (None, None)."""
    if line.startswith("event:"):
        return "event", line[6:].strip()
    if line.startswith("data:"):
        value = line[5:]
        return "data", value[1:] if value.startswith(" ") else value
    return None, None


def check_port(port: Any) -> int:
    from sandlot.sdk.errors import InvalidPortError

    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidPortError(f"port must be an int between 1 and 65535, not {port!r}")
    return port
