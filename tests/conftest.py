"""Shared pytest configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Fixtures every test directory may use (the store's databases).
pytest_plugins = ["support.database_fixtures"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
