"""Fixtures: a real agent process on a Unix socket in a temporary directory.

This direct mode exists for the agent's own tests; in the product the agent only ever runs
inside a sandbox.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

SECRET = "test-secret-0123456789"
SRC = str(Path(__file__).resolve().parents[2] / "src")


class Agent:
    """A running agent and how to reach it."""

    def __init__(
        self, proc: subprocess.Popen[bytes], sock: str, workdir: Path, secret: str | None
    ) -> None:
        self.proc = proc
        self.sock = sock
        self.workdir = workdir
        self.secret = secret

    def client(self, secret: str | None = None, **kwargs: Any) -> httpx.Client:
        token = secret if secret is not None else self.secret
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=self.sock),
            base_url="http://agent",
            headers=headers,
            timeout=kwargs.pop("timeout", 30),
            **kwargs,
        )

    def raw(self, timeout: float = 10) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.sock)
        return s

    def children(self) -> list[int]:
        """Pids whose parent is the agent (zombies included)."""
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                out.append(int(entry))
        return out

    def zombies(self) -> list[int]:
        out = []
        for pid in self.children():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "Z":
                out.append(pid)
        return out

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_agent(
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    secret: str | None = SECRET,
    listen: str | None = None,
) -> Agent:
    sock = str(tmp_path / "agent.sock")
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    full_env["PYTHONPATH"] = SRC
    if secret is not None:
        full_env["SANDBOX_SECRET"] = secret
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandlot.agent", "--listen", listen or f"unix:{sock}"],
        cwd=workdir,
        env=full_env,
        stderr=subprocess.PIPE,
    )
    agent = Agent(proc, sock, workdir, secret)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"agent exited with {proc.returncode}: {err}")
        if listen is None and os.path.exists(sock):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(sock)
                return agent
            except OSError:
                pass  # a stale socket the agent has not replaced yet
            finally:
                probe.close()
        if listen is not None:
            host, _, port = listen[4:].rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=0.2).close()
                return agent
            except OSError:
                pass
        time.sleep(0.005)
    agent.stop()
    raise RuntimeError("agent did not start")


def sse_events(lines: Any) -> list[tuple[str, Any]]:
    """Parse ``event:``/``data:`` pairs from an iterator of SSE lines."""
    import json

    events = []
    name = None
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name or "message", json.loads(line[5:])))
            name = None
    return events
