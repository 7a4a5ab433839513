"""What a sandbox can read about its host: no state-directory path, no host disk.

Before the fix, ``/proc/self/mountinfo`` named the host's state directory (the bind sources of
``/etc/hosts`` & co, ``/.sandlot/run`` and the runtime, the overlay's lower/upper/work), so did
``readlink /proc/1/fd/1`` (the agent's log), and ``/sys/block``, ``/sys/class/block``,
``/sys/fs/ext4`` and ``/proc/partitions`` listed the host's disks and one loop device per
sandbox.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support.local import IMAGES_DIR, SandboxHandle, create_sandbox
from support.runtimes import engine_state_for_runtimes, runtime_params

from sandlot.engines.local import LocalEngine

pytestmark = [pytest.mark.anyio, pytest.mark.root]


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    """Both runtimes' sandboxes (gVisor's need a state directory every user may search)."""
    with engine_state_for_runtimes("sl-leaks-") as path:
        yield path


@pytest.fixture(params=runtime_params(gvisor_by_default=True))
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def sandbox(engine: LocalEngine, runtime: str) -> AsyncIterator[SandboxHandle]:
    handle = await create_sandbox(engine, runtime=runtime)
    try:
        yield handle
    finally:
        await handle.aclose()


def _host_markers(engine: LocalEngine, sandbox_id: str) -> list[str]:
    state = engine.state_dir
    return sorted(
        {
            str(state),
            str(state.resolve()),
            str(IMAGES_DIR),
            "/var/lib/sandlot",
            "/sandboxes/",
            f"{sandbox_id}/",
        }
    )


async def test_mount_table_names_no_host_path(engine: LocalEngine, sandbox: SandboxHandle) -> None:
    seen = await sandbox.sh(
        "cat /proc/self/mountinfo /proc/self/mounts /proc/1/mountinfo; "
        # pid 1 (sandlot-init) closes its stderr: a missing descriptor is not a failure
        "for p in /proc/1/fd/* /proc/1/cwd /proc/1/exe; do readlink $p || true; done"
    )
    leaked = [m for m in _host_markers(engine, sandbox.id) if m in seen]
    assert not leaked, f"host paths visible inside: {leaked}\n{seen}"


async def test_no_host_disk_is_listed(sandbox: SandboxHandle) -> None:
    host_disks = sorted(os.listdir("/sys/block"))
    assert host_disks  # this host has disks (and loop devices: one per sandbox)
    listings = await sandbox.sh(
        "ls /sys/block /sys/class/block /sys/dev/block /sys/fs/ext4 /sys/class/bdi "
        "/sys/devices/virtual/block 2>/dev/null; "
        "cat /proc/partitions /proc/diskstats 2>/dev/null || true"  # gVisor has neither
    )
    shown = [d for d in host_disks if d in listings]
    assert not shown, f"host disks listed inside: {shown}\n{listings}"
    # nor anywhere else in sysfs, however reached
    names = " -o ".join(f"-name {d}" for d in host_disks)
    found = await sandbox.run(f"find /sys -xdev \\( {names} \\) 2>/dev/null | head -20")
    assert found["stdout"] == "", found["stdout"]
