"""Fixtures for the local engine: real crun sandboxes in a temporary state directory.

Images come from the shared store (the default image is built once by scripts/setup.sh); each
test session builds its own agent runtime and keeps sandboxes, mounts and cgroups under a
temporary directory that is checked empty, and cleaned, at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.local import SandboxHandle

from sandlot.engines.base import SandboxSpec
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
