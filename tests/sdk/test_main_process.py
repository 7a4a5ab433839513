"""The sandbox's main process (Koyeb's entrypoint/command/args): started beside the agent,
restarted when it ends, never started twice when the agent itself restarts."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from sandlot import Sandbox, SandboxRequestError


def _until(check: Callable[[], object], what: str, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # the agent may be restarting: ask again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _mains(sb: Sandbox) -> list[tuple[str, str]]:
    return sorted((p.id, p.status) for p in sb.list_processes() if p.id.startswith("main-"))


def test_main_process_runs_and_is_restarted(api_url: str) -> None:
    with Sandbox.create(
        image="busybox", command="echo started >> /root/log; exec sleep 1000"
    ) as sb:
        assert sb.info["command"].startswith("echo started")
        _until(lambda: _mains(sb) == [("main-1", "running")], "the main process")
        _until(lambda: sb.exec("cat /root/log").stdout == "started\n", "its output")
        sb.kill_process("main-1")
        _until(lambda: ("main-2", "running") in _mains(sb), "its restart")
        assert sb.exec("cat /root/log").stdout == "started\nstarted\n"
        # the agent dies: the new one adopts the running main process instead of a second one
        sb.exec("(sleep 0.3; pkill -9 -f sandlot-agent) >/dev/null 2>&1 &")
        _until(lambda: sb.exec("test -e /proc/self").exit_code == 0, "the agent back")
        time.sleep(2.5)  # longer than the first restart delay: a second start would show
        count = sb.exec("ps -o args | grep -c '^sleep 1000'").stdout.strip()
        assert count == "1"
        assert sb.exec("cat /root/log").stdout == "started\nstarted\n"


def test_entrypoint_command_and_args(api_url: str) -> None:
    with Sandbox.create(
        image="busybox",
        entrypoint=["sh", "-c"],
        command='echo "$0|$1" > /root/argv; exec sleep 1000',
        args=["first arg", "it's second"],
    ) as sb:
        _until(lambda: sb.exec("cat /root/argv").stdout == "first arg|it's second\n", "its argv")


def test_args_alone_are_refused(api_url: str) -> None:
    with pytest.raises(SandboxRequestError, match="args needs"):
        Sandbox.create(image="busybox", args=["x"])
    with pytest.raises(SandboxRequestError, match="list of strings"):
        Sandbox.create(image="busybox", entrypoint="sh -c")  # type: ignore[arg-type]
