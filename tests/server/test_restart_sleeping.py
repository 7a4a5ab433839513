"""Right after a (re)start, the server knows which sandboxes sleep before it serves anything:
a request arriving before the lifecycle's first check must wake a sleeping sandbox, not be
forwarded to an agent that is not running (a 502 "connection refused" was seen in CI)."""

from __future__ import annotations

import pytest
from support.agent_engine import AgentProcessEngine
from support.server import RunningServer

from sandlot.server.api.app import create_app
from sandlot.server.config import ServerConfig


@pytest.mark.anyio
async def test_sleeping_sandboxes_are_known_before_the_first_request(
    server: RunningServer, engine: AgentProcessEngine, database_url: str
) -> None:
    with server.client() as c:
        created = c.post("/v1/sandboxes", json={"name": "napper"})
        assert created.status_code == 201, created.text
    sandbox_id = created.json()["id"]
    store = server.app.state.control.store
    store.update_sandbox(sandbox_id, status="sleeping", sleep_kind="deep")
    # A second server on the same database, as after a restart.
    app = create_app(
        ServerConfig(
            database_url=database_url,
            engines={"local": engine},
            default_region="local",
            auth="socket",
            public_url="http://sandlot",
        )
    )
    async with app.router.lifespan_context(app):
        # Nothing awaited since startup ended: the lifecycle's loop has not run a check yet.
        assert sandbox_id in app.state.control.lifecycle._sleeping
