"""DEVELOPMENT STAND-IN -- NOT AN ENGINE TO RUN UNTRUSTED CODE WITH.

``AgentProcessEngine`` implements the :class:`~sandlot.engines.base.Engine` protocol by starting
the real agent (``python -m sandlot.agent``) as a plain host process listening on a Unix socket
in a temporary directory: no namespaces, no cgroups, no isolation at all. It exists only so the
server's own logic (validation, projects, tokens, the gateway, cleanup on failure) can be tested
quickly and without root. End-to-end SDK tests use the real ``LocalEngine``.

Images with special names make it misbehave on purpose:
``fail`` raises ImageError; ``unavailable`` raises EngineUnavailableError; ``slow`` takes
``slow_seconds`` to create; ``never-ready`` returns an agent address nobody listens on.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sandlot.engines.base import (
    AgentAddress,
    EngineUnavailableError,
    ImageError,
    SandboxInfo,
    SandboxNotFound,
    SandboxSpec,
    SandboxState,
)
from support.proctree import kill_tree


class AgentProcessEngine:
    name = "agent-process"

    def __init__(self, root: Path, slow_seconds: float = 30.0) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.slow_seconds = slow_seconds
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        #: Every spec create() was given, by sandbox id.
        self.specs: dict[str, SandboxSpec] = {}

    def _dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        self.specs[spec.id] = spec
        if spec.image == "fail":
            raise ImageError("image 'fail' does not exist")
        if spec.image == "unavailable":
            raise EngineUnavailableError("engine unavailable (test)")
        directory = self._dir(spec.id)
        (directory / "home").mkdir(parents=True)
        self.created.append(spec.id)
        if spec.image == "never-ready":
            return SandboxInfo(
                spec.id, SandboxState.RUNNING, AgentAddress(unix_path=str(directory / "nobody"))
            )
        sock = directory / "agent.sock"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **spec.env}
        env["SANDBOX_SECRET"] = spec.secret
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
        env["HOME"] = str(directory / "home")
        log = open(directory / "agent.log", "wb")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandlot.agent", "--listen", f"unix:{sock}"],
            env=env,
            cwd=directory / "home",
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        self.procs[spec.id] = proc
        if spec.image == "slow":
            await asyncio.sleep(self.slow_seconds)
        return SandboxInfo(
            spec.id, SandboxState.RUNNING, AgentAddress(unix_path=str(sock)), proc.pid
        )

    async def delete(self, sandbox_id: str) -> None:
        self.deleted.append(sandbox_id)
        proc = self.procs.pop(sandbox_id, None)
        if proc is not None:
            kill_tree(proc.pid)  # the agent and the commands it started in their own sessions
            await asyncio.to_thread(proc.wait)
        shutil.rmtree(self._dir(sandbox_id), ignore_errors=True)

    async def pause(self, sandbox_id: str) -> None:
        raise NotImplementedError

    async def resume(self, sandbox_id: str) -> None:
        raise NotImplementedError

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        proc = self.procs.get(sandbox_id)
        if proc is None and not self._dir(sandbox_id).exists():
            raise SandboxNotFound(sandbox_id)
        sock = self._dir(sandbox_id) / "agent.sock"
        return SandboxInfo(sandbox_id, SandboxState.RUNNING, AgentAddress(unix_path=str(sock)))

    async def list(self) -> list[SandboxInfo]:
        return [await self.inspect(i) for i in list(self.procs)]

    async def recover(self) -> list[str]:
        # Its processes are children of the test process: nothing outlives a crash.
        return []

    async def close(self) -> None:
        for sandbox_id in list(self.procs):
            await self.delete(sandbox_id)

    def alive(self) -> list[str]:
        return [i for i, p in self.procs.items() if p.poll() is None]


def from_env() -> AgentProcessEngine:
    """``sandlot server --engine support.agent_engine:from_env``, in $SANDLOT_TEST_AGENTS."""
    return AgentProcessEngine(Path(os.environ["SANDLOT_TEST_AGENTS"]))


def unavailable() -> AgentProcessEngine:
    """An engine factory that fails like the local engine does without root."""
    raise EngineUnavailableError("no runtime here (test)")
