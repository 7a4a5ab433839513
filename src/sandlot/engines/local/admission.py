"""Admission: a sandbox is created only when what it may use fits what the host has left.

Each sandbox is promised a disk (its quota), memory, pids and -- through those -- file handles
(``pids x RLIMIT_NOFILE``, and no more than its memory can pin: see :mod:`.hostlimits`). Two
policies, a server setting (``sandlot server --overcommit``):

- ``allow`` (the default): promises may add up to more than the host has, as sparse disks and
  memory limits always allowed; but a create is admitted only if *its own* promise fits in what
  is free right now, less the host's reserve (10 % of each total by default, ``--reserve``).
  Memory is not checked (overcommitted as before). A full disk then refuses creates (507) rather
  than failing them half-way, and one sandbox can never be promised the host's last pids or
  file handles.
- ``none``: nothing is overcommitted. Disks are preallocated (``fallocate``: a sandbox under its
  quota can always write, even on a full host disk), and the sum of the memory, pids and file
  handles promised to every sandbox stays within the host's totals less the reserve.

A refusal is :class:`~sandlot.engines.base.InsufficientResources` naming the resource (the
server answers 507 for disk, 503 for the rest). Measured cost per create: 0.15 ms in ``allow``
(a statvfs and four /proc reads); ``none`` adds a read of every sandbox's ``meta.json`` (as the
slot allocation already does) and the disk preallocation (1 ms for 1 GiB, see disks.py).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sandlot.engines.base import InsufficientResources
from sandlot.engines.local import hostlimits
from sandlot.instance_types import InstanceType

#: Fraction of each host total kept out of every sandbox's reach.
DEFAULT_RESERVE = 0.10
_GIB = 1024**3


class Overcommit(enum.StrEnum):
    ALLOW = "allow"
    NONE = "none"


@dataclass(frozen=True)
class Claim:
    """What one sandbox is promised."""

    disk: int
    memory: int
    pids: int
    files: int


def claim_of(instance_type: InstanceType, max_open_files: int | None) -> Claim:
    nofile = instance_type.open_files
    if max_open_files is not None:
        nofile = min(nofile, max_open_files)
    files = min(
        instance_type.pids * nofile, instance_type.memory_bytes // hostlimits.FILE_KMEM_BYTES
    )
    return Claim(
        disk=instance_type.disk_mb * 1024 * 1024,
        memory=instance_type.memory_bytes,
        pids=instance_type.pids,
        files=files,
    )


def _refuse(resource: str, name: str, wanted: str, left: str, policy: str) -> InsufficientResources:
    return InsufficientResources(
        resource,
        f"not enough {resource} on this host for a {name} sandbox: it is promised {wanted}, "
        f"{left} {policy} (server options --overcommit and --reserve)",
    )


class Admission:
    def __init__(
        self,
        state_dir: Path,
        overcommit: Overcommit = Overcommit.ALLOW,
        reserve: float = DEFAULT_RESERVE,
    ) -> None:
        if not 0 <= reserve < 1:
            raise ValueError(f"the reserve is a fraction of the host (0 to 0.99), not {reserve}")
        self.state_dir = state_dir
        self.overcommit = Overcommit(overcommit)
        self.reserve = reserve
        self._lock = threading.Lock()
        #: Admitted creates still in progress: their disks may not be taken yet.
        self._pending: dict[str, Claim] = {}

    def admit(
        self, sandbox_id: str, name: str, claim: Claim, promised: Iterable[tuple[str, Claim]]
    ) -> None:
        """Admit the create of ``sandbox_id`` (``promised``: every other sandbox's claim, by
        id; only read with ``--overcommit none``) or raise InsufficientResources. Call
        :meth:`done` when the create has finished, whatever its outcome."""
        with self._lock:
            room = hostlimits.measure(self.state_dir)
            r = self.reserve
            pending = [c for i, c in self._pending.items() if i != sandbox_id]
            disk_left = room.disk_free - int(room.disk_total * r) - sum(c.disk for c in pending)
            if claim.disk > disk_left:
                raise _refuse(
                    "disk",
                    name,
                    _gib(claim.disk),
                    f"{_gib(max(disk_left, 0))} is free",
                    f"beyond the {r:.0%} reserve",
                )
            if self.overcommit is Overcommit.NONE:
                others = [c for i, c in promised if i != sandbox_id and i not in self._pending]
                others += pending
                checks: tuple[tuple[str, int, int, int, Callable[[int], str]], ...] = (
                    (
                        "memory",
                        claim.memory,
                        sum(c.memory for c in others),
                        room.memory_total,
                        _gib,
                    ),
                    ("pids", claim.pids, sum(c.pids for c in others), room.pid_max, str),
                    ("file handles", claim.files, sum(c.files for c in others), room.file_max, str),
                )
                for resource, wanted, already, host_total, show in checks:
                    limit = int(host_total * (1 - r))
                    if already + wanted > limit:
                        raise _refuse(
                            resource,
                            name,
                            show(wanted),
                            f"{show(already)} of the host's {show(limit)} is promised to other "
                            "sandboxes",
                            f"(--overcommit none, {r:.0%} reserve)",
                        )
            else:
                for resource, wanted, left in (
                    ("pids", claim.pids, int(room.pid_max * (1 - r)) - room.tasks),
                    ("file handles", claim.files, int(room.file_max * (1 - r)) - room.files),
                ):
                    if wanted > left:
                        raise _refuse(
                            resource,
                            name,
                            str(wanted),
                            f"{max(left, 0)} are free",
                            f"beyond the {r:.0%} reserve",
                        )
            self._pending[sandbox_id] = claim

    def done(self, sandbox_id: str) -> None:
        with self._lock:
            self._pending.pop(sandbox_id, None)


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"
