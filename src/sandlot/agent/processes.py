"""Background processes: ``/start_process`` and friends.

Each process has a uuid, its shell's pid (also its process-group id), a status
(``running`` → ``completed`` | ``failed`` | ``killed``), an exit code, start and end times, an
optional stdin pipe, and a bounded history of its output (a ring of chunks, capped both in
count and in bytes) that any number of readers can replay and follow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from sandlot.agent.chunks import Utf8Splitter
from sandlot.agent.commands import (
    SpawnError,
    exit_code,
    kill_group,
    pump,
    signal_name,
    spawn,
)
from sandlot.agent.logring import LogRing, iso

# Annotations only: importing typing at run time costs the agent milliseconds of start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from sandlot.agent.journal import Journal, OrphanedProcess

#: Finished processes kept for ``list_processes``; the oldest finished ones are forgotten.
MAX_FINISHED = 1000
#: Output kept for all finished processes together; the oldest histories are emptied first
#: (a sandbox may have 256 MiB in all: a thousand full histories must not fit in it).
FINISHED_LOG_BUDGET = 32 * 1024 * 1024
DEFAULT_KILL_GRACE = 5.0


def new_id() -> str:
    """A random (version 4) UUID, without importing :mod:`uuid`."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def iso_now() -> str:
    return iso(time.time())


class ManagedProcess:
    def __init__(
        self, command: str, cwd: str, popen: subprocess.Popen[bytes], *, started_at: float
    ) -> None:
        self.id = new_id()
        self.command = command
        self.cwd = cwd
        self.popen = popen
        self.pid = popen.pid
        self.started_at = started_at
        self.ended_at: float | None = None
        self.returncode: int | None = None
        self.kill_requested = False
        self.timed_out = False
        self.timeout: float | None = None
        self.logs = LogRing()
        self.stdin_lock = threading.Lock()
        self.done = threading.Event()
        #: Called once it ended (the journal records it).
        self.on_end: Callable[[ManagedProcess], None] | None = None

    @property
    def status(self) -> str:
        if self.returncode is None:
            return "running"
        if self.kill_requested:
            return "killed"
        return "completed" if self.returncode == 0 else "failed"

    def summary(self) -> dict[str, Any]:
        """Exactly the fields Koyeb's SDK accepts (it builds ``ProcessInfo(**entry)``)."""
        return {
            "id": self.id,
            "command": self.command,
            "status": self.status,
            "pid": self.pid,
            "exit_code": None if self.returncode is None else exit_code(self.returncode),
            "started_at": iso(self.started_at),
            "completed_at": None if self.ended_at is None else iso(self.ended_at),
        }

    def details(self) -> dict[str, Any]:
        """Everything we know (sandlot extension)."""
        return {
            **self.summary(),
            "ended_at": None if self.ended_at is None else iso(self.ended_at),
            "signal": None if self.returncode is None else signal_name(self.returncode),
            "cwd": self.cwd,
            "stdin": self.popen.stdin is not None and not self.popen.stdin.closed,
            "log_dropped_chunks": self.logs.dropped,
            "timeout": self.timeout,
            "timed_out": self.timed_out,
        }

    def _timed_out(self) -> None:
        self.timed_out = True
        self.kill_requested = True  # status "killed", like a kill_process

    def _exited(self, returncode: int) -> None:
        self.ended_at = time.time()
        self.returncode = returncode
        self.done.set()

    def _run(self, live_groups: set[int], lock: threading.Lock) -> None:
        splitters = {"stdout": Utf8Splitter(), "stderr": Utf8Splitter()}

        def sink(stream: str, data: bytes) -> None:
            for chunk in splitters[stream].feed(data):
                self.logs.append(stream, chunk)

        try:
            # drain_max=None: children the command left running keep their output logged
            pump(
                self.popen,
                sink,
                timeout=self.timeout,
                drain_max=None,
                on_exit=self._exited,
                on_timeout=self._timed_out,
            )
        finally:
            for stream, splitter in splitters.items():
                for chunk in splitter.flush():
                    self.logs.append(stream, chunk)
            if self.popen.stdin is not None:
                with contextlib.suppress(OSError):
                    self.popen.stdin.close()
            if self.returncode is None:
                self._exited(self.popen.returncode)
            with lock:
                live_groups.discard(self.pid)
            self.logs.close()
            if self.on_end is not None:
                self.on_end(self)

    def wait(self, timeout: float | None) -> bool:
        return self.done.wait(timeout)

    def write_stdin(self, data: bytes, eof: bool) -> None:
        stdin = self.popen.stdin
        if stdin is None:
            raise ValueError("process was not started with stdin: true")
        with self.stdin_lock:
            if stdin.closed:
                raise ValueError("stdin is closed")
            try:
                if data:
                    stdin.write(data)
                    stdin.flush()
            except BrokenPipeError:
                raise ValueError("the process closed its stdin") from None
            finally:
                if eof:
                    with contextlib.suppress(OSError):
                        stdin.close()

    def kill(self, sig: int, grace: float | None) -> None:
        """Send ``sig`` to the group; with ``grace``, SIGKILL the group if still alive after it."""
        self.kill_requested = True
        kill_group(self.pid, sig)
        if grace is None:
            return
        if not self.done.wait(grace):
            kill_group(self.pid, signal.SIGKILL)
            self.done.wait(5)
        else:
            kill_group(self.pid, signal.SIGKILL)  # stragglers left in the group


