"""Per-project quotas: one token (one project) must not take the whole host.

Before: a project could hold as many sandboxes, as much memory, CPU and disk as the host would
give. Now an administrator sets a project's limits (``sandlot quota set``, ``PATCH
/v1/quotas/{project}``); every create and warm-pool claim is checked against them, counting
every sandbox the project holds (sleeping ones too), and refused with a 429 that names the
quota and the usage.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.agent_engine import AgentProcessEngine
from support.postgres import fresh_database
from support.server import RunningServer, start_server

from sandlot.engines.base import SandboxInfo, SandboxSpec
from sandlot.server.config import PoolKey
from sandlot.server.control.pools import POOL_PROJECT


class PoolAgentEngine(AgentProcessEngine):
    """The test engine, with pool-mode agents (unclaimed until their first request)."""

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        if spec.pool:
            spec = dataclasses.replace(spec, env={**spec.env, "SANDBOX_AUTH_MODE": "pool"})
        return await super().create(spec)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sl-q-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def servers(database_url: str, short_dir: Path) -> Iterator[tuple[RunningServer, RunningServer]]:
    """The same database behind the admin's Unix socket and a tenants' TCP port."""
    engine = AgentProcessEngine(short_dir / "agents")
    admin = start_server(engine, database_url, unix_path=short_dir / "run" / "s.sock")
    tenants = start_server(engine, database_url, tcp=True)
    yield admin, tenants
    tenants.stop()
    admin.stop()


def tenant(servers: tuple[RunningServer, RunningServer], project: str) -> httpx.Client:
    admin, tenants = servers
    _, value = admin.app.state.control.store.create_token(project, "t")
    return tenants.client(token=value)


def test_max_sandboxes_is_enforced_and_named(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    admin, _ = servers
    with admin.client() as a, tenant(servers, "alpha") as c, tenant(servers, "beta") as other:
        r = a.patch("/v1/quotas/alpha", json={"max_sandboxes": 2})
        assert r.status_code == 200 and r.json()["max_sandboxes"] == 2
        assert c.post("/v1/sandboxes", json={}).status_code == 201
        assert c.post("/v1/sandboxes", json={}).status_code == 201
        r = c.post("/v1/sandboxes", json={})
        assert r.status_code == 429, r.text
        assert r.json()["code"] == "quota_exceeded"
        message = r.json()["error"]
        assert "max_sandboxes quota" in message and "2 in use" in message
        assert "quota is 2" in message
        assert len(c.get("/v1/sandboxes").json()["sandboxes"]) == 2  # nothing half-made
        assert other.post("/v1/sandboxes", json={}).status_code == 201  # other projects: free


def test_sleeping_sandboxes_count_and_sizes_add_up(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    admin, _ = servers
    store = admin.app.state.control.store
    with admin.client() as a, tenant(servers, "alpha") as c:
        limits = {"memory_mb": 1024, "vcpu": 1, "disk_mb": 8192}
        assert a.patch("/v1/quotas/alpha", json=limits).status_code == 200
        first = c.post("/v1/sandboxes", json={"instance_type": "micro"}).json()
        store.update_sandbox(first["id"], status="sleeping", sleep_kind="deep")  # asleep: counts
        assert c.post("/v1/sandboxes", json={"instance_type": "micro"}).status_code == 201
        r = c.post("/v1/sandboxes", json={"instance_type": "nano"})
        assert r.status_code == 429
        assert "memory quota: 1024 MiB in use" in r.json()["error"]
        assert "needs 256 MiB more" in r.json()["error"]
        usage = c.get("/v1/quotas/alpha").json()
        assert usage["usage"] == {"sandboxes": 2, "memory_mb": 1024, "vcpu": 1.0, "disk_mb": 4096}
        # CPU is checked too, and a freed sandbox makes room again.
        assert a.patch("/v1/quotas/alpha", json={"memory_mb": None, "vcpu": 1}).status_code == 200
        r = c.post("/v1/sandboxes", json={"instance_type": "nano"})
        assert r.status_code == 429 and "cpu quota" in r.json()["error"]
        assert c.delete(f"/v1/sandboxes/{first['id']}").status_code == 200
        assert c.post("/v1/sandboxes", json={"instance_type": "nano"}).status_code == 201


def test_parallel_creates_cannot_overshoot(servers: tuple[RunningServer, RunningServer]) -> None:
    admin, _ = servers
    with admin.client() as a:
        assert a.patch("/v1/quotas/alpha", json={"max_sandboxes": 2}).status_code == 200
    codes: list[int] = []
    clients = [tenant(servers, "alpha") for _ in range(6)]

    def create(client: httpx.Client) -> None:
        codes.append(client.post("/v1/sandboxes", json={}).status_code)

    threads = [threading.Thread(target=create, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    assert sorted(codes) == [201, 201, 429, 429, 429, 429]


def test_usage_is_shown_to_admins_and_tenants(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    admin, _ = servers
    with admin.client() as a, tenant(servers, "alpha") as c, tenant(servers, "beta") as b:
        assert a.patch("/v1/quotas/alpha", json={"max_sandboxes": 5}).status_code == 200
        assert b.post("/v1/sandboxes", json={"instance_type": "small"}).status_code == 201
        everyone = {q["project"]: q for q in a.get("/v1/quotas").json()["quotas"]}
        assert set(everyone) == {"alpha", "beta"}
        assert everyone["beta"]["max_sandboxes"] is None  # no quota: unlimited
        assert everyone["beta"]["usage"]["memory_mb"] == 1024
        own = c.get("/v1/quotas").json()["quotas"]
        assert [q["project"] for q in own] == ["alpha"]  # a tenant sees only its own
        assert a.delete("/v1/quotas/alpha").status_code == 200
        assert a.delete("/v1/quotas/alpha").status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"max_sandboxes": -1},
        {"max_sandboxes": "3"},
        {"memory_mb": 1.5},
        {"vcpu": "4"},
        {"disk": 3},
        [],
    ],
)
def test_bad_quota_input_is_a_clear_error(
    servers: tuple[RunningServer, RunningServer], body: Any
) -> None:
    admin, _ = servers
    with admin.client() as a:
        r = a.patch("/v1/quotas/alpha", json=body)
        assert r.status_code == 400 and r.json()["error"]
        assert a.get("/v1/quotas/alpha").json()["max_sandboxes"] is None
        r = a.patch("/v1/quotas/no%20such", json={"max_sandboxes": 1})
        assert r.status_code == 400 and "project name" in r.json()["error"]


def test_warm_pool_claim_is_counted(short_dir: Path) -> None:
    engine = PoolAgentEngine(short_dir / "agents")
    srv = start_server(
        engine,
        f"sqlite:///{short_dir / 'pool.db'}",
        unix_path=short_dir / "run" / "s.sock",
        pools={PoolKey("default", "micro"): 1},
    )
    store = srv.app.state.control.store
    try:
        with srv.client(project="alpha") as c:
            assert c.patch("/v1/quotas/alpha", json={"max_sandboxes": 1}).status_code == 200
            wait_for_pool(store)
            first = c.post("/v1/sandboxes", json={})
            assert first.status_code == 201
            assert first.json()["id"] in engine.specs and engine.specs[first.json()["id"]].pool
            wait_for_pool(store)  # a ready pooled sandbox is there to claim ...
            r = c.post("/v1/sandboxes", json={})
            assert r.status_code == 429 and "max_sandboxes" in r.json()["error"]  # ... refused
            assert len(store.sandboxes_with_status(["pooled"])) == 1  # and left in the pool
    finally:
        srv.stop()


def wait_for_pool(store: Any) -> None:
    import time

    deadline = time.monotonic() + 60
    while not [r for r in store.sandboxes_with_status(["pooled"]) if r.project == POOL_PROJECT]:
        assert time.monotonic() < deadline, "the warm pool did not fill"
        time.sleep(0.05)


def test_replicas_sharing_postgresql_cannot_overshoot(postgres_url: str, short_dir: Path) -> None:
    """Two servers on one database (each with its own in-process lock): the quota row's lock
    is what serialises them."""
    from sandlot.server.control.store import QuotaExceeded, Store
    from sandlot.server.control.tables import SandboxRow, utcnow

    url = fresh_database(postgres_url)
    key = short_dir / "shared.key"
    key.write_bytes(os.urandom(32))
    replicas = [Store(url, key), Store(url, key)]
    replicas[0].set_quota("alpha", max_sandboxes=3)
    results: list[str] = []

    def add(store: Store, i: int) -> None:
        now = utcnow()
        row = SandboxRow(
            id=f"r{i:02d}",
            project="alpha",
            name=f"r{i}",
            status="running",
            image="default",
            instance_type="micro",
            region="local",
            created_at=now,
            updated_at=now,
        )
        try:
            store.add_sandbox(row, check_quota=True)
            results.append("ok")
        except QuotaExceeded:
            results.append("refused")

    threads = [threading.Thread(target=add, args=(replicas[i % 2], i)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(results) == ["ok"] * 3 + ["refused"] * 7
        assert replicas[1].usage("alpha").sandboxes == 3
    finally:
        for store in replicas:
            store.close()
