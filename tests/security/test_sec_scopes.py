"""Token scopes: what a token holder may ask for beyond its project's ordinary sandboxes.

Before: any API token could create ``privileged=True`` sandboxes (every capability, mounts,
CAP_NET_ADMIN that lifts the egress policy), and tokens had no scopes at all. Now a token is
``normal`` (the default), ``privileged`` (may create privileged sandboxes) or ``admin`` (may
also manage tokens and quotas of every project over TCP); the local socket's owner may do all.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agent_engine import AgentProcessEngine
from support.server import RunningServer, start_server


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sl-sc-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def engine(short_dir: Path) -> AgentProcessEngine:
    return AgentProcessEngine(short_dir / "agents")


@pytest.fixture
def tcp_server(engine: AgentProcessEngine, short_dir: Path) -> Iterator[RunningServer]:
    srv = start_server(engine, f"sqlite:///{short_dir / 'sandlot.db'}", tcp=True)
    yield srv
    srv.stop()


def token(server: RunningServer, project: str, scope: str = "normal") -> str:
    _, value = server.app.state.control.store.create_token(project, "t", scope)
    return str(value)


def test_normal_token_cannot_create_privileged(
    tcp_server: RunningServer, engine: AgentProcessEngine
) -> None:
    with tcp_server.client(token=token(tcp_server, "alpha")) as c:
        r = c.post("/v1/sandboxes", json={"privileged": True})
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "forbidden"
        assert "'privileged' scope" in r.json()["error"]
        assert engine.created == []  # refused before anything was made
        assert c.get("/v1/sandboxes").json()["sandboxes"] == []
        r = c.post("/v1/sandboxes", json={})  # an ordinary one is fine
        assert r.status_code == 201 and r.json()["privileged"] is False


@pytest.mark.parametrize("scope", ["privileged", "admin"])
def test_privileged_scope_may_create_privileged(
    tcp_server: RunningServer, engine: AgentProcessEngine, scope: str
) -> None:
    with tcp_server.client(token=token(tcp_server, "alpha", scope)) as c:
        r = c.post("/v1/sandboxes", json={"privileged": True})
        assert r.status_code == 201, r.text
        assert r.json()["privileged"] is True
        assert engine.specs[r.json()["id"]].privileged is True


def test_only_admin_tokens_manage_tokens_and_quotas(tcp_server: RunningServer) -> None:
    for scope in ("normal", "privileged"):
        with tcp_server.client(token=token(tcp_server, "alpha", scope)) as c:
            assert c.get("/v1/tokens").status_code == 403
            r = c.post("/v1/tokens", json={"project": "alpha", "scope": "admin"})
            assert r.status_code == 403 and "'admin' scope" in r.json()["error"]
            assert c.patch("/v1/quotas/alpha", json={"max_sandboxes": 100}).status_code == 403
            assert c.get("/v1/quotas/beta").status_code == 403  # another project's
            assert c.get("/v1/quotas/alpha").status_code == 200  # its own: readable
    with tcp_server.client(token=token(tcp_server, "ops", "admin")) as c:
        r = c.post("/v1/tokens", json={"project": "beta", "scope": "privileged"})
        assert r.status_code == 201 and r.json()["scope"] == "privileged"
        listed = {t["id"]: t["scope"] for t in c.get("/v1/tokens").json()["tokens"]}
        assert listed[r.json()["id"]] == "privileged"
        assert sorted(listed.values()) == ["admin", "normal", "privileged", "privileged"]
        assert c.patch("/v1/quotas/beta", json={"max_sandboxes": 1}).status_code == 200


def test_bad_scope_is_a_clear_error(tcp_server: RunningServer) -> None:
    with tcp_server.client(token=token(tcp_server, "ops", "admin")) as c:
        r = c.post("/v1/tokens", json={"project": "beta", "scope": "root"})
        assert r.status_code == 400 and "scope" in r.json()["error"]
        assert c.get("/v1/tokens").json()["tokens"][0]["scope"] == "admin"  # nothing added


def test_socket_owner_may_create_privileged(short_dir: Path) -> None:
    engine = AgentProcessEngine(short_dir / "agents2")
    db = f"sqlite:///{short_dir / 'socket.db'}"
    srv = start_server(engine, db, unix_path=short_dir / "run" / "s.sock")
    try:
        with srv.client() as c:
            r = c.post("/v1/sandboxes", json={"privileged": True})
            assert r.status_code == 201 and r.json()["privileged"] is True
            c.delete(f"/v1/sandboxes/{r.json()['id']}")
    finally:
        srv.stop()
