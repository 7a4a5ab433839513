"""What the real LocalEngine needs in tests: root, crun/runc, and the host's built images."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from sandlot.engines.base import SandboxInfo
from sandlot.paths import state_dir

#: Built by `python -m sandlot.images build` (.ci/run does it); shared by every test server.
IMAGES_DIR = Path(os.environ.get("SANDLOT_TEST_IMAGES_DIR") or state_dir() / "images")


def local_engine_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the local engine needs root (CI runs as root)"
    if not (shutil.which("crun") or shutil.which("runc")):
        return "needs crun or runc (apt-get install crun)"
    return None


def engine_from_env() -> object:
    """``sandlot server --engine support.local:engine_from_env``: a LocalEngine whose state is
    ``$SANDLOT_TEST_ENGINE_STATE`` and whose images are the host's (for benchmarks and tests
    that need the server in its own process)."""
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore

    return LocalEngine(Path(os.environ["SANDLOT_TEST_ENGINE_STATE"]), images=ImageStore(IMAGES_DIR))


class SandboxHandle:
    """A sandbox plus a client for its agent (straight over the Unix socket)."""

    def __init__(self, info: SandboxInfo, secret: str) -> None:
        self.info = info
        self.id = info.id
        self.secret = secret
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


async def create_sandbox(
    engine: Any, image: str = "default", instance_type: str = "micro", **spec: Any
) -> SandboxHandle:
    """A real sandbox of ``engine`` (a LocalEngine), its agent answering."""
    from sandlot.engines.base import SandboxSpec
    from sandlot.engines.local import new_sandbox_id
    from sandlot.instance_types import get_instance_type

    secret = "test-secret-" + new_sandbox_id()
    info = await engine.create(
        SandboxSpec(
            id=new_sandbox_id(),
            image=image,
            instance_type=get_instance_type(instance_type),
            secret=secret,
            **spec,
        )
    )
    handle = SandboxHandle(info, secret)
    await handle.wait_healthy()
    return handle


async def deep_sleep(engine: Any, handle: SandboxHandle) -> None:
    """Stop the sandbox (every process ends) and start it again; its agent starts afresh."""
    await engine.stop(handle.id)
    await engine.start(handle.id)
    await handle.wait_healthy()
