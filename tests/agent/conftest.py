"""Fixtures for the agent tests (helpers live in ``agentlib``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agentlib import Agent, start_agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = start_agent(tmp_path)
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def client(agent: Agent) -> Iterator[httpx.Client]:
    with agent.client() as c:
        yield c
