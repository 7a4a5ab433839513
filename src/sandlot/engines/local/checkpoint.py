"""Checkpoint and restore of a gVisor sandbox: its memory and processes saved to a directory,
and a sandbox started again from one (runsc ``checkpoint`` / ``restore``).

Deep sleep of a gVisor sandbox uses these (engine.py: ``stop`` saves, ``start`` restores);
snapshots and fork are meant to build on them. An image directory holds runsc's files
(``checkpoint.img``: the kernel's state; ``pages.img`` and ``pages_meta.img``: the memory)
and nothing else; it is made under a temporary name and renamed when complete, so a crash never
leaves a half-written image that a restore would pick up. Directories 0700 and files 0600, all
root's: only runsc's own command (root) reads them, never the sandbox's gofer (its uid).

**The agent's socket.** gVisor cannot save a socket bound on the host ("Cannot save endpoint
with bound host socket": the checkpoint fails and the sandbox is gone), and the agent's is one.
runsc's save/restore hook runs ``sandlot-checkpoint`` inside the sandbox before the save (the
agent closes its listener and connections and removes its socket file) and after the restore
or a ``--leave-running`` save (it binds a new socket at the same path): see
sandlot.agent.checkpoint. The caller adopts the new socket like a restarted agent's
(gvisor.adopt_agent_socket: opened ``O_PATH|O_NOFOLLOW``, checked to be a socket).

**What an image is bound to** (for a restore into another sandbox's directory, e.g. a fork):

- the sandbox's memory, so the agent's secret (or its pool-mode claim) and its auth mode: a
  restored copy answers to the original's secret until its agent is told otherwise;
- the in-sandbox paths (the agent's socket, its pid file, ``/.sandlot/*``) and the OCI config's
  mounts: the restoring bundle must have the same mounts at the same places. Its files are
  reopened by path through the new bundle's gofer, so a copy needs its own disk (a copy of the
  original's ``disk.img``, taken while the original is checkpointed, so files and memory agree);
- gVisor's own network stack (``--network=none``: loopback only), saved in the image, so
  listeners on 127.0.0.1 inside come back; no host network namespace is involved;
- not the host side: the runsc id, the cgroup, the pid and the socket's bind mount are the
  restoring sandbox's (its id and bundle); its uid range comes from its own config's uid maps,
  and must be its own (the sandbox's files on the new disk are owned by that range).

Tried here (a sandbox's image restored under another sandbox's id and bundle): runsc first
refuses the other uid maps ("UIDMappings does not match across checkpoint restore"), which
``restore(..., another_sandbox=True)`` turns into a warning; it then fails on the files:
"failed to walk "processes" ... in mount /.sandlot/run: no such file or directory": the
restored kernel re-walks every file it had open, so the restoring sandbox needs a copy of the
original's disk with the same files, shifted to its own uid range. That copy is what a fork
must make; not done here.

Measured on this 2-core host (bench: ``python -m bench --parts gvisor``): see docs/gvisor.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandlot.engines.base import EngineError, InsufficientResources
from sandlot.engines.local.oci_runtime import OciRuntime, OciRuntimeError, spawn
from sandlot.runtime.closure import checkpoint_hook

#: The directory name of a sandbox's deep-sleep image, in its host directory.
IMAGE_NAME = "checkpoint"
#: runsc's files in an image (``checkpoint.img`` is written last: it marks a whole image).
STATE_FILE = "checkpoint.img"
#: How long the in-sandbox hook may take (the agent closes its sockets in ~ms; its default,
#: 10 min, would let a sandbox hold its deep sleep up that long).
HOOK_TIMEOUT = "10s"
_HOOK_SECONDS = 10.0
_HOOK_MODE_ENV = "GVISOR_SAVE_RESTORE_AUTO_EXEC_MODE"
#: Room kept free beyond the estimate: runsc's own state file and the filesystem's metadata.
SPACE_MARGIN = 32 * 1024 * 1024


_HOOK_ALREADY_SET = b"save/restore binary is already set"


#: runsc checkpoint's options: none. ``--direct`` (O_DIRECT writes) saved 1 GiB in 1.99 s
#: against 2.13 s without (medians of 3, load average 15-21 on 2 cores): noise. Compression
#: stays off (runsc's default): it would cost CPU and rule out ``restore --background``.
CHECKPOINT_FLAGS: tuple[str, ...] = ()
#: runsc restore's options: none. ``--background`` (pages loaded after restore returns) and
#: ``--direct`` (O_DIRECT reads) did not help here (10 MiB: 610-620 ms either way; 100 MiB:
#: 790 ms without, 910-960 ms with; 1 GiB: 7.0 s without, 6.7-9.7 s with --background; all
#: noisy): a small restore's time is runsc starting its sandbox (its boot process ~130 ms, its
#: seccomp filters ~80 ms, kernel load ~45 ms), a big one's the pages read back.
RESTORE_FLAGS: tuple[str, ...] = ()


class CheckpointError(EngineError):
    """runsc could not checkpoint or restore the sandbox (the message says why)."""


@dataclass(frozen=True)
class Saved:
    """One checkpoint: where it is, how big, and how long it took."""

    image: Path
    bytes: int
    seconds: float


def image_dir(sandbox_dir: Path) -> Path:
    return sandbox_dir / IMAGE_NAME


def has_image(image: Path) -> bool:
    """A complete image (its state file is written last, under a temporary directory name)."""
    return (image / STATE_FILE).is_file()


def needed_bytes(memory_bytes: int) -> int:
    """What a checkpoint may write, from the sandbox's memory use (its cgroup's, sentry
    included: an upper bound of the pages gVisor saves; uncompressed)."""
    return memory_bytes + SPACE_MARGIN


def ensure_room(image: Path, memory_bytes: int, sandbox_id: str) -> None:
    """Refuse a checkpoint the disk under ``image`` cannot hold, before anything is written."""
    st = os.statvfs(image.parent)
    free = st.f_bavail * st.f_frsize
    needed = needed_bytes(memory_bytes)
    if needed > free:
        mib = 1024 * 1024
        raise InsufficientResources(
            "disk",
            f"cannot checkpoint sandbox {sandbox_id}: its memory needs about {needed // mib} MiB "
            f"on the host's disk and {free // mib} MiB are free",
        )


def remove(image: Path) -> None:
    """An image and its half-written sibling, gone (a delete, a restore done, a failure)."""
    for path in (image, image.with_name(image.name + ".tmp")):
        shutil.rmtree(path, ignore_errors=True)


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def _first_line(text: str) -> str:
    """runsc's error without the goroutine dump a failed save appends."""
    line = text.strip().splitlines()[0] if text.strip() else "no output"
    return line.split("\\ngoroutine")[0].split(":\ngoroutine")[0][:500]


