"""Every path a sandbox can write is inside its disk quota, read-only, or a bounded tmpfs.

Before the fix, ``/etc/hosts``, ``/etc/hostname``, ``/etc/resolv.conf``, ``/.sandlot/run`` and
pid 1's stdout (``/proc/1/fd/1``, the agent's log) were files of the host's state directory:
2,600 MiB written through them by a micro sandbox with a 2 GiB quota landed on the host. Here a
nano sandbox (1 GiB disk) writes past its quota through each of them; the host-side files of
the sandbox (its disk image included) never hold more than the quota, the writer gets ENOSPC
(EROFS for its read-only configuration), and the sandbox keeps working.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support.local import (
    SandboxHandle,
    create_sandbox,
    deep_sleep,
)
from support.runtimes import engine_state_for_runtimes, runtime_params

from sandlot.engines.local import LocalEngine
from sandlot.instance_types import get_instance_type

pytestmark = [pytest.mark.anyio, pytest.mark.root]


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    """Both runtimes' sandboxes (gVisor's need a state directory every user may search)."""
    with engine_state_for_runtimes("sl-writable-") as path:
        yield path


@pytest.fixture(params=runtime_params())
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


QUOTA = get_instance_type("nano").disk_mb * 1024 * 1024
#: Written through each path: more than the whole quota.
ATTEMPT = QUOTA + 128 * 1024 * 1024
#: What the host may hold beyond the quota for one sandbox (its config, metadata).
SLACK = 16 * 1024 * 1024


@pytest.fixture
async def sandbox(engine: LocalEngine, runtime: str) -> AsyncIterator[SandboxHandle]:
    handle = await create_sandbox(engine, image="busybox", instance_type="nano", runtime=runtime)
    try:
        yield handle
    finally:
        await handle.aclose()


def host_bytes(directory: Path) -> int:
    """Bytes the host's filesystem holds for the sandbox: every file under its directory
    (its sparse disk image counted by allocated blocks), not crossing into its mounts."""
    total = 0
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(root, d))]
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


async def _fill(sb: SandboxHandle, path: str) -> str:
    cmd = f"dd if=/dev/zero bs=1M count={ATTEMPT >> 20} >> {path}; echo rc=$?"
    r = await sb.client.post("/run", json={"cmd": cmd, "timeout": 600}, timeout=600)
    assert r.status_code == 200, r.text
    return str(r.json()["stdout"]) + str(r.json()["stderr"])


@pytest.mark.parametrize(
    "path", ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/.sandlot/run/fill"]
)
async def test_platform_files_are_inside_the_quota(
    engine: LocalEngine, sandbox: SandboxHandle, path: str
) -> None:
    directory = engine.sandboxes_dir / sandbox.id
    out = await _fill(sandbox, path)
    held = host_bytes(directory)
    assert held <= QUOTA + SLACK, f"{held >> 20} MiB on the host for a {QUOTA >> 20} MiB quota"
    assert "No space left on device" in out, out
    # the sandbox still works, and gets its space back
    await sandbox.sh(f": > {path}")
    assert await sandbox.sh("echo alive") == "alive\n"
    assert await sandbox.sh("echo more >> /root/file && cat /root/file") == "more\n"


async def test_agent_configuration_is_read_only(sandbox: SandboxHandle) -> None:
    for path in ("/.sandlot/config/fill", "/.sandlot/config/env", "/.sandlot/runtime/fill"):
        out = await sandbox.run(f"echo x >> {path}")
        assert out["code"] != 0
        assert "Read-only file system" in out["stderr"] or "Permission denied" in out["stderr"]


async def test_agent_log_is_inside_the_quota_and_rotated(
    engine: LocalEngine, sandbox: SandboxHandle
) -> None:
    """pid 1's stdout is a file the sandbox's root can reopen through /proc/1/fd/1."""
    directory = engine.sandboxes_dir / sandbox.id
    out = await _fill(sandbox, "/proc/1/fd/1")
    held = host_bytes(directory)
    assert held <= QUOTA + SLACK, f"{held >> 20} MiB on the host for a {QUOTA >> 20} MiB quota"
    assert "No space left on device" in out, out
    assert await sandbox.sh("echo alive") == "alive\n"
    # the next start cuts the log: the sandbox's disk is its own again
    await deep_sleep(engine, sandbox)
    used_kib = int((await sandbox.sh("df -k / | tail -1")).split()[2])
    assert used_kib < 64 * 1024, f"{used_kib} KiB still used after the log's rotation"
    assert await sandbox.sh("echo alive") == "alive\n"


#: What gVisor's kernel shows for the spec's mounts: files served by runsc's gofer ("9p") from
#: the overlay and the sandbox's own disk, which hold the quota on the host.
GVISOR_GOFER_MOUNTS = {"/", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/.sandlot/run"}


@pytest.mark.parametrize("runtime", runtime_params(gvisor_by_default=True))
async def test_every_writable_mount_is_bounded(sandbox: SandboxHandle, runtime: str) -> None:
    """Read from inside: each read-write mount is the overlay, the sandbox's own disk image
    (a loop device), a tmpfs with a size, or a kernel filesystem holding no file data. Under
    gVisor: the gofer's mounts of those same files, and gVisor's own tmpfs and dev (in gVisor's
    memory, which is the sandbox's cgroup's: it ignores ``size=``)."""
    unbounded = []
    for line in (await sandbox.sh("cat /proc/self/mountinfo")).splitlines():
        fields = line.split()
        sep = fields.index("-")
        point, options = fields[4], fields[5].split(",")
        fstype, source, super_options = fields[sep + 1], fields[sep + 2], fields[sep + 3]
        if "ro" in options or fstype in ("proc", "sysfs", "devpts", "mqueue", "cgroup"):
            continue
        if fstype == "overlay" and point == "/":
            continue
        if fstype == "tmpfs" and "size=" in super_options:
            continue
        if fstype == "devtmpfs" and point in (
            "/dev/null",
            "/dev/zero",
            "/dev/full",
            "/dev/tty",
            "/dev/random",
            "/dev/urandom",
        ):
            continue  # device nodes: writes go to the device, not to a file
        if fstype == "ext4" and source.startswith("/dev/loop"):
            continue
        if runtime == "gvisor" and (
            (fstype == "9p" and point in GVISOR_GOFER_MOUNTS) or fstype in ("tmpfs", "dev")
        ):
            continue
        unbounded.append(line)
    assert not unbounded, "writable mounts outside the quota:\n" + "\n".join(unbounded)
