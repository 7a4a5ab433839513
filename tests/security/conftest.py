"""The standing security suite: each attack a tenant (an API token holder), a local user or code
inside a sandbox has tried against sandlot, sent again on every run.

Each topic lives in its own ``test_sec_<topic>.py`` with the fixtures it needs, built from
``tests/support`` (real servers, real sandboxes); long variants are marked ``slow``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
