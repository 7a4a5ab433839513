"""Keep the sandbox's own OOM killer off its pid 1 and its agent.

A memory hog above the instance's limit makes the kernel kill a process of the sandbox's memory
cgroup, the one with the highest badness (its memory plus ``oom_score_adj``). Unprotected, the
agent (~11 MiB) goes first once the sandbox's commands are many small processes, and pid 1
going would end the sandbox.

Two layers:

- Every command the agent starts gets ``oom_score_adj`` 1000 (``sandlot.agent.commands``):
  raising it needs no privilege, and a command can lower it back only to 0 (the floor,
  ``oom_score_adj_min``, is 0 unless a holder of ``CAP_SYS_RESOURCE`` on the host set it), so
  commands are always chosen before the agent and pid 1, which keep 0. This works everywhere.
- Where host root holds ``CAP_SYS_RESOURCE`` (in the initial user namespace; root in a sandbox
  never does), :func:`protect_init` also sets pid 1's (and so the agent's) to -1000: never
  chosen. Written through the legacy ``/proc/PID/oom_adj`` on purpose: -17 there means -1000
  but, unlike a write of ``oom_score_adj``, leaves the floor at 0, so no command can claim
  -1000 for itself. On hosts whose root lacks the capability (this one: ``CapEff`` without
  bit 24, the write fails with EACCES) only the first layer applies.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

#: The legacy ``oom_adj`` value that means ``oom_score_adj`` -1000.
OOM_DISABLE = -17


def protect(pids: list[int]) -> list[int]:
    """Make the OOM killer pass over ``pids``; return those it could not be done for (gone,
    or a kernel without the legacy file)."""
    failed = []
    for pid in pids:
        try:
            Path(f"/proc/{pid}/oom_adj").write_text(str(OOM_DISABLE))
        except OSError:
            failed.append(pid)
    return failed


def children(pid: int) -> list[int]:
    """The children of ``pid`` (all its threads'), as the host sees them."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def protect_init(pid: int) -> None:
    """Protect a sandbox's pid 1 (host pid ``pid``) and whatever it forked already (its agent,
    if pid 1 was quicker than us). A fork that started before the write and shows up in
    ``children`` only after the read escapes (the commands it starts are at 1000 anyway),
    and every later agent inherits pid 1's value."""
    protect([pid])
    protect(children(pid))
