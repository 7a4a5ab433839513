"""What the agent does around a gVisor checkpoint: let go of its host sockets, then listen again.

Why: in a gVisor sandbox the agent's listening socket is bound on the host (runsc's
``--host-uds=create``), and gVisor refuses to save such a socket ("Cannot save endpoint with
bound host socket": the checkpoint fails and the sandbox is gone). So before a checkpoint the
agent closes its listener and every connection it accepted, and removes its socket file; after
the restore (or after a checkpoint that left the sandbox running) it binds a new one at the
same path, which the engine adopts as it adopts a restarted agent's.

The engine asks through runsc's save/restore hook, a program runsc runs inside the sandbox just
before saving and just after restoring (``sandlot-checkpoint`` in the agent's runtime, a busybox
script): it reads the agent's pid from :envvar:`SANDLOT_AGENT_PID_FILE` and sends
:data:`PARK_SIGNAL` (then waits until the socket file is gone) or :data:`LISTEN_SIGNAL`. The
sandbox's own code can send these signals too, and at worst takes its own agent off line until
the next one: it owns the sandbox anyway.

Only a ``unix:`` listener, and only when the engine sets :envvar:`SANDLOT_AGENT_PID_FILE` (its
gVisor sandboxes); anywhere else both signals keep their default action.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from sandlot.agent.http11 import Dispatch, Listener

PARK_SIGNAL = signal.SIGUSR1
LISTEN_SIGNAL = signal.SIGUSR2
PID_FILE_ENV = "SANDLOT_AGENT_PID_FILE"


class _Switch(BaseException):
    """Raised in the main thread by a signal, to leave whatever blocking call it was in."""


class Parking:
    """The agent's accept loop, with the park/listen switch driven by signals."""

    def __init__(self, listener: Listener, pid_file: str) -> None:
        self.listener = listener
        self.pid_file = pid_file
        self._want_parked = False
        #: Only while waiting (accepting, or parked): a signal then breaks the wait. Anywhere
        #: else it only records what is wanted, which the loop looks at next.
        self._interruptible = False

    @classmethod
    def from_env(cls, environ: dict[str, str], listener: Listener) -> Parking | None:
        pid_file = environ.get(PID_FILE_ENV)
        if not pid_file or listener.unix_path is None:
            return None
        return cls(listener, pid_file)

    def install(self) -> None:
        """Handle the two signals, then say who to send them to (0600, replaced atomically)."""
        signal.signal(PARK_SIGNAL, self._on_signal)
        signal.signal(LISTEN_SIGNAL, self._on_signal)
        tmp = f"{self.pid_file}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        os.rename(tmp, self.pid_file)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._want_parked = signum == PARK_SIGNAL
        if self._interruptible:
            self._interruptible = False
            raise _Switch

    def serve(self, dispatch: Dispatch) -> None:
        """Serve until a ``_Stop``-like exception leaves; park and listen again as asked."""
        parked = False
        while True:
            try:
                if self._want_parked and not parked:
                    self.listener.park()
                    parked = True
                elif not self._want_parked and parked:
                    self.listener.unpark()
                    parked = False
            except (OSError, ValueError) as exc:  # the socket path taken by the sandbox, say
                sys.stderr.write(f"sandlot-agent: cannot listen again: {exc}\n")
                time.sleep(0.5)
                continue
            try:
                self._interruptible = True
                if self._want_parked != parked:
                    pass  # a signal came during the change above: look again
                elif parked:
                    time.sleep(1.0)
                else:
                    self.listener.serve_forever(dispatch)
                self._interruptible = False  # last: a signal before it still lands in here
            except _Switch:
                pass
