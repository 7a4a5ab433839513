"""A thin async wrapper around the OCI runtime binary (crun by default, runc as fallback).

It knows two host facts so the engine does not have to: which runtime exists, and how to start it
on a hybrid cgroup host (crun from a private mount namespace without ``/sys/fs/cgroup/unified``;
the host's layout is never touched). Every runtime call uses our own ``--root`` so ``list`` sees
only sandlot's sandboxes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandlot.engines.base import EngineError, EngineUnavailableError
from sandlot.engines.local.cgroups import CGROUP_ROOT, CgroupLayout

_HYBRID_UMOUNT = f"umount {CGROUP_ROOT}/unified && "


class OciRuntimeError(EngineError):
    pass


#: The longest any runtime call may take before it is killed and reported: a runtime that
#: hangs (runsc did, for minutes, on a sandbox whose cgroup was frozen) never hangs a request.
#: Seen here on a busy 2-core host: crun calls 10-30 ms, runsc 60 ms (state, pause, resume) to
#: 4 s (run).
CALL_TIMEOUT = 60.0


def _spawn_with_fd3(
    argv: list[str], fd3: int | None, log_fd: int, timeout: float = CALL_TIMEOUT
) -> int:
    """Run ``argv`` with ``fd3`` as its fd 3 and ``log_fd`` as stdout/stderr; wait for it
    (killed after ``timeout`` seconds: -9).

    posix_spawn's file actions place the fd without a shell (dash cannot redirect fds above
    9) and without a preexec hook (which would rule out vfork). Every other fd the server holds
    is close-on-exec (PEP 446), so nothing else reaches the sandbox.
    """
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, log_fd, 1),
        (os.POSIX_SPAWN_DUP2, log_fd, 2),
    ]
    if fd3 is not None:
        actions.append((os.POSIX_SPAWN_DUP2, fd3, 3))
    pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL
        time.sleep(0.002)


def _read_tail(path: Path, size: int = 8192) -> str:
    """The end of a log the sandbox may have made as big as its disk."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read().decode(errors="replace")


