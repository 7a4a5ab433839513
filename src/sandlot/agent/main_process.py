"""The sandbox's main process (Koyeb's ``entrypoint``/``command``/``args``), supervised by the
agent beside everything else it runs.

The engine writes the command (one ``sh -c`` line) into the sandbox's read-only configuration
and names the file in ``SANDLOT_MAIN_COMMAND_FILE``. The agent starts it as a background
process with the id ``main-1`` (then ``main-2``, ... for each restart), so it is listed by
``list_processes``, its output is read through ``process_logs_streaming`` and it is journalled
like any other (:mod:`.journal`). When it ends, for whatever reason (it exits, it crashes, it is
killed through the API), it is started again, as a container's main process is with a restart
policy of "always": after 1 s, doubling up to 30 s while it keeps dying within a minute of its
start. A restarted agent finds the previous main process in the journal: while that still runs
it is waited for, not started twice. Deep sleep ends it (``sandlot-init`` clears the journal):
a woken sandbox starts it afresh.
"""

from __future__ import annotations

import os
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from sandlot.agent.processes import ProcessManager

MAIN_VARIABLE = "SANDLOT_MAIN_COMMAND_FILE"
MAIN_PREFIX = "main-"
COMMAND_LIMIT = 4096
FIRST_DELAY, MAX_DELAY, HEALTHY_AFTER = 1.0, 30.0, 60.0


def read_command(env: Any) -> str | None:
    path = env.get(MAIN_VARIABLE)
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            command = f.read(COMMAND_LIMIT + 1).decode("utf-8", "replace").strip()
    except OSError:
        return None
    return command if command and len(command) <= COMMAND_LIMIT else None


def _number(process_id: str) -> int:
    suffix = process_id[len(MAIN_PREFIX) :]
    return int(suffix) if suffix.isdigit() else 0


class MainSupervisor:
    def __init__(
        self, processes: ProcessManager, command: str, cwd: str, stopping: threading.Event
    ) -> None:
        self.processes = processes
        self.command = command
        self.cwd = cwd
        self.stopping = stopping

    def start(self) -> None:
        threading.Thread(target=self._run, name="sandlot-main", daemon=True).start()

    def _current(self) -> Any:
        """The newest main process, if it still runs (ours, or an earlier agent's)."""
        mains = [p for p in self.processes.all() if p.id.startswith(MAIN_PREFIX)]
        mains.sort(key=lambda p: _number(p.id))
        if mains and not mains[-1].done.is_set():
            return mains[-1]
        return None

    def _next_id(self) -> str:
        numbers = [_number(p.id) for p in self.processes.all() if p.id.startswith(MAIN_PREFIX)]
        return f"{MAIN_PREFIX}{max(numbers, default=0) + 1}"

    def _run(self) -> None:
        delay = FIRST_DELAY
        while not self.stopping.is_set():
            proc = self._current()
            started = time.monotonic()
            if proc is None:
                try:
                    proc = self.processes.start(
                        self.command, self.cwd, None, stdin=False, process_id=self._next_id()
                    )
                except Exception as exc:  # a pids limit, say: try again later
                    os.write(2, f"sandlot-agent: main process: {exc}\n".encode())
                    proc = None
            while proc is not None and not proc.wait(1.0):
                if self.stopping.is_set():
                    return
            ran = time.monotonic() - started
            delay = FIRST_DELAY if ran >= HEALTHY_AFTER else min(delay * 2, MAX_DELAY)
            self.stopping.wait(delay if ran < HEALTHY_AFTER else FIRST_DELAY)


def supervise(
    env: Any, processes: ProcessManager, cwd: str, stopping: threading.Event
) -> MainSupervisor | None:
    """Start supervising the main process the engine configured, if any."""
    command = read_command(env)
    if command is None:
        return None
    supervisor = MainSupervisor(processes, command, cwd, stopping)
    supervisor.start()
    return supervisor
