"""``--listen fd:N``: the agent serves on a socket its parent bound (how the engine starts it,
so the socket file lives where the sandbox cannot replace it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from agentlib import SECRET, SRC


def test_agent_serves_an_inherited_listening_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "held-by-parent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    env = {**os.environ, "PYTHONPATH": SRC, "SANDBOX_SECRET": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandlot.agent", "--listen", f"fd:{listener.fileno()}"],
        env=env,
        pass_fds=[listener.fileno()],
        stderr=subprocess.PIPE,
    )
    listener.close()  # the agent holds it now
    try:
        # Connections made before the agent is up wait in the backlog: no readiness polling.
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=path),
            base_url="http://a",
            headers={"Authorization": f"Bearer {SECRET}"},
            timeout=10,
        ) as c:
            assert c.get("/health").json() == {"status": "ok"}
            out = c.post("/run", json={"cmd": "ls /proc/self/fd | wc -l"}).json()
            # the listening socket is not passed on to commands (only 0, 1, 2 and ls's own)
            assert int(out["stdout"]) <= 4
    finally:
        proc.terminate()
        proc.wait(10)
    assert os.path.exists(path), "the socket file belongs to the parent, not the agent"


def test_bad_fd_spec_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC, "SANDBOX_SECRET": SECRET}
    for spec in ("fd:x", "fd:987"):
        proc = subprocess.run(
            [sys.executable, "-m", "sandlot.agent", "--listen", spec],
            env=env,
            capture_output=True,
            timeout=10,
        )
        assert proc.returncode != 0
        assert b"cannot listen" in proc.stderr or b"bad listen" in proc.stderr
