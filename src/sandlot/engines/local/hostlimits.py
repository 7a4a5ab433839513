"""What the host has, in the units sandboxes are limited in: disk, memory, pids, file handles.

Read from statvfs, ``/proc/meminfo``, ``/proc/loadavg``, ``kernel.pid_max``, ``fs.file-nr`` and
``fs.file-max``: a few hundred microseconds in all, cheap enough for every create.

Two host-wide guards are set here too, both only ever loosened towards what protects the host:

- **File handles are memory.** The memory cgroup charges every ``struct file`` to the sandbox
  that opened it (measured on this cgroup v1 host: ~222 bytes of kernel memory per
  ``open()``, 400 per eventfd, 1,230 per pipe end; kmem is charged with the rest of the
  memory, and v1's separate ``memory.kmem.limit_in_bytes`` is ignored by this kernel). So a
  sandbox's handles are bounded by its memory limit -- but the kernel's own count,
  ``fs.file-max``, is sized at boot to one handle per 10 KiB of RAM (2.47M here), and a
  micro sandbox's 512 MiB can pin 2.4M handles, after which every unprivileged process on
  the host gets ENFILE. :func:`raise_file_max` lifts ``fs.file-max`` to what the host's memory
  can pin (as systemd does at boot on most distributions), so the memory limits, which are
  charged to each sandbox, are the bound that counts.
- **Pids are shared by all sandboxes.** Each sandbox has its own pids limit, but they are not
  bounded together (an xlarge asks for 8,192 of a ``pid_max`` of 32,768).
  :func:`cap_sandbox_pids` sets the parent cgroup's pids limit to ``pid_max`` less the
  host's reserve, so whatever the sandboxes do together, the host can still fork.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sandlot.engines.local.cgroups import CGROUP_PARENT, CGROUP_ROOT, CgroupLayout

log = logging.getLogger("sandlot.engine")

#: Kernel memory per open file, in bytes, at the cheapest (``open()`` of an existing file:
#: 222 measured; a round number below it so estimates err towards more handles).
FILE_KMEM_BYTES = 200


@dataclass(frozen=True)
class HostRoom:
    """Totals, and what is in use right now, host-wide."""

    disk_total: int
    disk_free: int
    memory_total: int
    memory_available: int
    pid_max: int
    tasks: int
    file_max: int
    files: int


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            out[name] = int(rest.split()[0]) * 1024
    return out


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


def measure(state_dir: Path) -> HostRoom:
    vfs = os.statvfs(state_dir)
    mem = _meminfo()
    with open("/proc/loadavg") as f:
        tasks = int(f.read().split()[3].split("/")[1])  # every thread on the host
    with open("/proc/sys/fs/file-nr") as f:
        allocated, _free, file_max = (int(x) for x in f.read().split())
    return HostRoom(
        disk_total=vfs.f_blocks * vfs.f_frsize,
        disk_free=vfs.f_bavail * vfs.f_frsize,
        memory_total=mem["MemTotal"],
        memory_available=mem.get("MemAvailable", mem["MemFree"]),
        pid_max=_read_int("/proc/sys/kernel/pid_max"),
        tasks=tasks,
        file_max=file_max,
        files=allocated,
    )


def raise_file_max() -> int:
    """Lift ``fs.file-max`` to the number of handles the host's memory can pin (never lower
    it); return the value in force."""
    wanted = _meminfo()["MemTotal"] // FILE_KMEM_BYTES
    current = _read_int("/proc/sys/fs/file-max")
    if current >= wanted:
        return current
    try:
        with open("/proc/sys/fs/file-max", "w") as f:
            f.write(str(wanted))
    except OSError as exc:  # e.g. a read-only /proc/sys in a container
        log.warning("cannot raise fs.file-max from %d to %d: %s", current, wanted, exc)
        return current
    log.info(
        "raised fs.file-max from %d to %d (file handles are charged to memory)", current, wanted
    )
    return wanted


def sandbox_pids_parent(layout: CgroupLayout) -> Path:
    if layout is CgroupLayout.V2:
        return CGROUP_ROOT / CGROUP_PARENT
    return CGROUP_ROOT / "pids" / CGROUP_PARENT


def cap_sandbox_pids(layout: CgroupLayout, limit: int) -> bool:
    """Limit every sandbox's pids together to ``limit`` (the parent cgroup's ``pids.max``).
    False if this host's layout does not allow it (then each sandbox's own limit stands)."""
    parent = sandbox_pids_parent(layout)
    try:
        parent.mkdir(exist_ok=True)
        if layout is CgroupLayout.V2:
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / "cgroup.subtree_control").write_text("+pids")
        (parent / "pids.max").write_text(str(limit))
    except OSError as exc:
        log.warning("cannot bound all sandboxes' pids together: %s", exc)
        return False
    return True


def grantable_open_files() -> int | None:
    """RLIMIT_NOFILE above our own hard limit needs CAP_SYS_RESOURCE (some hosts, containers
    among them, withhold it from root): then that hard limit is the most a sandbox can get."""
    import resource

    try:
        cap_eff = next(
            int(line.split()[1], 16)
            for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("CapEff:")
        )
    except (OSError, StopIteration, ValueError):
        cap_eff = 0
    cap_sys_resource = 24
    if cap_eff & (1 << cap_sys_resource):
        return None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else hard