async def _run_save_hook(runtime: OciRuntime, sandbox_id: str) -> None:
    """The save half of the hook, as runsc runs it (its mode in the same variable)."""
    argv = runtime.argv(
        "exec", "--env", f"{_HOOK_MODE_ENV}=save", sandbox_id, *checkpoint_hook().split(" ")
    )
    try:
        result = await asyncio.wait_for(spawn(argv), _HOOK_SECONDS)
    except TimeoutError:
        raise CheckpointError(
            f"cannot checkpoint sandbox {sandbox_id}: its agent did not close its sockets"
        ) from None
    if result.returncode != 0:
        raise CheckpointError(
            f"cannot checkpoint sandbox {sandbox_id}: its agent did not close its sockets"
        )


async def checkpoint(
    runtime: OciRuntime,
    sandbox_id: str,
    image: Path,
    *,
    memory_bytes: int,
    leave_running: bool = False,
) -> Saved:
    """Save the running sandbox's memory and processes to ``image`` (a new directory).

    Without ``leave_running`` the sandbox is gone afterwards (runsc's container is stopped; the
    caller deletes it); with it, it runs on and its agent listens again. Refused with
    :class:`InsufficientResources` when the disk cannot hold ``memory_bytes`` (see
    :func:`ensure_room`). On failure nothing of the image is left; the sandbox may be gone
    too (runsc stops it when the save fails half way: seen), which the caller must check."""
    if runtime.name != "runsc":
        raise CheckpointError("only gvisor sandboxes can be checkpointed")
    remove(image)
    ensure_room(image, memory_bytes, sandbox_id)
    tmp = image.with_name(image.name + ".tmp")
    tmp.mkdir(mode=0o700)
    args = ["checkpoint", "--image-path", str(tmp), *CHECKPOINT_FLAGS]
    if leave_running:
        args.append("--leave-running")
    hook = ["--save-restore-exec-argv", checkpoint_hook()]
    hook += ["--save-restore-exec-timeout", HOOK_TIMEOUT]
    started = time.perf_counter()
    try:
        result = await _bounded(runtime.argv(*args, *hook, sandbox_id))
        if result.returncode != 0 and _HOOK_ALREADY_SET in result.stderr:
            # The kernel keeps the hook it was first given (a restored one: in its image) and
            # runs it after a restore, but before a save only when given it again, which it
            # refuses: the save half is run here, then the save without it.
            shutil.rmtree(tmp)
            tmp.mkdir(mode=0o700)
            await _run_save_hook(runtime, sandbox_id)
            result = await _bounded(runtime.argv(*args, sandbox_id))
        if result.returncode != 0:
            err = _first_line(result.stderr.decode(errors="replace"))
            if "no space left" in err.lower():
                raise InsufficientResources(
                    "disk", f"cannot checkpoint sandbox {sandbox_id}: the host's disk is full"
                )
            raise CheckpointError(runtime.scrub(f"cannot checkpoint sandbox {sandbox_id}: {err}"))
        for f in tmp.iterdir():
            f.chmod(0o600)
        tmp.rename(image)
    except BaseException:
        remove(image)
        raise
    return Saved(image, _size(image), time.perf_counter() - started)


