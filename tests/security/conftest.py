"""The standing security suite: each attack a tenant (an API token holder), a local user or code
inside a sandbox has tried against sandlot, sent again on every run.

Each topic lives in its own ``test_sec_<topic>.py`` with the fixtures it needs, built from
``tests/support`` (real servers, real sandboxes); long variants are marked ``slow``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.local import IMAGES_DIR, local_engine_unavailable

from sandlot.engines.local import LocalEngine
from sandlot.engines.local.mounts import mounts_under, unmount
from sandlot.images.store import ImageStore


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local engine's state directory, one per test module (skips without root and crun);
    whatever its sandboxes left mounted is unmounted at the end."""
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("local-state")
    yield path
    for point in mounts_under(path):
        unmount(point)


@pytest.fixture
async def engine(state: Path) -> AsyncIterator[LocalEngine]:
    """A real local engine over ``state`` (the host's built images); every sandbox it still
    has is deleted afterwards, whatever the test did. A module may define its own ``engine``."""
    eng = LocalEngine(state, images=ImageStore(IMAGES_DIR))
    try:
        yield eng
    finally:
        for info in await eng.list():
            await eng.delete(info.id)
        await eng.close()
