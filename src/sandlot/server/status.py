"""A sandbox's status, as the server records it (the ``status`` column) and the API shows it.

The values an engine reports for a running container (:class:`sandlot.engines.base.SandboxState`:
creating, running, paused, stopped, error) are the same strings where they overlap; the server
adds its own: ``sleeping`` (light or deep, see :mod:`.control.lifecycle`), ``deleted``, and the
warm pools' ``pooling``, ``pooled`` and ``claiming`` (:mod:`.control.pools`). A ``StrEnum``: the
database and the wire keep plain strings.
"""

from __future__ import annotations

import enum

from sandlot.engines.base import SandboxState


class SandboxStatus(enum.StrEnum):
    CREATING = SandboxState.CREATING.value
    RUNNING = SandboxState.RUNNING.value
    PAUSED = SandboxState.PAUSED.value
    ERROR = SandboxState.ERROR.value
    SLEEPING = "sleeping"
    DELETED = "deleted"
    #: Warm pools: being made, ready and unclaimed, being claimed by a create.
    POOLING = "pooling"
    POOLED = "pooled"
    CLAIMING = "claiming"


#: Statuses whose sandbox has an agent the gateway may reach (waking it if it sleeps).
LIVE_STATUSES = (
    SandboxStatus.CREATING,
    SandboxStatus.RUNNING,
    SandboxStatus.PAUSED,
    SandboxStatus.SLEEPING,
)


class SnapshotStatus(enum.StrEnum):
    """Koyeb's snapshot statuses (``koyeb.sandbox.SnapshotStatus``); sandlot's snapshots are
    ``creating`` while their files are copied, then ``available`` or ``failed``, and
    ``deleted`` once removed (a local copy has no ``uploading`` step)."""

    INVALID = "invalid"
    CREATING = "creating"
    UPLOADING = "uploading"
    AVAILABLE = "available"
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"