#: The longest a checkpoint or a restore may take before runsc is killed and the call fails
#: (1 GiB took 2-7 s here under load): no wake or sleep hangs on a runsc that does.
SAVE_RESTORE_TIMEOUT = 300.0


async def _bounded(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    try:
        return await spawn(argv, timeout=SAVE_RESTORE_TIMEOUT, **kw)
    except subprocess.TimeoutExpired:
        verb = "restore" if "restore" in argv else "checkpoint"
        raise CheckpointError(
            f"runsc {verb} did not finish in {SAVE_RESTORE_TIMEOUT:g} s (killed)"
        ) from None


async def restore(
    runtime: OciRuntime,
    sandbox_id: str,
    image: Path,
    bundle: Path,
    pid_file: Path,
    log_fd: int,
    *,
    another_sandbox: bool = False,
) -> int:
    """Start sandbox ``sandbox_id`` from ``bundle`` with the memory and processes saved in
    ``image``; return its init's host pid. The sandbox's stdout and stderr go to ``log_fd``.
    The image is left in place: the caller removes it once the restored sandbox answers (a
    restored image is stale at once: its files move on).

    ``another_sandbox``: ``sandbox_id`` and ``bundle`` are not the saved sandbox's (a fork).
    runsc checks the restoring config against the saved one and refuses different uid maps
    ("UIDMappings does not match across checkpoint restore"), which every other sandbox has
    (its own uid range): that check is then made a warning (``--restore-spec-validation``).
    See the module's notes on what an image is bound to."""
    if not has_image(image):
        raise CheckpointError(f"sandbox {sandbox_id} has no checkpoint to restore")
    relaxed = ("--restore-spec-validation=warning",) if another_sandbox else ()
    argv = runtime.argv(
        *relaxed,
        "restore",
        "--detach",
        *RESTORE_FLAGS,
        "--image-path",
        str(image),
        "--bundle",
        str(bundle),
        "--pid-file",
        str(pid_file),
        sandbox_id,
    )
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    result = await _bounded(argv, stdout=log_fd, stderr=log_fd)
    if result.returncode != 0:  # runsc wrote why to the sandbox's log (its stderr)
        raise CheckpointError(
            f"cannot restore sandbox {sandbox_id} from its checkpoint "
            f"(runsc exited with status {result.returncode})"
        )
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise OciRuntimeError(f"runsc restored sandbox {sandbox_id} without a pid") from exc


# -- deep sleep that keeps memory (what the engine's stop and start call for gVisor) ---------


async def sleep(runtime: OciRuntime, sandbox_id: str, sandbox_dir: Path, memory_bytes: int) -> str:
    """Deep sleep of a running gVisor sandbox: checkpoint it into its own directory, then let
    runsc's container go (its memory is freed). Returns what the sleep kept, for the sandbox's
    events. A checkpoint that cannot be made (the disk cannot hold it, the sandbox's agent did
    not let go of its socket in time) is not fatal: the sandbox is stopped as a crun one is
    (processes lost, files kept), and the reason is returned."""
    try:
        saved = await checkpoint(
            runtime, sandbox_id, image_dir(sandbox_dir), memory_bytes=memory_bytes
        )
        note = (
            f"processes and memory kept on disk ({saved.bytes // (1024 * 1024)} MiB "
            f"written in {saved.seconds * 1000:.0f} ms), memory released"
        )
    except EngineError as exc:
        note = f"processes stopped, memory released, filesystem kept (memory not kept: {exc})"
    await runtime.kill_all(sandbox_id, "KILL")
    await runtime.delete(sandbox_id)
    return note
