from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.agent_engine import AgentProcessEngine
from support.server import RunningServer, start_server


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path for Unix sockets (108-byte limit)."""
    d = Path(tempfile.mkdtemp(prefix="sl-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def engine(short_dir: Path) -> AgentProcessEngine:
    return AgentProcessEngine(short_dir / "sandboxes", slow_seconds=30)


@pytest.fixture
def server(
    engine: AgentProcessEngine, database_url: str, short_dir: Path
) -> Iterator[RunningServer]:
    srv = start_server(engine, database_url, unix_path=short_dir / "run" / "sandlot.sock")
    yield srv
    srv.stop()


@pytest.fixture
def tcp_server(engine: AgentProcessEngine, database_url: str) -> Iterator[RunningServer]:
    srv = start_server(engine, database_url, tcp=True)
    yield srv
    srv.stop()
