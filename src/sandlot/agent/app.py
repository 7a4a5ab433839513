"""The agent's HTTP API: one routing table, one handler per route.

Koyeb's executor routes keep Koyeb's request and response fields (see
``docs/agent.md`` for the few deliberate differences); sandlot's extensions only add optional
request fields, response fields and routes.
"""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sandlot.agent import commands, files, main_process
from sandlot.agent.auth import Authenticator
from sandlot.agent.chunks import Utf8Splitter, chunk_fields
from sandlot.agent.commands import SpawnError, exit_code, parse_command_request, pump, spawn
from sandlot.agent.http11 import ClientGone, HTTPError, Reply, Request
from sandlot.agent.journal import Journal, OrphanedProcess
from sandlot.agent.processes import DEFAULT_KILL_GRACE, ManagedProcess, ProcessManager

# Annotations only: importing typing at run time costs the agent milliseconds of start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_MAX_BODY = 64 * 1024 * 1024
#: ``/run`` keeps at most this much of each stream in memory; the rest is read and dropped.
RUN_OUTPUT_LIMIT = 64 * 1024 * 1024
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: Exit code reported for a command killed by its ``timeout`` (as coreutils' ``timeout``).
TIMEOUT_EXIT_CODE = 124
PUBLIC_PATHS = frozenset({"/health", "/openapi.json"})

Handler = Callable[[Request], "Reply | None"]


def _json_reply(obj: Any, status: int = 200) -> Reply:
    return Reply(status, obj)


def _opt_bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HTTPError(400, f"'{key}' must be a boolean")
    return value


def _query_bool(req: Request, key: str, default: bool) -> bool:
    value = req.query.get(key)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", ""):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise HTTPError(400, f"query parameter '{key}' must be true or false")


def _opt_number(body: dict[str, Any], key: str, *, maximum: float = 7 * 86400) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HTTPError(400, f"'{key}' must be a number of seconds")
    if not 0 < value <= maximum:
        raise HTTPError(400, f"'{key}' must be > 0 and <= {maximum:g}")
    return float(value)


def _parse_mode(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise HTTPError(400, "'mode' must be an octal string such as \"0644\"") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise HTTPError(400, "'mode' must be a permission mode between 0 and 07777")
    return value


def _parse_signal(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value in {s.value for s in signal.Signals}:
            return value
    elif isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            pass
    raise HTTPError(400, f"unknown signal: {value!r}")


def _parse_port(value: Any, field: str = "port") -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip().isdigit():
        raise HTTPError(400, f"'{field}' must be a port number (1-65535)", success=False)
    port = int(value)
    if not 1 <= port <= 65535:
        raise HTTPError(400, f"'{field}' must be between 1 and 65535", success=False)
    return str(port)


def _process_id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise HTTPError(400, "'id' (the process id) is required", success=False)
    return value


def _byte_range(header: str | None, size: int) -> tuple[int, int]:
    """The first and last byte of a single ``Range: bytes=...`` (the whole file without one);
    416 when it cannot be satisfied. Several ranges are not supported (the whole file)."""
    if not header:
        return 0, size - 1
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return 0, size - 1
    start, dash, end = spec.strip().partition("-")
    try:
        if not dash or not (start or end):
            raise ValueError
        if not start:  # the last N bytes
            first, last = max(0, size - int(end)), size - 1
        else:
            first = int(start)
            last = min(int(end), size - 1) if end else size - 1
    except ValueError:
        raise HTTPError(416, f"bad Range header: {header}") from None
    if first < 0 or first > last or first >= size:
        raise HTTPError(416, f"range not satisfiable: {header} (size {size})")
    return first, last


def _input(body: dict[str, Any]) -> bytes | None:
    """``input`` (text, or base64 with ``input_encoding: "base64"``): the command's stdin."""
    if body.get("input") is None:
        if body.get("input_encoding") is not None:
            raise HTTPError(400, "'input_encoding' without 'input'")
        return None
    return _decode_content(
        {"content": body["input"], "encoding": body.get("input_encoding")}, field="input"
    )


def _decode_content(body: dict[str, Any], field: str = "content") -> bytes:
    content = body.get("content")
    if not isinstance(content, str):
        raise HTTPError(400, f"'{field}' is required and must be a string", success=False)
    encoding = body.get("encoding")
    if encoding is None or encoding in ("utf-8", "utf8", "text"):
        try:
            return content.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPError(400, f"'{field}' is not valid Unicode text", success=False) from None
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except ValueError:
            raise HTTPError(400, f"'{field}' is not valid base64", success=False) from None
    raise HTTPError(400, '\'encoding\' must be "utf-8" or "base64"', success=False)


class App:
    def __init__(self, auth: Authenticator, *, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.auth = auth
        self.max_body = max_body
        self.cwd = os.getcwd()
        self.base_env = commands.base_environment()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        #: Process groups the agent started and that are still alive (killed on shutdown).
        self.live_groups: set[int] = set()
        self.processes = ProcessManager(
            self.base_env, self.live_groups, self._lock, Journal.from_env(os.environ)
        )
        #: The sandbox's main process (entrypoint/command/args), if it has one.
        self.main_process = main_process.supervise(
            os.environ, self.processes, self.cwd, self.stopping
        )
        self.ports: list[str] = []

        # The whole API at a glance: path -> method -> handler.
        self.routes: dict[str, dict[str, Handler]] = {
            "/health": {"GET": self.health},
            "/openapi.json": {"GET": self.openapi},
            # Koyeb executor protocol
            "/run": {"POST": self.run},
            "/run_streaming": {"POST": self.run_streaming},
            "/write_file": {"POST": self.write_file},
            "/read_file": {"POST": self.read_file},
            "/delete_file": {"POST": self.delete_file},
            "/make_dir": {"POST": self.make_dir},
            "/delete_dir": {"POST": self.delete_dir},
            "/list_dir": {"POST": self.list_dir},
            "/bind_port": {"POST": self.bind_port},
            "/unbind_port": {"POST": self.unbind_port},
            "/start_process": {"POST": self.start_process},
            "/list_processes": {"GET": self.list_processes},
            "/kill_process": {"POST": self.kill_process},
            "/process_logs_streaming": {
                "GET": self.process_logs_streaming,
                "POST": self.process_logs_streaming,
            },
            # sandlot extensions
            "/stat": {"POST": self.stat},
            "/configure": {"POST": self.configure},
            "/files": {"GET": self.download, "PUT": self.upload},
            "/bound_ports": {"GET": self.bound_ports},
            "/process": {"GET": self.process_info},
            "/wait_process": {"POST": self.wait_process},
            "/write_stdin": {"POST": self.write_stdin},
            "/pty": {"GET": self.pty},
            "/tunnel": {"GET": self.tunnel},
        }

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self, req: Request) -> Reply | None:
        if req.path not in PUBLIC_PATHS and not self.auth.check(req.headers.get("authorization")):
            return Reply(
                401,
                data=b"Unauthorized\n",
                content_type="text/plain; charset=utf-8",
                headers={"WWW-Authenticate": "Bearer"},
            )
        methods = self.routes.get(req.path)
        if methods is None:
            raise HTTPError(404, f"no such route: {req.path}")
        handler = methods.get(req.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            return Reply(
                405,
                {"error": f"method {req.method} not allowed on {req.path} (allowed: {allowed})"},
                headers={"Allow": allowed},
            )
        return handler(req)

    def body(self, req: Request) -> dict[str, Any]:
        return req.json(self.max_body)

    @contextmanager
    def _tracked(self, proc: subprocess.Popen[bytes]) -> Iterator[None]:
        with self._lock:
            self.live_groups.add(proc.pid)
        try:
            yield
        finally:
            with self._lock:
                self.live_groups.discard(proc.pid)

    def shutdown(self, grace: float = 1.0) -> None:
        """Stop every command, process and terminal the agent started (TERM, then KILL)."""
        self.stopping.set()
        with self._lock:
            groups = list(self.live_groups)
        for pgid in groups:
            commands.kill_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes.running():
            proc.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            groups = list(self.live_groups) + groups
        for pgid in set(groups):
            commands.kill_group(pgid, signal.SIGKILL)

    # -- health, spec -------------------------------------------------------------------------

    def health(self, req: Request) -> Reply:
        return _json_reply({"status": "ok"})

    def openapi(self, req: Request) -> Reply:
        path = os.path.join(os.path.dirname(__file__), "openapi.json")
        try:
            with open(path, "rb") as f:
                return Reply(200, data=f.read())
        except OSError:
            raise HTTPError(404, "openapi.json is not shipped with this agent") from None

    # -- commands -----------------------------------------------------------------------------

    def run(self, req: Request) -> Reply:
        body = self.body(req)
        timeout = _opt_number(body, "timeout")
        cmd, cwd, env = parse_command_request(body, default_cwd=self.cwd)
        data = _input(body)
        try:
            proc = spawn(cmd, cwd, env, base_env=self.base_env, stdin=data is not None)
        except SpawnError as exc:
            raise HTTPError(500, str(exc)) from None
        if data is not None:
            commands.feed_stdin(proc, data)
        out = {"stdout": bytearray(), "stderr": bytearray()}
        truncated: set[str] = set()

        def sink(stream: str, data: bytes) -> None:
            buf = out[stream]
            room = RUN_OUTPUT_LIMIT - len(buf)
            if room < len(data):
                truncated.add(stream)
                data = data[: max(0, room)]
            buf += data

        with self._tracked(proc):
            result = pump(
                proc,
                sink,
                timeout=timeout,
                peer_fd=req.conn.sock.fileno(),
                peer_gone=req.conn.peer_gone,
                stop=self.stopping,
            )
        if result.client_gone:
            raise ClientGone("client disconnected during /run")
        assert proc.returncode is not None
        code = exit_code(proc.returncode)
        resp: dict[str, Any] = {}
        for stream, raw in out.items():
            try:
                resp[stream] = raw.decode("utf-8")
            except UnicodeDecodeError:
                # Koyeb's field stays text; the exact bytes ride along in an extra field.
                resp[stream] = raw.decode("utf-8", "replace")
                resp[f"{stream}_base64"] = base64.b64encode(raw).decode("ascii")
        if result.timed_out:
            code = TIMEOUT_EXIT_CODE
            resp["error"] = f"Command timed out after {timeout:g}s and was killed"
            resp["timed_out"] = True
        elif code != 0:
            resp["error"] = "Non-zero exit code"
        resp["code"] = code
        if truncated:
            resp["truncated"] = sorted(truncated)
        return _json_reply(resp)

    def run_streaming(self, req: Request) -> None:
        body = self.body(req)
        timeout = _opt_number(body, "timeout")
        cmd, cwd, env = parse_command_request(body, default_cwd=self.cwd)
        data = _input(body)
        writer = req.start_stream(200, "text/event-stream", SSE_HEADERS)
        try:
            proc = spawn(cmd, cwd, env, base_env=self.base_env, stdin=data is not None)
        except SpawnError as exc:
            writer.event("error", {"error": str(exc)})
            writer.close()
            return
        if data is not None:
            commands.feed_stdin(proc, data)
        splitters = {"stdout": Utf8Splitter(), "stderr": Utf8Splitter()}

        def sink(stream: str, data: bytes) -> None:
            for chunk in splitters[stream].feed(data):
                writer.event("output", {"stream": stream, **chunk_fields(chunk)})

        with self._tracked(proc):
            result = pump(
                proc,
                sink,
                timeout=timeout,
                peer_fd=req.conn.sock.fileno(),
                peer_gone=req.conn.peer_gone,
                idle=lambda: writer.comment("keepalive"),
                stop=self.stopping,
            )
        if result.client_gone:
            raise ClientGone("client disconnected during /run_streaming")
        for stream, splitter in splitters.items():
            for chunk in splitter.flush():
                writer.event("output", {"stream": stream, **chunk_fields(chunk)})
        assert proc.returncode is not None
        code = exit_code(proc.returncode)
        complete: dict[str, Any] = {"code": code, "error": code != 0}
        if result.timed_out:
            complete.update(
                code=TIMEOUT_EXIT_CODE,
                error=True,
                timed_out=True,
                message=f"Command timed out after {timeout:g}s and was killed",
            )
        writer.event("complete", complete)
        writer.close()

    # -- files --------------------------------------------------------------------------------

    def write_file(self, req: Request) -> Reply:
        body = self.body(req)
        path = files.check_path(body.get("path"))
        data = _decode_content(body)
        mode = _parse_mode(body.get("mode"))
        create_parents = _opt_bool(body, "create_parents")
        try:
            files.atomic_write(path, [data], mode=mode, create_parents=create_parents)
        except OSError as exc:
            raise files.os_error(exc, path, success=False) from None
        except HTTPError as err:
            err.extra.setdefault("success", False)
            raise
        return _json_reply({"success": True})

    def read_file(self, req: Request) -> Reply:
        body = self.body(req)
        path = files.check_path(body.get("path"))
        encoding = body.get("encoding")
        if encoding not in (None, "utf-8", "utf8", "text", "base64"):
            raise HTTPError(400, '\'encoding\' must be "utf-8" or "base64"')
        fd, _ = files.open_for_read(path)
        try:
            data = files.read_all(fd, self.max_body, path)
        except OSError as exc:
            raise files.os_error(exc, path) from None
        finally:
            os.close(fd)
        if encoding == "base64":
            return _json_reply(
                {"content": base64.b64encode(data).decode("ascii"), "encoding": "base64"}
            )
        try:
            return _json_reply({"content": data.decode("utf-8")})
        except UnicodeDecodeError:
            # Koyeb's shape is text; say it was not exact and how to get the bytes.
            return _json_reply(
                {
                    "content": data.decode("utf-8", "replace"),
                    "lossy": True,
                    "warning": 'file is not valid UTF-8; use encoding "base64" for its bytes',
                }
            )

    def delete_file(self, req: Request) -> Reply:
        path = files.check_path(self.body(req).get("path"))
        self._fs(files.delete_file, path)
        return _json_reply({"success": True})

    def make_dir(self, req: Request) -> Reply:
        path = files.check_path(self.body(req).get("path"))
        self._fs(files.make_dir, path)
        return _json_reply({"success": True})

    def delete_dir(self, req: Request) -> Reply:
        path = files.check_path(self.body(req).get("path"))
        self._fs(files.delete_dir, path)
        return _json_reply({"success": True})

    @staticmethod
    def _fs(op: Callable[[str], None], path: str) -> None:
        try:
            op(path)
        except HTTPError as err:
            err.extra.setdefault("success", False)
            raise

    def list_dir(self, req: Request) -> Reply:
        body = self.body(req)
        path = files.check_path(body.get("path"))
        return _json_reply(files.list_dir(path, _opt_bool(body, "details")))

    def stat(self, req: Request) -> Reply:
        body = self.body(req)
        path = files.check_path(body.get("path"))
        return _json_reply(files.stat_path(path, _opt_bool(body, "follow_symlinks", True)))

    def upload(self, req: Request) -> Reply:
        path = files.check_path(req.query.get("path"), "path (query parameter)")
        mode = _parse_mode(req.query.get("mode"))
        create_parents = _query_bool(req, "create_parents", False)
        if req.declared_length is None and "transfer-encoding" not in req.headers:
            raise HTTPError(411, "Content-Length or chunked Transfer-Encoding required")
        try:
            size = files.atomic_write(
                path, req.iter_body(), mode=mode, create_parents=create_parents
            )
        except OSError as exc:
            req.keep_alive = False  # the rest of the body was not read
            raise files.os_error(exc, path, success=False) from None
        except HTTPError as err:
            req.keep_alive = False
            err.extra.setdefault("success", False)
            raise
        return _json_reply({"success": True, "path": path, "size": size})

    def download(self, req: Request) -> None:
        path = files.check_path(req.query.get("path"), "path (query parameter)")
        fd, size = files.open_for_read(path)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise HTTPError(400, f"Not a regular file: {path}")
            if size == 0:
                # procfs and sysfs files say 0 bytes and have content: stream until EOF.
                writer = req.start_stream(200, "application/octet-stream")
                while data := f.read(65536):
                    writer.write(data)
                writer.close()
                return
            first, last = _byte_range(req.headers.get("range"), size)
            length = last - first + 1
            if length == size:
                req.start_fixed(200, size, "application/octet-stream", {"Accept-Ranges": "bytes"})
            else:
                req.start_fixed(
                    206,
                    length,
                    "application/octet-stream",
                    {"Content-Range": f"bytes {first}-{last}/{size}", "Accept-Ranges": "bytes"},
                )
            try:
                sent = req.conn.sock.sendfile(f, first, length)
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            if sent != length:  # the file shrank while we sent it: the length we promised is wrong
                req.keep_alive = False

    # -- ports --------------------------------------------------------------------------------

    def bind_port(self, req: Request) -> Reply:
        body = self.body(req)
        if body.get("port") in (None, ""):
            raise HTTPError(400, "Port is required", success=False)
        port = _parse_port(body.get("port"))
        multi = _opt_bool(body, "multi")
        with self._lock:
            if self.ports and not multi:
                current = self.ports[0]
                return _json_reply(
                    {"success": False, "error": "Port already bound", "current_port": current},
                    409,
                )
            if port not in self.ports:
                self.ports.append(port)
            ports = list(self.ports)
        return _json_reply(
            {"success": True, "message": "Port binding configured", "port": port, "ports": ports}
        )

    def unbind_port(self, req: Request) -> Reply:
        body = self.body(req)
        raw = body.get("port")
        with self._lock:
            if raw in (None, ""):
                self.ports.clear()
                message = "Port binding removed"
            else:
                port = _parse_port(raw)
                if port in self.ports:
                    self.ports.remove(port)
                    message = "Port binding removed"
                else:
                    message = f"Port {port} was not bound"
            ports = list(self.ports)
        return _json_reply({"success": True, "message": message, "ports": ports})

    def bound_ports(self, req: Request) -> Reply:
        with self._lock:
            return _json_reply({"ports": list(self.ports)})

    # -- terminals ----------------------------------------------------------------------------

    def pty(self, req: Request) -> None:
        from sandlot.agent.terminal import open_terminal  # termios & co. only when used

        def track(pgid: int, alive: bool) -> None:
            with self._lock:
                if alive:
                    self.live_groups.add(pgid)
                else:
                    self.live_groups.discard(pgid)

        open_terminal(req, default_cwd=self.cwd, base_env=self.base_env, track=track)

    def tunnel(self, req: Request) -> None:
        from sandlot.agent.tunnel import open_tunnel

        open_tunnel(req)

    # -- processes ----------------------------------------------------------------------------

    def _get_process(self, process_id: str) -> ManagedProcess | OrphanedProcess:
        proc = self.processes.get(process_id)
        if proc is None:
            raise HTTPError(404, f"process not found: {process_id}", success=False)
        return proc

    def start_process(self, req: Request) -> Reply:
        body = self.body(req)
        cmd, cwd, env = parse_command_request(body, default_cwd=self.cwd)
        stdin = _opt_bool(body, "stdin")
        timeout = _opt_number(body, "timeout")
        try:
            proc = self.processes.start(cmd, cwd, env, stdin=stdin, timeout=timeout)
        except SpawnError as exc:
            raise HTTPError(500, f"Failed to start process: {exc}") from None
        return _json_reply({"id": proc.id, "pid": proc.pid, "status": "running"}, 201)

    def configure(self, req: Request) -> Reply:
        """Set environment variables for every later command, process and terminal (a warm-pool
        sandbox gets its owner's ``env`` this way when it is claimed)."""
        env = self.body(req).get("env")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise HTTPError(400, "'env' must be an object of string values", success=False)
        bad = sorted(k for k in env if not k or "=" in k or "\0" in k or k in commands.HIDDEN_ENV)
        if bad:
            raise HTTPError(400, f"invalid or reserved variable names: {bad}", success=False)
        with self._lock:
            self.base_env.update(env)
        return _json_reply({"success": True, "env": sorted(env)})

    def list_processes(self, req: Request) -> Reply:
        return _json_reply({"processes": [p.summary() for p in self.processes.all()]})

    def process_info(self, req: Request) -> Reply:
        return _json_reply(self._get_process(_process_id(req.query.get("id"))).details())

    def kill_process(self, req: Request) -> Reply:
        body = self.body(req)
        process_id = _process_id(body.get("id"))
        proc = self.processes.get(process_id)
        if proc is None:
            # Koyeb answers 400 (not 404) here; its SDK reads the body either way.
            raise HTTPError(400, f"process not found: {process_id}", success=False)
        if "signal" in body:
            sig = _parse_signal(body["signal"])
            grace = _opt_number(body, "grace", maximum=3600)
        else:
            sig = signal.SIGTERM
            grace = _opt_number(body, "grace", maximum=3600) or DEFAULT_KILL_GRACE
        if proc.done.is_set():
            raise HTTPError(400, f"process is not running (status: {proc.status})", success=False)
        proc.kill(sig, grace)
        return _json_reply(
            {"success": True, "message": "Process killed successfully", "status": proc.status}
        )

    def wait_process(self, req: Request) -> Reply:
        body = self.body(req)
        process_id = _process_id(body.get("id"))
        timeout = _opt_number(body, "timeout", maximum=86400)
        proc = self._get_process(process_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not proc.done.is_set():
            step = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if step <= 0:
                break
            if proc.wait(step):
                break
            if req.conn.peer_gone():
                raise ClientGone("client disconnected during /wait_process")
        return _json_reply({**proc.details(), "wait_timed_out": not proc.done.is_set()})

    def write_stdin(self, req: Request) -> Reply:
        body = self.body(req)
        proc = self._get_process(_process_id(body.get("id")))
        data = b""
        if body.get("data") is not None or body.get("content") is not None:
            data = _decode_content({**body, "content": body.get("data", body.get("content"))})
        eof = _opt_bool(body, "eof")
        try:
            proc.write_stdin(data, eof)
        except ValueError as exc:
            raise HTTPError(409, str(exc), success=False) from None
        return _json_reply({"success": True, "written": len(data)})

    def process_logs_streaming(self, req: Request) -> None:
        raw_id = self.body(req).get("id") if req.method == "POST" else req.query.get("id")
        if not isinstance(raw_id, str) or not raw_id:
            raise HTTPError(400, "Process ID is required")
        proc = self._get_process(raw_id)
        if isinstance(proc, OrphanedProcess):
            raise HTTPError(410, proc.gone_message())
        follow = _query_bool(req, "follow", True)
        writer = req.start_stream(200, "text/event-stream", SSE_HEADERS)
        seq = 0
        last_sent = time.monotonic()
        while True:
            entries, seq, closed = proc.logs.read_from(seq, 1.0 if follow else None)
            for entry in entries:
                writer.event("log", entry.event())
            if entries:
                last_sent = time.monotonic()
            if closed or not follow:
                break
            if req.conn.peer_gone():
                raise ClientGone("client disconnected during log streaming")
            if time.monotonic() - last_sent > 15:
                writer.comment("keepalive")
                last_sent = time.monotonic()
        writer.event(
            "complete",
            {
                "message": "stream ended",
                "status": proc.status,
                "exit_code": proc.summary()["exit_code"],
            },
        )
        writer.close()
