"""``sandlot server --runtime``: the runtime of creates that name none; a create that names one
gets it whatever the default."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agent_engine import AgentProcessEngine
from support.server import RunningServer, start_server


@pytest.fixture
def gvisor_default(
    engine: AgentProcessEngine, database_url: str, short_dir: Path
) -> Iterator[RunningServer]:
    srv = start_server(
        engine, database_url, unix_path=short_dir / "run" / "s.sock", default_runtime="gvisor"
    )
    try:
        yield srv
    finally:
        srv.stop()


def test_the_default_applies_to_creates_that_name_none(
    gvisor_default: RunningServer, engine: AgentProcessEngine
) -> None:
    with gvisor_default.client() as c:
        made = c.post("/v1/sandboxes", json={})
        assert made.status_code == 201, made.text
        assert made.json()["runtime"] == "gvisor"
        assert engine.specs[made.json()["id"]].runtime == "gvisor"
        named = c.post("/v1/sandboxes", json={"runtime": "crun"})
        assert named.json()["runtime"] == "crun"
        assert engine.specs[named.json()["id"]].runtime == "crun"
        listed = {s["id"]: s["runtime"] for s in c.get("/v1/sandboxes").json()["sandboxes"]}
        assert listed == {made.json()["id"]: "gvisor", named.json()["id"]: "crun"}


def test_a_crun_server_is_unchanged(server: RunningServer, engine: AgentProcessEngine) -> None:
    with server.client() as c:
        made = c.post("/v1/sandboxes", json={"block_network": False})
        assert made.status_code == 201, made.text
        assert made.json()["runtime"] == "crun"
