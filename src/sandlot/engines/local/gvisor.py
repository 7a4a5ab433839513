"""What a gVisor (runsc) sandbox needs that a crun one does not, in one place: the agent's own
socket adopted from the sandbox's disk, and light sleep
through runsc (its network is gvisor_net.py). The engine (engine.py) calls these where the
runtimes differ; docs/gvisor.md says why each difference exists."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from pathlib import Path

from sandlot.engines.base import EngineError
from sandlot.engines.local import mounts
from sandlot.engines.local.oci_runtime import OciRuntime


def remove_stale_socket(made: Path) -> None:
    """The last run's socket file, gone before the sandbox starts (nothing of it runs then);
    through its directory opened without following links, whatever the sandbox left there."""
    fd = os.open(made.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(made.name, dir_fd=fd)
    finally:
        os.close(fd)


#: How long a gVisor sandbox's agent may take to make its socket (it starts in ~0.3 s here).
AGENT_SOCKET_TIMEOUT = 30.0


async def adopt_agent_socket(made: Path, link: Path) -> None:
    """A gVisor sandbox's agent makes its own socket, in a directory the sandbox can write
    (runsc gives a donated listening socket to the sandbox as a plain file: ``listen`` fails
    with EINVAL). The sandbox could swap that file for a symlink to any socket on the host, so
    the gateway never connects through it: the socket's inode, checked to be a socket and not
    followed if a symlink, is bind-mounted at ``link``, in the sandbox's host directory (a hard
    link cannot cross from the sandbox's disk); ``delete`` unmounts it with the rest."""
    deadline = time.monotonic() + AGENT_SOCKET_TIMEOUT
    while not adopt_now(made, link):
        if time.monotonic() > deadline:
            raise EngineError(f"the sandbox's agent made no socket in {AGENT_SOCKET_TIMEOUT:g} s")
        await asyncio.sleep(0.005)


async def set_paused(runtime: OciRuntime, sandbox_id: str, paused: bool) -> None:
    """Light sleep of a gVisor sandbox: ``runsc pause`` stops gVisor's tasks where they are and
    keeps their memory, while runsc's own control server keeps answering. Not the cgroup
    freezer: that froze the sentry's control server too, and every later ``runsc state``
    (which asks it) hung for minutes. Measured here (busy 2-core host, a sandbox holding
    50 MB): pause 67 ms, resume 59 ms (median of 10; each is one runsc process, mostly its
    start), memory kept (77 MiB before and after); crun's freezer takes 0.2 ms."""
    if paused:
        await runtime.pause(sandbox_id)
        return
    try:
        await runtime.resume(sandbox_id)
    except EngineError:  # not paused (a resume before a deep sleep, say): nothing to do
        state = await runtime.state(sandbox_id)
        if state is not None and state.get("status") == "paused":
            raise


def adopt_now(made: Path, link: Path) -> bool:
    """Bind the socket at ``made`` at ``link`` if there is one (False: none yet); opened
    without following a symlink, and refused unless it is a socket."""
    try:
        fd = os.open(made, os.O_PATH | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise EngineError("the sandbox's agent socket is not a socket")
        mounts.unmount(link)  # a restart's: the old agent's socket
        mounts.bind_fd(fd, link)
        return True
    finally:
        os.close(fd)
