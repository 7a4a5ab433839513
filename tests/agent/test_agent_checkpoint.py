"""The agent around a gVisor checkpoint (sandlot.agent.checkpoint): with a pid file, SIGUSR1
closes its listener and every connection and removes its socket file last; SIGUSR2 binds a new
socket at the same path, which serves as before (the secret and processes kept). Without the pid
file the signals keep their default action (the agent ends)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from agentlib import start_agent


def _wait(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_park_closes_every_socket_then_listen_serves_again(tmp_path: Path) -> None:
    pid_file = tmp_path / "agent.pid"
    agent = start_agent(tmp_path, env={"SANDLOT_AGENT_PID_FILE": str(pid_file)})
    try:
        _wait(pid_file.exists)  # written once the signals are handled, after the socket
        assert int(pid_file.read_text()) == agent.proc.pid
        assert (pid_file.stat().st_mode & 0o777) == 0o600
        with agent.client() as c:
            started = c.post("/start_process", json={"cmd": "sleep 600"}).json()
        idle = agent.raw()  # a keep-alive connection the checkpoint must not find open
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        assert b"200" in idle.recv(4096)
        os.kill(agent.proc.pid, signal.SIGUSR1)
        _wait(lambda: not os.path.exists(agent.sock))
        assert idle.recv(4096) == b""  # shut down by the agent before the file went
        idle.close()
        os.kill(agent.proc.pid, signal.SIGUSR2)
        _wait(lambda: os.path.exists(agent.sock))
        with agent.client() as c:
            listed = c.get("/list_processes").json()["processes"]
            assert [p["id"] for p in listed] == [started["id"]]
            assert c.post("/run", json={"cmd": "echo again"}).json()["stdout"] == "again\n"
        assert agent.proc.poll() is None
    finally:
        agent.stop()


def test_without_a_pid_file_the_signals_are_not_handled(tmp_path: Path) -> None:
    agent = start_agent(tmp_path)
    try:
        os.kill(agent.proc.pid, signal.SIGUSR1)
        assert agent.proc.wait(10) == -signal.SIGUSR1
    finally:
        agent.stop()
