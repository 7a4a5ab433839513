"""Build a sandbox's OCI runtime ``config.json`` from typed inputs (never from string templates).

The defaults are the isolation promised in DESIGN.md: every namespace (user namespace included),
Docker's default capability set, seccomp deny-by-default, no_new_privileges, masked and read-only
/proc and /sys paths, a minimal /dev, cgroup limits from the instance type. ``privileged`` widens
capabilities and seccomp explicitly but keeps the user namespace: root inside is never host root.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandlot.engines.local.cgroups import CGROUP_PARENT
from sandlot.engines.local.seccomp import seccomp_profile
from sandlot.instance_types import InstanceType
from sandlot.paths import SANDBOX_CONFIG_DIR, SANDBOX_RUN_DIR, SANDBOX_RUNTIME_DIR

#: Docker's default capability set.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
#: What ``privileged=True`` adds (all of them are scoped to the sandbox's user namespace).
PRIVILEGED_EXTRA_CAPABILITIES = (
    "CAP_DAC_READ_SEARCH",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_PTRACE",
    "CAP_SYS_ADMIN",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TTY_CONFIG",
    "CAP_LEASE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETPCAP",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
)

MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    # The host's disks (and, through its loop devices, how many sandboxes it runs): sysfs and
    # /proc list every block device of the host, whatever the namespaces.
    "/proc/partitions",
    "/proc/diskstats",
    "/sys/block",
    "/sys/class/block",
    "/sys/dev/block",
    "/sys/devices/virtual/block",
    "/sys/class/bdi",
    "/sys/devices/virtual/bdi",
    "/sys/fs/ext4",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

CPU_PERIOD_US = 100_000

#: The files of ``/etc`` every sandbox gets from the platform (bound from its own disk).
ETC_FILES = ("hostname", "hosts", "resolv.conf")


def host_block_device_dirs(sys_root: Path = Path("/sys")) -> tuple[str, ...]:
    """The directories under ``/sys/devices`` that list the host's physical disks by name: the
    parent of each disk's own directory (``.../virtio1/block`` for ``vda``, ``.../nvme0`` for
    ``nvme0n1``). Where they hang depends on the host's buses, so they are found rather than
    listed; virtual devices (loop, zram, ...) are masked as a whole."""
    found: set[str] = set()
    with_class = sys_root / "class" / "block"
    virtual = sys_root / "devices" / "virtual"
    if with_class.is_dir():
        for entry in with_class.iterdir():
            device = entry.resolve()
            if (device / "partition").exists() or device.is_relative_to(virtual):
                continue  # a partition sits inside its disk's directory
            found.add("/sys/" + str(device.parent.relative_to(sys_root)))
    return tuple(sorted(found))


@dataclass(frozen=True)
class SandboxConfig:
    """Typed inputs of one sandbox's OCI config."""

    hostname: str
    args: list[str]
    env: Mapping[str, str]
    cwd: str
    instance_type: InstanceType
    #: First host uid/gid of the sandbox's range (root inside maps to it).
    id_base: int
    id_range: int
    #: The mounted agent runtime (read-only, host-owned).
    runtime_dir: Path
    #: The sandbox's own directory on its disk: ``run/``, ``config/`` and ``etc/`` are bound
    #: from it, so every byte the sandbox writes through them counts against its disk quota.
    own_dir: Path
    cgroup_name: str
    privileged: bool = False
    memory_swap_supported: bool = True
    #: The most open files the host lets us grant (our own hard limit, unless we hold
    #: CAP_SYS_RESOURCE): an instance type's open-files limit is capped to it.
    max_open_files: int | None = None
    #: More paths to mask (see :func:`host_block_device_dirs`).
    extra_masked_paths: tuple[str, ...] = ()
    #: A user namespace made beforehand (owned by the sandbox's own host uid, see
    #: :mod:`.userns`) for the runtime to join; None: the runtime makes one (owned by root).
    userns_path: Path | None = None
    #: A network namespace made beforehand (gVisor's, see :mod:`.gvisor_net`) for the runtime
    #: to join; None: the runtime makes one, holding only ``lo``.
    netns_path: Path | None = None
    #: Whether the runtime honours the seccomp profile's ``errnoRet`` (runsc does not).
    seccomp_errno_ret: bool = True


def _mount(dest: str, typ: str, source: str, options: list[str]) -> dict[str, Any]:
    return {"destination": dest, "type": typ, "source": source, "options": options}


def build_config(cfg: SandboxConfig) -> dict[str, Any]:
    caps = list(DEFAULT_CAPABILITIES)
    if cfg.privileged:
        caps += [c for c in PRIVILEGED_EXTRA_CAPABILITIES if c not in caps]
    it = cfg.instance_type
    nofile = it.open_files if cfg.max_open_files is None else min(it.open_files, cfg.max_open_files)
    memory: dict[str, Any] = {"limit": it.memory_bytes}
    if cfg.memory_swap_supported:
        memory["swap"] = it.memory_bytes  # memory+swap == memory: no swap
    mounts = [
        _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        ),
        _mount(
            "/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
        ),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
        _mount(
            "/sys/fs/cgroup", "cgroup", "cgroup", ["nosuid", "noexec", "nodev", "relatime", "ro"]
        ),
        _mount(
            SANDBOX_RUN_DIR,
            "bind",
            str(cfg.own_dir / "run"),
            ["rbind", "rw", "nosuid", "nodev", "noexec"],
        ),
        _mount(
            SANDBOX_CONFIG_DIR,
            "bind",
            str(cfg.own_dir / "config"),
            ["rbind", "ro", "nosuid", "nodev", "noexec"],
        ),
        *(
            _mount(
                f"/etc/{name}",
                "bind",
                str(cfg.own_dir / "etc" / name),
                ["bind", "rw", "nosuid", "nodev", "noexec"],
            )
            for name in ETC_FILES
        ),
        # Last: no later mount may land over the agent's code.
        _mount(
            SANDBOX_RUNTIME_DIR, "bind", str(cfg.runtime_dir), ["rbind", "ro", "nosuid", "nodev"]
        ),
    ]
    linux: dict[str, Any] = {
        "uidMappings": [{"containerID": 0, "hostID": cfg.id_base, "size": cfg.id_range}],
        "gidMappings": [{"containerID": 0, "hostID": cfg.id_base, "size": cfg.id_range}],
        "namespaces": [
            {"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "user", "cgroup")
        ],
        "resources": {
            "memory": memory,
            "cpu": {"quota": int(it.vcpu * CPU_PERIOD_US), "period": CPU_PERIOD_US},
            "pids": {"limit": it.pids},
            "devices": [{"allow": False, "access": "rwm"}],
        },
        "cgroupsPath": f"/{CGROUP_PARENT}/{cfg.cgroup_name}",
        "maskedPaths": [*MASKED_PATHS, *cfg.extra_masked_paths],
        "readonlyPaths": list(READONLY_PATHS),
        "seccomp": seccomp_profile(privileged=cfg.privileged, errno_ret=cfg.seccomp_errno_ret),
    }
    if cfg.userns_path is not None:
        # Joined, not made: its maps are already written, and the runtime must not write them.
        for ns in linux["namespaces"]:
            if ns["type"] == "user":
                ns["path"] = str(cfg.userns_path)
        del linux["uidMappings"], linux["gidMappings"]
    if cfg.netns_path is not None:
        for ns in linux["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = str(cfg.netns_path)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": cfg.args,
            "env": [f"{k}={v}" for k, v in cfg.env.items()],
            "cwd": cfg.cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": cfg.hostname,
        "mounts": mounts,
        "linux": linux,
    }
