"""The test engines' process cleanup reaches commands their agents started in sessions of
their own (they outlived their tests before)."""

from __future__ import annotations

import os
import subprocess
import time

from support.proctree import descendants, kill_tree


def test_kill_tree_reaches_a_command_in_its_own_session() -> None:
    parent = subprocess.Popen(
        ["sh", "-c", "setsid sleep 1000 & echo $!; wait"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while os.getsid(child) == os.getsid(parent.pid):  # setsid runs just after the fork
        assert time.monotonic() < deadline, "setsid did not take"
        time.sleep(0.01)
    # now killpg of the parent's group alone would miss it
    assert child in descendants(parent.pid)
    kill_tree(parent.pid)
    parent.wait(30)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{child}") and _state(child) != "Z":
        assert time.monotonic() < deadline, "the command in its own session survived"
        time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"
