"""Instance types: Koyeb's names and sizes, shared by the SDK (validation) and the engines
(limits)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_INSTANCE_TYPE = "micro"


@dataclass(frozen=True)
class InstanceType:
    name: str
    vcpu: float
    memory_mb: int
    #: Most processes/threads the sandbox may hold at once (fork bombs stop here).
    pids: int
    #: RLIMIT_NOFILE for every process in the sandbox.
    open_files: int
    #: Quota on the sandbox's writable layer, in MiB.
    disk_mb: int

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * 1024 * 1024


INSTANCE_TYPES: dict[str, InstanceType] = {
    t.name: t
    for t in (
        InstanceType("nano", 0.25, 256, pids=256, open_files=1024, disk_mb=1024),
        InstanceType("micro", 0.5, 512, pids=512, open_files=4096, disk_mb=2048),
        InstanceType("small", 1.0, 1024, pids=1024, open_files=8192, disk_mb=4096),
        InstanceType("medium", 2.0, 2048, pids=2048, open_files=16384, disk_mb=8192),
        InstanceType("large", 4.0, 4096, pids=4096, open_files=32768, disk_mb=16384),
        InstanceType("xlarge", 8.0, 8192, pids=8192, open_files=65536, disk_mb=32768),
    )
}


class UnknownInstanceTypeError(ValueError):
    """Raised for an instance type name that is not one of :data:`INSTANCE_TYPES`."""


def get_instance_type(name: str) -> InstanceType:
    try:
        return INSTANCE_TYPES[name]
    except KeyError:
        known = ", ".join(INSTANCE_TYPES)
        raise UnknownInstanceTypeError(
            f"unknown instance_type {name!r}; expected one of: {known}"
        ) from None