class ProcessManager:
    def __init__(
        self,
        base_env: Mapping[str, str],
        live_groups: set[int],
        lock: threading.Lock,
        journal: Journal | None = None,
    ):
        self._base_env = base_env
        self._live_groups = live_groups
        self._lock = lock
        self._procs: dict[str, ManagedProcess | OrphanedProcess] = {}
        self._journal = journal
        if journal is not None:  # what an earlier agent of this sandbox started
            for orphan in journal.load(orphaned_at=time.time()):
                self._procs[orphan.id] = orphan

    def start(
        self,
        cmd: str,
        cwd: str,
        env: Mapping[str, str] | None,
        *,
        stdin: bool,
        timeout: float | None = None,
        process_id: str | None = None,
    ) -> ManagedProcess:
        """``process_id``: a chosen id (the main process's, see main_process.py)."""
        popen = spawn(cmd, cwd, env, base_env=self._base_env, stdin=stdin)
        proc = ManagedProcess(cmd, cwd, popen, started_at=time.time())
        if process_id is not None:
            proc.id = process_id
        proc.timeout = timeout
        with self._lock:
            self._procs[proc.id] = proc
            self._live_groups.add(proc.pid)
            self._forget_old()
        if self._journal is not None:
            self._journal.started(proc)
            proc.on_end = self._journal.ended
            if self._journal.too_big:
                self._journal.rewrite(self.all())
        try:
            threading.Thread(
                target=proc._run, args=(self._live_groups, self._lock), daemon=True
            ).start()
        except RuntimeError:  # no thread to read its output: do not leave it running unread
            kill_group(popen.pid)
            popen.wait()
            for pipe in (popen.stdin, popen.stdout, popen.stderr):
                if pipe is not None:
                    pipe.close()
            with self._lock:
                del self._procs[proc.id]
                self._live_groups.discard(proc.pid)
            raise SpawnError("cannot start process: no thread available (pids limit?)") from None
        return proc

    def _forget_old(self) -> None:
        finished = [p for p in self._procs.values() if p.done.is_set()]
        for p in finished[: max(0, len(finished) - MAX_FINISHED)]:
            del self._procs[p.id]
        finished = finished[max(0, len(finished) - MAX_FINISHED) :]
        total = sum(p.logs.size for p in finished)
        for p in finished:  # oldest first
            if total <= FINISHED_LOG_BUDGET:
                break
            total -= p.logs.size
            p.logs.clear()

    def get(self, process_id: str) -> ManagedProcess | OrphanedProcess | None:
        with self._lock:
            return self._procs.get(process_id)

    def all(self) -> list[ManagedProcess | OrphanedProcess]:
        with self._lock:
            return list(self._procs.values())

    def running(self) -> Iterator[ManagedProcess | OrphanedProcess]:
        return (p for p in self.all() if not p.done.is_set())
