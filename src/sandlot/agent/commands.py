"""Starting shell commands and moving their output, for ``/run``, ``/run_streaming`` and
background processes.

Every command is ``sh -c <cmd>`` in a new session (hence a new process group whose id is the
shell's pid), so that one ``killpg`` reaches everything it started. Output is read from both
pipes by one thread with ``poll``: chunks are handed on in the order they become readable,
which is the order the process wrote them as far as two pipes can tell.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping

from sandlot.agent.http11 import HTTPError

# Annotations only: importing typing at run time costs the agent milliseconds of start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Variables of the agent's own environment that commands never see.
HIDDEN_ENV = frozenset(
    {
        "SANDBOX_SECRET",
        "SANDBOX_SECRET_FILE",
        "SANDBOX_SECRET_PATH",
        "SANDBOX_AUTH_MODE",
        "SANDLOT_ENV_FILE",
        "SANDLOT_PROCESS_JOURNAL",
        "SANDLOT_MAIN_COMMAND_FILE",
    }
)
#: Commands run in their command environment when it comes from this file (JSON object of
#: strings): the engine's way, so that no variable meant for commands (an image's
#: LD_PRELOAD, say) reaches the agent's own loader. Without it, commands inherit the agent's.
ENV_FILE_VARIABLE = "SANDLOT_ENV_FILE"
READ_SIZE = 65536
#: After the shell exits, keep reading its pipes while data still flows (a background child
#: may hold them open forever), for at most this long, and stop after this much silence.
DRAIN_MAX = 2.0
DRAIN_IDLE = 0.1


class SpawnError(Exception):
    """The command could not be started (no ``sh``, resource limits, ...)."""


def base_environment() -> dict[str, str]:
    """The environment every command starts from. Raises ValueError for a bad env file."""
    path = os.environ.get(ENV_FILE_VARIABLE)
    if not path:
        return {k: v for k, v in os.environ.items() if k not in HIDDEN_ENV}
    import json

    try:
        with open(path, "rb") as f:
            loaded = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the environment file {path}: {exc}") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k for k, v in loaded.items()
    ):
        raise ValueError(f"the environment file {path} is not an object of strings")
    return {k: v for k, v in loaded.items() if k not in HIDDEN_ENV}


def _encodable(value: str) -> bool:
    try:
        os.fsencode(value)
    except UnicodeEncodeError:  # a lone surrogate from JSON such as "\\ud800"
        return False
    return True


def parse_command_request(
    body: Mapping[str, Any], *, default_cwd: str
) -> tuple[str, str, dict[str, str] | None]:
    """Validate ``cmd``, ``cwd`` and ``env`` of a request; 400 with a clear message otherwise."""
    cmd = body.get("cmd")
    if not isinstance(cmd, str):
        raise HTTPError(400, "'cmd' is required and must be a string")
    if not cmd.strip():
        raise HTTPError(400, "'cmd' must not be empty")
    if "\x00" in cmd:
        raise HTTPError(400, "'cmd' must not contain NUL characters")
    if not _encodable(cmd):
        raise HTTPError(400, "'cmd' is not valid Unicode text")
    cwd = body.get("cwd")
    if cwd is None or cwd == "":
        cwd = default_cwd
    elif not isinstance(cwd, str):
        raise HTTPError(400, "'cwd' must be a string")
    if "\x00" in cwd or not _encodable(cwd) or not os.path.isdir(cwd):
        raise HTTPError(400, f"Invalid working directory: {cwd}")
    env = body.get("env")
    if env is not None:
        if not isinstance(env, dict):
            raise HTTPError(400, "'env' must be an object of strings")
        for k, v in env.items():
            if not isinstance(v, str):
                raise HTTPError(400, f"'env' value for {k!r} must be a string")
            if not k or "=" in k or "\x00" in k or "\x00" in v or not _encodable(k + v):
                raise HTTPError(400, f"invalid environment variable name or value: {k!r}")
    return cmd, cwd, env


def find_sh(env: Mapping[str, str] | None = None) -> str:
    """``sh`` on the command's PATH (``env``), else on the agent's own."""
    for directory in os.get_exec_path(dict(env) if env is not None else None):
        candidate = os.path.join(directory, "sh")
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise SpawnError("cannot start command: no 'sh' found on the agent's PATH")


def spawn(
    cmd: str,
    cwd: str,
    env: Mapping[str, str] | None,
    *,
    base_env: Mapping[str, str],
    stdin: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``sh -c cmd`` in a new session with piped stdout/stderr (and stdin if asked)."""
    full_env = dict(base_env)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.Popen(
            [find_sh(full_env), "-c", cmd],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=full_env,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise SpawnError(f"cannot start command: {exc.strerror or exc}") from None
    prefer_for_oom(proc.pid)
    return proc


#: The ``oom_score_adj`` of every command: the sandbox's OOM killer takes a command first.
COMMAND_OOM_SCORE_ADJ = b"1000"


def prefer_for_oom(pid: int) -> None:
    """Make a command the sandbox's OOM killer's first choice, so that a memory hog, not the
    agent (nor pid 1, whose death would end the sandbox), is what it kills. Raising one's
    ``oom_score_adj`` needs no privilege; lowering it below 0 needs CAP_SYS_RESOURCE on the
    host, which root inside never has, so a command cannot undo more than this (down to 0, the
    agent's value; see ``engines/local/oom.py``, which also lowers the agent's where the host
    allows). Written just after the command started (a subprocess pre-exec hook would rule out
    vfork, and is unsafe with the agent's threads): a child its shell forks within those
    microseconds keeps the agent's value."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "wb") as f:
            f.write(COMMAND_OOM_SCORE_ADJ)
    except OSError:
        pass  # it exited already


def feed_stdin(proc: subprocess.Popen[bytes], data: bytes) -> None:
    """Write ``data`` to the command's stdin and close it, from a thread of its own (a command
    that writes before it reads would otherwise deadlock against us)."""
    stdin = proc.stdin
    assert stdin is not None

    def feed() -> None:
        try:
            stdin.write(data)
        except (BrokenPipeError, ValueError, OSError):
            pass  # the command exited or closed its stdin without reading everything
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    threading.Thread(target=feed, daemon=True).start()


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


Sink = Callable[[str, bytes], None]


class PumpResult:
    __slots__ = ("client_gone", "timed_out")

    def __init__(self) -> None:
        self.timed_out = False
        self.client_gone = False


def pump(
    proc: subprocess.Popen[bytes],
    sink: Sink,
    *,
    timeout: float | None = None,
    peer_gone: Callable[[], bool] | None = None,
    peer_fd: int | None = None,
    idle: Callable[[], None] | None = None,
    idle_interval: float = 15.0,
    stop: threading.Event | None = None,
    drain_max: float | None = DRAIN_MAX,
    on_exit: Callable[[int], None] | None = None,
    on_timeout: Callable[[], None] | None = None,
) -> PumpResult:
    """Move output from ``proc``'s pipes to ``sink(stream, data)`` until both close.

    - ``timeout``: kill the group (SIGKILL) when it runs longer; ``result.timed_out``.
    - ``peer_fd``/``peer_gone``: the client's socket; if it closes, kill the group and stop.
    - ``idle``: called after ``idle_interval`` seconds of silence (SSE keep-alive comments).
    - ``stop``: set from elsewhere (agent shutdown) to kill and stop.
    - ``drain_max``: after the shell exits, how long to keep reading pipes that others still
      hold open (None: until they close -- background processes keep logging).
    - ``on_exit(returncode)``: called as soon as the shell has exited (and been reaped).
    - ``on_timeout()``: called just before the group is killed for its ``timeout``.
    A ``sink`` that raises (the client went away while we wrote) kills the group too; the
    exception propagates after the kill.

    The shell is always reaped before this returns.
    """
    result = PumpResult()
    assert proc.stdout is not None and proc.stderr is not None
    names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    poller = select.poll()
    for fd in names:
        poller.register(fd, select.POLLIN)
    if peer_fd is not None:
        poller.register(peer_fd, select.POLLIN)
    # A pidfd becomes readable when the shell exits: no polling of waitpid() in a loop.
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # pragma: no cover - kernels before 5.3
        pidfd = -1
    else:
        poller.register(pidfd, select.POLLIN)
    start = time.monotonic()
    deadline = start + timeout if timeout is not None else None
    last_activity = start
    exited_at: float | None = None
    killed = False
    backoff = 0.001  # without a pidfd: how long to sleep before asking waitpid() again
    try:
        while names or exited_at is None:
            now = time.monotonic()
            waits = [idle_interval - (now - last_activity)]
            if deadline is not None and not killed:
                waits.append(deadline - now)
            if exited_at is not None:
                waits.append(DRAIN_IDLE)
            if stop is not None:
                waits.append(0.25)
            if pidfd < 0 and exited_at is None:
                waits.append(backoff)
                backoff = min(backoff * 2, 0.05)
            wait_ms = max(0, int(min(waits) * 1000) + 1)
            exited_before_poll = exited_at is not None
            events = poller.poll(wait_ms)
            progressed = False  # output or end-of-file on a pipe
            for fd, ev in events:
                if fd == pidfd:
                    poller.unregister(pidfd)  # level-triggered: stop watching once it fired
                    continue
                if fd == peer_fd:
                    if peer_gone is not None and peer_gone():
                        result.client_gone = True
                    else:
                        poller.unregister(fd)  # a pipelined request: stop watching
                    continue
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    progressed = True
                    try:
                        data = os.read(fd, READ_SIZE)
                    except OSError:
                        data = b""
                    if data:
                        last_activity = time.monotonic()
                        sink(names[fd], data)
                    else:
                        poller.unregister(fd)
                        del names[fd]
            if result.client_gone or (stop is not None and stop.is_set()):
                kill_group(proc.pid)
                killed = True
                break
            now = time.monotonic()
            if deadline is not None and not killed and now >= deadline:
                result.timed_out = True
                if on_timeout is not None:
                    on_timeout()
                kill_group(proc.pid)
                killed = True
                deadline = None
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                if on_exit is not None:
                    on_exit(proc.returncode)
            if (
                drain_max is not None
                and exited_before_poll
                and exited_at is not None
                and names
                and (not progressed or now - exited_at > drain_max)
            ):
                break  # the shell is gone; whoever still holds the pipes is not waited for
            if idle is not None and now - last_activity >= idle_interval:
                last_activity = now
                idle()
    except BaseException:
        kill_group(proc.pid)
        raise
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        proc.wait()
    return result


def exit_code(returncode: int) -> int:
    """Shell convention: a death by signal N is reported as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def signal_name(returncode: int) -> str | None:
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"SIG{-returncode}"
