"""Fixtures for the local engine: real crun sandboxes in a temporary state directory.

Images come from the shared store (the default image is built once by scripts/setup.sh); each
test session builds its own agent runtime and keeps sandboxes, mounts and cgroups under a
temporary directory that is checked empty, and cleaned, at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandlot.engines.base import SandboxInfo, SandboxSpec
from sandlot.engines.local import LocalEngine, new_sandbox_id
from sandlot.engines.local.mounts import mounts_under, unmount
from sandlot.images.store import default_store
from sandlot.instance_types import get_instance_type


@pytest.fixture(scope="session")
def engine_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state = tmp_path_factory.mktemp("engine-state")
    yield state
    for point in mounts_under(state):
        unmount(point)


@pytest.fixture
async def engine(engine_state: Path) -> AsyncIterator[LocalEngine]:
    if os.geteuid() != 0 or shutil.which("crun") is None:
        pytest.skip("the local engine needs root and crun (CI runs as root with crun installed)")
    eng = LocalEngine(engine_state, images=default_store())
    yield eng
    for info in await eng.list():
        await eng.delete(info.id)


class SandboxHandle:
    """A sandbox plus a client for its agent (straight over the Unix socket)."""

    def __init__(self, info: SandboxInfo, secret: str) -> None:
        self.info = info
        self.id = info.id
        assert info.agent_address.unix_path
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=info.agent_address.unix_path),
            base_url="http://agent",
            headers={"Authorization": f"Bearer {secret}"},
            timeout=30,
        )

    async def wait_healthy(self, timeout: float = 10) -> float:
        start = time.perf_counter()
        while True:
            try:
                r = await self.client.get("/health")
                if r.status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"agent of {self.id} not healthy after {timeout}s")
            await asyncio.sleep(0.005)

    async def run(self, cmd: str, **extra: Any) -> dict[str, Any]:
        r = await self.client.post("/run", json={"cmd": cmd, **extra})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def sh(self, cmd: str) -> str:
        """Run and return stdout, asserting success."""
        out = await self.run(cmd)
        assert out["code"] == 0, out
        return str(out["stdout"])

    async def aclose(self) -> None:
        await self.client.aclose()


Factory = Callable[..., Any]


@pytest.fixture
async def make_sandbox(engine: LocalEngine) -> AsyncIterator[Factory]:
    handles: list[SandboxHandle] = []

    async def make(
        image: str = "default", instance_type: str = "micro", **kw: Any
    ) -> SandboxHandle:
        secret = "test-secret-" + new_sandbox_id()
        spec = SandboxSpec(
            id=new_sandbox_id(),
            image=image,
            instance_type=get_instance_type(instance_type),
            secret=secret,
            **kw,
        )
        info = await engine.create(spec)
        handle = SandboxHandle(info, secret)
        handles.append(handle)
        await handle.wait_healthy()
        return handle

    yield make
    for h in handles:
        await h.aclose()
        await engine.delete(h.id)
