"""The output pump in-process: the pidfd-less fallback (seccomp may forbid pidfd_open) and
the drain rules after the shell exits."""

from __future__ import annotations

import os
import time

import pytest

from sandlot.agent import commands


def _run(cmd: str, **kwargs: object) -> tuple[bytes, bytes, int, float]:
    proc = commands.spawn(cmd, "/", None, base_env=dict(os.environ))
    out = {"stdout": b"", "stderr": b""}

    def sink(stream: str, data: bytes) -> None:
        out[stream] += data

    t0 = time.monotonic()
    try:
        commands.pump(proc, sink, **kwargs)  # type: ignore[arg-type]
    finally:
        commands.kill_group(proc.pid)  # children left behind by the command
    assert proc.returncode is not None
    return out["stdout"], out["stderr"], proc.returncode, time.monotonic() - t0


@pytest.mark.parametrize("pidfd", [True, False])
def test_pump_with_and_without_pidfd(monkeypatch: pytest.MonkeyPatch, pidfd: bool) -> None:
    if not pidfd:

        def refuse(pid: int, flags: int = 0) -> int:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "pidfd_open", refuse)
    for _ in range(5):
        out, err, rc, elapsed = _run("echo a; echo b >&2; exit 3")
        assert (out, err, rc) == (b"a\n", b"b\n", 3)
        assert elapsed < 0.5
    # pipes closed early, shell still running: the exit is still noticed promptly
    out, _, rc, elapsed = _run("exec >&- 2>&-; sleep 0.2; exit 5")
    assert rc == 5 and elapsed < 1.0


def test_drain_stops_after_the_shell_when_children_hold_the_pipes() -> None:
    out, _, rc, elapsed = _run("(sleep 3; echo late) & echo early")
    assert (out, rc) == (b"early\n", 0)
    assert elapsed < 1.0


def test_drain_max_none_reads_until_the_pipes_close() -> None:
    exits: list[int] = []
    out, _, rc, elapsed = _run(
        "(sleep 0.3; echo late) & echo early", drain_max=None, on_exit=exits.append
    )
    assert out == b"early\nlate\n" and rc == 0 and exits == [0]
    assert elapsed >= 0.25