async def spawn(
    argv: list[str],
    *,
    input: bytes | None = None,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a helper program from a worker thread (killed after ``timeout`` seconds, if given:
    ``subprocess.TimeoutExpired``).

    Why not asyncio's subprocess support: under uvloop it forks the whole server process
    (~14 ms with a 150 MB heap, blocking the event loop meanwhile); ``subprocess.run`` uses
    vfork/posix_spawn, and the thread keeps the loop free.
    """
    return await asyncio.to_thread(
        subprocess.run,
        argv,
        input=input,
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL if input is None else None,
        check=False,
        timeout=timeout,
    )


#: gVisor's global flags. systrap: the default platform, and the one that works here (KVM hung
#: on these machines although /dev/kvm answers).
#: host-uds=create: the agent makes its socket on a bind mount (see gvisor.adopt_agent_socket).
#: network=sandbox: gVisor's stack copies the interfaces of the network namespace it joins,
#: made beforehand with loopback up and a link to route through (gvisor_net.py).
#: overlay2=none: writes go through to the sandbox's own overlay on its disk (the quota, kept
#: across sleep); runsc's default keeps them in an overlay of its own, lost when it stops.
RUNSC_FLAGS = (
    "--platform=systrap",
    "--host-uds=create",
    "--network=sandbox",
    "--overlay2=none",
    "--oci-seccomp",
)


@dataclass(frozen=True)
class OciRuntime:
    name: str
    binary: str
    root: Path
    layout: CgroupLayout
    #: Global flags given before the command (runsc's platform, ...).
    flags: tuple[str, ...] = ()

    @classmethod
    def detect_gvisor(cls, root: Path, layout: CgroupLayout) -> OciRuntime:
        """runsc, found on PATH (scripts/setup.sh builds it and puts it there)."""
        binary = shutil.which("runsc")
        if not binary:
            raise EngineUnavailableError(
                "the gvisor runtime needs runsc, which is not installed on this host: "
                "run scripts/build-runsc.sh (scripts/setup.sh does)"
            )
        root.mkdir(parents=True, exist_ok=True)
        return cls(
            name="runsc", binary=binary, root=root / "runsc", layout=layout, flags=RUNSC_FLAGS
        )

    @classmethod
    def detect(cls, root: Path, layout: CgroupLayout, preferred: str | None = None) -> OciRuntime:
        candidates = [preferred] if preferred else ["crun", "runc"]
        for name in candidates:
            binary = shutil.which(name)
            if binary:
                root.mkdir(parents=True, exist_ok=True)
                return cls(name=name, binary=binary, root=root / name, layout=layout)
        wanted = preferred or "crun (or runc)"
        raise EngineUnavailableError(
            f"the local engine needs the OCI runtime {wanted}: apt-get install crun"
        )

    def argv(self, *args: str) -> list[str]:
        base = [self.binary, "--root", str(self.root), *self.flags, *args]
        if self.layout is CgroupLayout.HYBRID and self.name == "crun":
            return [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                _HYBRID_UMOUNT + 'exec "$0" "$@"',
                *base,
            ]
        return base

    def scrub(self, text: str) -> str:
        """Error text for clients: the host's state directory is none of their business."""
        return text.replace(str(self.root.parent.parent), "<state>")

    _scrub = scrub

    async def _call(
        self, *args: str, check: bool = True, timeout: float = CALL_TIMEOUT
    ) -> tuple[int, str, str]:
        try:
            result = await spawn(self.argv(*args), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise OciRuntimeError(
                f"{self.name} {args[0]} did not answer in {timeout:g} s (killed)"
            ) from None
        out = result.stdout.decode(errors="replace")
        err = result.stderr.decode(errors="replace").strip()
        if check and result.returncode != 0:
            raise OciRuntimeError(self._scrub(f"{self.name} {args[0]} failed: {err or out}"))
        return result.returncode, out, err

    async def run_detached(
        self,
        sandbox_id: str,
        bundle: Path,
        log_path: Path,
        pid_file: Path,
        listener: int | None,
        log_fd: int | None = None,
    ) -> int:
        """Start the sandbox, handing it ``listener`` as fd 3 (if any); return its init's host pid.
        Its stdout and stderr go to ``log_fd`` if given (already open on ``log_path``)."""
        # runsc has no --preserve-fds: it donates host fds to the sandbox as ``--pass-fd H:G``.
        fd3 = ("--preserve-fds", "1") if listener is not None else ()
        argv = self.argv(
            "run",
            "--detach",
            *fd3,
            "--pid-file",
            str(pid_file),
            "--bundle",
            str(bundle),
            sandbox_id,
        )
        # The container's stdout/stderr go to a file: a pipe would keep crun waiting on it.
        if log_fd is None:
            with open(log_path, "ab") as log:
                returncode = await asyncio.to_thread(_spawn_with_fd3, argv, listener, log.fileno())
        else:
            returncode = await asyncio.to_thread(_spawn_with_fd3, argv, listener, log_fd)
        if returncode == -signal.SIGKILL:
            raise OciRuntimeError(
                f"{self.name} could not start the sandbox in {CALL_TIMEOUT:g} s (killed)"
            )
        if returncode != 0:
            tail = _read_tail(log_path).strip().splitlines()[-5:]
            raise OciRuntimeError(
                self._scrub(f"{self.name} could not start the sandbox: " + " | ".join(tail))
            )
        return int(pid_file.read_text().strip())

    async def state(self, sandbox_id: str) -> dict[str, Any] | None:
        rc, out, _ = await self._call("state", sandbox_id, check=False)
        if rc != 0:
            return None
        parsed: dict[str, Any] = json.loads(out)
        return parsed

    async def kill_all(self, sandbox_id: str, signal: str = "KILL") -> None:
        await self._call("kill", "--all", sandbox_id, signal, check=False)

    async def pause(self, sandbox_id: str) -> None:
        """Stop every process of the sandbox where it is, memory kept (runsc: gVisor's kernel
        stops its tasks; its control server keeps answering, unlike a frozen cgroup)."""
        await self._call("pause", sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        await self._call("resume", sandbox_id)

    async def delete(self, sandbox_id: str) -> None:
        await self._call("delete", "--force", sandbox_id, check=False)

    async def list_ids(self) -> list[str]:
        rc, out, _ = await self._call("list", "--format", "json", check=False)
        if rc != 0 or not out.strip():
            return []
        return [entry["id"] for entry in json.loads(out) or []]
