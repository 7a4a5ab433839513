"""The store's two databases as pytest fixtures: ``database_url`` runs a test on SQLite and on
PostgreSQL (a fresh database in one throwaway cluster per session). Import both names into a
conftest or test module to use them; PostgreSQL tests skip where its binaries are missing."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.postgres import APT_PACKAGE, find_bin_dir, fresh_database, postgres_cluster


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL cluster for the whole session (made once: initdb costs seconds)."""
    if find_bin_dir() is None:
        pytest.skip(f"PostgreSQL binaries not found: apt-get install {APT_PACKAGE}")
    with postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty database of each kind, in turn."""
    if request.param == "postgresql":
        yield fresh_database(request.getfixturevalue("postgres_url"))
        return
    directory = Path(tempfile.mkdtemp(prefix="sl-db-"))
    try:
        yield f"sqlite:///{directory / 'sandlot.db'}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)
