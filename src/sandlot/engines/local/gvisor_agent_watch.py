"""Following a gVisor sandbox's agent across its restarts.

A crun sandbox's agent inherits its listening socket from pid 1 (the host made it), so an agent
that ``kill -9 -1`` ended comes back on the same socket. A gVisor sandbox's agent binds its own
(runsc cannot hand one over, and gVisor cannot checkpoint one bound on the host, so the agent
lets go of it around a checkpoint: agent/checkpoint.py): each new agent makes a new socket
file, and the bind mount the gateway connects to still names the dead one's. So while a gVisor
sandbox runs, this task looks at the socket file every :data:`POLL_INTERVAL` seconds and, when
it is another inode than the one bound, adopts it with the same checks as at start
(gvisor.adopt_now: opened ``O_PATH|O_NOFOLLOW``, refused unless a socket): a symlink or
anything else the sandbox puts there is never followed nor bound.

Why polling: one ``stat`` pair per sandbox every 0.1 s costs ~10 µs; inotify would need an
instance per sandbox (128 per user by default). A restarted agent is reachable at most
:data:`POLL_INTERVAL` after it listens (it takes ~0.2 s to start inside gVisor anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from pathlib import Path

from sandlot.engines.base import EngineError
from sandlot.engines.local import gvisor

log = logging.getLogger("sandlot.engine")

#: How often a running gVisor sandbox's socket file is looked at.
POLL_INTERVAL = 0.1


def _inode(path: Path, *, follow: bool) -> tuple[int, int] | None:
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    return st.st_dev, st.st_ino


async def follow(made: Path, link: Path) -> None:
    """Until cancelled: adopt the socket at ``made`` whenever it is not the one at ``link``."""
    while True:
        await asyncio.sleep(POLL_INTERVAL)
        current = _inode(made, follow=False)
        if current is None or current == _inode(link, follow=True):
            continue
        try:
            gvisor.adopt_now(made, link)
        except (EngineError, OSError) as exc:
            log.debug("agent socket not adopted again: %s", exc)


class AgentWatches:
    """One :func:`follow` task per running gVisor sandbox."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, sandbox_id: str, made: Path, link: Path) -> None:
        self.stop(sandbox_id)
        self._tasks[sandbox_id] = asyncio.get_running_loop().create_task(follow(made, link))

    def stop(self, sandbox_id: str) -> None:
        task = self._tasks.pop(sandbox_id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
