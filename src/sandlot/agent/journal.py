"""What background processes the agent started, kept on disk so that a restarted agent still
lists them and can kill them.

When the agent dies (``kill -9 -1``, ``pkill``), ``sandlot-init`` starts a new one within tens
of milliseconds, but the processes the old one launched with ``/start_process`` live on (they are
reparented to pid 1) and their ids would be unknown to the new agent. So each start and each
end is appended to this journal (one JSON line, one ``write`` on an ``O_APPEND`` descriptor:
~20 us), and a new agent reads it back. What it can still do with such an *orphaned* process:

- list it (``status`` ``running`` while it runs, then ``lost``: its exit status went to pid 1,
  not to us), get its details (``"orphaned": true``, ``orphaned_at``) and wait for it;
- kill it (its process group, as before), which makes it ``killed``;
- not read its output nor write its stdin: their pipes ended with the old agent (a process that
  writes to its output after that gets SIGPIPE). Those routes answer 410 and say so.

A process is recognised by its pid *and* its start time (``/proc/PID/stat`` field 22), so a
reused pid is never taken for it. The journal lives in ``/.sandlot/run`` (the sandbox's own
disk): the sandbox can write it, so it is read as hostile input (bounded, validated line by
line) -- a forged line gains nothing root in the sandbox does not have already. ``sandlot-init``
removes it when the sandbox starts: a (re)started sandbox has no process of an earlier life.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

from sandlot.agent.commands import kill_group
from sandlot.agent.logring import LogRing, iso

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Where the engine tells the agent to keep its journal (unset: no journal).
JOURNAL_VARIABLE = "SANDLOT_PROCESS_JOURNAL"
#: The journal is rewritten with only what the agent still lists once it grows past this.
JOURNAL_MAX_BYTES = 512 * 1024
#: At most this much of a journal is read back (a sandbox may have made it huge).
READ_LIMIT = 4 * JOURNAL_MAX_BYTES
COMMAND_LIMIT = 4096


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        #: Its size after the last rewrite: the next one waits until it has doubled (long
        #: commands can keep what is still listed above JOURNAL_MAX_BYTES).
        self._rewritten = 0

    @classmethod
    def from_env(cls, env: Any) -> Journal | None:
        path = env.get(JOURNAL_VARIABLE)
        return cls(path) if path else None

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(
                self.path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        # A full disk: the process runs, a restarted agent will not list it.
        with self._lock, contextlib.suppress(OSError):
            self._size += os.write(self._open(), line)

    def started(self, proc: Any) -> None:
        self._append(
            {
                "id": proc.id,
                "pid": proc.pid,
                "ticks": start_time(proc.pid),
                "command": proc.command[:COMMAND_LIMIT],
                "cwd": proc.cwd[:COMMAND_LIMIT],
                "started_at": proc.started_at,
            }
        )

    def ended(self, proc: Any) -> None:
        self._append(
            {"id": proc.id, "status": proc.status, "exit_code": proc.summary()["exit_code"]}
        )

    @property
    def too_big(self) -> bool:
        return self._size > max(JOURNAL_MAX_BYTES, 2 * self._rewritten)

    def rewrite(self, procs: list[Any]) -> None:
        """Replace the journal by the records of ``procs`` (what the agent still lists)."""
        lines = []
        for p in procs:
            if isinstance(p, OrphanedProcess):
                lines.append(p.record())
                continue
            lines.append(
                {
                    "id": p.id,
                    "pid": p.pid,
                    "ticks": start_time(p.pid),
                    "command": p.command[:COMMAND_LIMIT],
                    "cwd": p.cwd[:COMMAND_LIMIT],
                    "started_at": p.started_at,
                }
            )
            if p.done.is_set():
                lines.append(
                    {"id": p.id, "status": p.status, "exit_code": p.summary()["exit_code"]}
                )
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in lines)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with self._lock:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.rename(tmp, self.path)
            except OSError:
                return
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._size = self._rewritten = len(data)

    def load(self, orphaned_at: float) -> list[OrphanedProcess]:
        """The processes an earlier agent of this sandbox started, oldest first."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            data = os.read(fd, READ_LIMIT)
        except OSError:
            data = b""
        finally:
            os.close(fd)
        found: dict[str, OrphanedProcess] = {}
        for line in data.splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                continue
            if "pid" in record:
                proc = OrphanedProcess.from_record(record, orphaned_at)
                if proc is not None:
                    found[proc.id] = proc
            elif record["id"] in found:
                found[record["id"]].ended(record)
        return list(found.values())


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class OrphanedProcess:
    """A process started by an earlier agent: its pid and history, no pipes."""

    LOST = "lost"

    def __init__(
        self,
        process_id: str,
        pid: int,
        ticks: int | None,
        command: str,
        cwd: str,
        started_at: float,
        orphaned_at: float,
    ) -> None:
        self.id = process_id
        self.pid = pid
        self.ticks = ticks
        self.command = command
        self.cwd = cwd
        self.started_at = started_at
        self.orphaned_at = orphaned_at
        self.ended_at: float | None = None
        self._status = "running"
        self._exit_code: int | None = None
        self.kill_requested = False
        self.done = threading.Event()
        self._lock = threading.Lock()
        self.logs = LogRing()
        self.logs.close()
        self.poll()

    @classmethod
    def from_record(cls, record: dict[str, Any], orphaned_at: float) -> OrphanedProcess | None:
        pid, ticks, started = record.get("pid"), record.get("ticks"), record.get("started_at")
        command, cwd = record.get("command"), record.get("cwd")
        if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 1):
            return None
        if ticks is not None and not (isinstance(ticks, int) and not isinstance(ticks, bool)):
            return None
        if not isinstance(command, str) or not isinstance(cwd, str):
            return None
        started_at = _number(started)
        if started_at is None:
            return None
        return cls(record["id"], pid, ticks, command, cwd, started_at, orphaned_at)

    def ended(self, record: dict[str, Any]) -> None:
        """The old agent saw it end: its status and exit code are known."""
        status, code = record.get("status"), record.get("exit_code")
        if status in ("completed", "failed", "killed"):
            self._status = status
            self._exit_code = code if isinstance(code, int) and not isinstance(code, bool) else None
            self.done.set()

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pid": self.pid,
            "ticks": self.ticks,
            "command": self.command,
            "cwd": self.cwd,
            "started_at": self.started_at,
        }

    def alive(self) -> bool:
        return self.ticks is not None and start_time(self.pid) == self.ticks

    def poll(self) -> None:
        with self._lock:
            if self.done.is_set():
                return
            if not self.alive():
                self._status = "killed" if self.kill_requested else self.LOST
                self.ended_at = time.time()
                self.done.set()

    @property
    def status(self) -> str:
        self.poll()
        return self._status

    @property
    def returncode(self) -> int | None:
        return None

    def summary(self) -> dict[str, Any]:
        status = self.status
        return {
            "id": self.id,
            "command": self.command,
            "status": status,
            "pid": self.pid,
            "exit_code": self._exit_code,
            "started_at": iso(self.started_at),
            "completed_at": None if self.ended_at is None else iso(self.ended_at),
        }

    def details(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "ended_at": None if self.ended_at is None else iso(self.ended_at),
            "signal": None,
            "cwd": self.cwd,
            "stdin": False,
            "log_dropped_chunks": 0,
            "timeout": None,
            "timed_out": False,
            "orphaned": True,
            "orphaned_at": iso(self.orphaned_at),
        }

    def gone_message(self) -> str:
        return (
            f"the output and stdin of process {self.id} were lost: the agent that started it "
            f"died and was restarted at {iso(self.orphaned_at)} (the process itself "
            "can still be listed, waited for and killed)"
        )

    def wait(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if self.done.is_set():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def write_stdin(self, data: bytes, eof: bool) -> None:
        raise ValueError(self.gone_message())

    def kill(self, sig: int, grace: float | None) -> None:
        if not self.alive():
            self.poll()
            return
        self.kill_requested = True
        kill_group(self.pid, sig)
        if grace is None:
            return
        if not self.wait(grace):
            kill_group(self.pid, signal.SIGKILL)
            self.wait(5)
        else:
            with contextlib.suppress(OSError):
                kill_group(self.pid, signal.SIGKILL)
