"""Fixtures for the agent tests (helpers live in ``agentlib``).

``agent`` is a fresh agent per test (for tests that look at its processes, descriptors or
exit); ``client`` talks to that agent when the test also asks for ``agent``, and otherwise to
one agent shared by the module (starting ~200 agents would dominate the suite's time).
"""

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


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = start_agent(tmp_path_factory.mktemp("shared-agent"))
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def client(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    name = "agent" if "agent" in request.fixturenames else "shared_agent"
    target: Agent = request.getfixturevalue(name)
    with target.client() as c:
        yield c
