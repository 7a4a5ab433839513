"""The control API against a real server (Unix socket and TCP), SQLite and PostgreSQL.

Sandboxes come from the development stand-in engine (tests/support/agent_engine.py)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.agent_engine import AgentProcessEngine
from support.server import RunningServer


def create(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/v1/sandboxes", json=body)


def test_socket_permissions(server: RunningServer) -> None:
    assert server.unix_path is not None
    mode = stat.S_IMODE(os.stat(server.unix_path).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.unix_path)).st_mode) == 0o700


def test_create_get_list_delete(server: RunningServer, engine: AgentProcessEngine) -> None:
    with server.client() as c:
        r = create(c, name="first", labels={"team": "a"}, env={"FOO": "bar"})
        assert r.status_code == 201, r.text
        sb = r.json()
        for key in (
            "id",
            "name",
            "status",
            "image",
            "instance_type",
            "region",
            "created_at",
            "labels",
            "sandbox_url",
            "secret",
        ):
            assert key in sb
        assert sb["status"] == "running"
        assert sb["image"] == "default"
        assert sb["instance_type"] == "micro"
        assert sb["region"] == "local"
        assert sb["sandbox_url"].endswith(f"/sandboxes/{sb['id']}/koyeb-sandbox")
        assert len(sb["secret"]) >= 40

        got = c.get(f"/v1/sandboxes/{sb['id']}").json()
        assert got["secret"] == sb["secret"]

        create(c, name="second", labels={"team": "b"})
        names = [s["name"] for s in c.get("/v1/sandboxes").json()["sandboxes"]]
        assert names == ["first", "second"]
        listed = c.get("/v1/sandboxes", params={"name": "first"}).json()["sandboxes"]
        assert [s["name"] for s in listed] == ["first"]
        assert listed[0]["secret"] is None  # list never hands out secrets
        by_label = c.get("/v1/sandboxes", params=[("label", "team=b")]).json()["sandboxes"]
        assert [s["name"] for s in by_label] == ["second"]

        r = c.delete(f"/v1/sandboxes/{sb['id']}")
        assert r.status_code == 200 and r.json() == {"id": sb["id"], "status": "deleted"}
        assert sb["id"] in engine.deleted
        assert c.get(f"/v1/sandboxes/{sb['id']}").status_code == 404
        assert c.delete(f"/v1/sandboxes/{sb['id']}").status_code == 404


def test_koyeb_image_name_maps_to_default(server: RunningServer) -> None:
    with server.client() as c:
        assert create(c, image="koyeb/sandbox").json()["image"] == "default"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"instance_type": "huge"}, "unknown instance_type 'huge'"),
        ({"env": ["A=1"]}, "env"),
        ({"env": {"A": 1}}, "env.A"),
        ({"env": {"A=B": "x"}}, "invalid environment variable name"),
        ({"env": {"SANDBOX_SECRET": "x"}}, "reserved"),
        ({"env": {"SANDBOX_AUTH_MODE": "pool"}}, "reserved"),  # first bearer would claim it
        ({"env": {"SANDLOT_PROCESS_JOURNAL": "/tmp/j"}}, "reserved"),
        ({"env": {"SANDLOT_ENV_FILE": "/tmp/e"}}, "reserved"),
        ({"env": {"SANDLOT_MAIN_COMMAND_FILE": "/tmp/m"}}, "reserved"),
        ({"env": {"A": "x\u0000y"}}, "NUL"),
        ({"timeout": -1}, "timeout"),
        ({"idle_timeout": -5}, "idle_timeout"),
        ({"delete_after_delay": -1}, "delete_after_delay"),
        ({"delete_after_inactivity_delay": -1}, "delete_after_inactivity_delay"),
        ({"idle_timeout": "10"}, "idle_timeout"),
        ({"wait_ready": "yes"}, "wait_ready"),
        ({"exposed_port_protocol": "tcp"}, "exposed_port_protocol"),
        ({"name": "Not A Name!"}, "name"),
        ({"labels": {"k": 1}}, "labels.k"),
        ({"labels": {"bad key": "v"}}, "label key"),
        ({"image": ""}, "image"),
        ({"region": "mars"}, "unknown region 'mars'"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_create_rejects_bad_options(
    server: RunningServer, engine: AgentProcessEngine, body: dict[str, Any], needle: str
) -> None:
    with server.client() as c:
        r = create(c, **body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]
    assert engine.created == []


def test_bad_json(server: RunningServer) -> None:
    with server.client() as c:
        r = c.post("/v1/sandboxes", content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        r = c.post("/v1/sandboxes", json=[1, 2])
        assert r.status_code == 400 and "JSON object" in r.json()["error"]


def test_registry_secrets(server: RunningServer, engine: AgentProcessEngine) -> None:
    """Secrets are per project, never show their password, and reach the engine as the
    credentials of the image's registry (the local engine's pulls are tested for real in
    tests/sdk/test_registry_images.py)."""
    secret = {
        "name": "ghcr-team",
        "registry": "ghcr.io",
        "username": "robot",
        "password": "s3cret-Value",
    }
    with server.client(project="team-a") as c, server.client(project="team-b") as other:
        r = c.post("/v1/secrets", json=secret)
        assert r.status_code == 201, r.text
        assert r.json() == {
            "name": "ghcr-team",
            "type": "registry",
            "registry": "ghcr.io",
            "username": "robot",
            "created_at": r.json()["created_at"],
        }
        assert c.post("/v1/secrets", json=secret).status_code == 409
        listed = c.get("/v1/secrets")
        assert [s["name"] for s in listed.json()["secrets"]] == ["ghcr-team"]
        assert "s3cret-Value" not in listed.text
        assert other.get("/v1/secrets").json()["secrets"] == []
        r = create(c, image="ghcr.io/team/app:1", registry_secret="ghcr-team")
        assert r.status_code == 201, r.text
        auth = engine.specs[r.json()["id"]].registry_auth
        assert auth is not None
        assert (auth.registry, auth.username, auth.password) == ("ghcr.io", "robot", "s3cret-Value")
        assert "s3cret-Value" not in c.get(f"/v1/sandboxes/{r.json()['id']}").text
        # another project's secret is no secret of yours
        r = create(other, image="ghcr.io/team/app:1", registry_secret="ghcr-team")
        assert r.status_code == 400 and r.json()["code"] == "invalid_registry_secret"
        assert "ghcr-team" in r.json()["error"]
        assert other.delete("/v1/secrets/ghcr-team").status_code == 404
        r = c.delete("/v1/secrets/ghcr-team")
        assert r.status_code == 200 and r.json()["name"] == "ghcr-team"
        r = create(c, image="ghcr.io/team/app:1", registry_secret="ghcr-team")
        assert r.status_code == 400 and r.json()["code"] == "invalid_registry_secret"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Has Spaces"}, "name"),
        ({"name": ""}, "name"),
        ({"registry": "https://ghcr.io/org"}, "registry"),
        ({"registry": "not a host"}, "registry"),
        ({"registry": "library"}, "registry"),  # a path, not a host
        ({"username": ""}, "username"),
        ({"password": "line\nbreak"}, "password"),
        ({"type": "opaque"}, "type"),
        ({"password": 12}, "password"),
        ({"extra": 1}, "extra"),
    ],
)
def test_registry_secret_bad_input(
    server: RunningServer, change: dict[str, Any], field: str
) -> None:
    body = {"name": "x", "registry": "docker.io", "username": "u", "password": "p", **change}
    with server.client() as c:
        r = c.post("/v1/secrets", json=body)
        assert r.status_code == 400, r.text
        assert field in r.text
        assert c.get("/v1/secrets").json()["secrets"] == []


def test_registry_secret_registry_is_normalised(server: RunningServer) -> None:
    with server.client(project="norm") as c:
        body = {"name": "hub", "registry": "https://Docker.IO/", "username": "u", "password": "p"}
        r = c.post("/v1/secrets", json=body)
        assert r.status_code == 201 and r.json()["registry"] == "docker.io"
        assert c.delete("/v1/secrets/hub").status_code == 200


def test_ports_bad_input(server: RunningServer) -> None:
    with server.client() as c:
        sid = create(c).json()["id"]
        for body in ({}, {"port": 0}, {"port": 70000}, {"port": "abc"}, {"port": "80"}):
            r = c.post(f"/v1/sandboxes/{sid}/ports", json=body)
            assert r.status_code == 400 and "port" in r.json()["error"], (body, r.text)
        for bad in ("0", "70000", "abc"):
            r = c.delete(f"/v1/sandboxes/{sid}/ports", params={"port": bad})
            assert r.status_code == 400, (bad, r.text)
        r = c.delete(f"/v1/sandboxes/{sid}/ports", params={"port": "8080"})
        assert r.status_code == 404 and r.json()["code"] == "port_not_exposed"
        assert "8080" in r.json()["error"]


def test_update_lifecycle(server: RunningServer) -> None:
    with server.client() as c:
        sid = create(c, delete_after_delay=60).json()["id"]
        r = c.patch(
            f"/v1/sandboxes/{sid}", json={"delete_after_inactivity_delay": 30, "idle_timeout": 0}
        )
        assert r.status_code == 200, r.text
        sb = r.json()
        assert sb["delete_after_delay"] == 60
        assert sb["delete_after_inactivity_delay"] == 30
        assert sb["idle_timeout"] == 0
        sb = c.patch(
            f"/v1/sandboxes/{sid}", json={"delete_after_delay": None, "enable_light_sleep": True}
        ).json()
        assert sb["delete_after_delay"] is None and sb["enable_light_sleep"] is True
        assert c.patch(f"/v1/sandboxes/{sid}", json={"idle_timeout": -1}).status_code == 400
        assert c.patch(f"/v1/sandboxes/{sid}", json={"idle_timeout": None}).status_code == 400
        assert c.patch(f"/v1/sandboxes/{sid}", json={"status": "x"}).status_code == 400
        assert c.patch("/v1/sandboxes/nope", json={}).status_code == 404


def test_failed_create_leaves_nothing(server: RunningServer, engine: AgentProcessEngine) -> None:
    with server.client() as c:
        r = create(c, image="fail")
        assert r.status_code == 400 and "does not exist" in r.json()["error"]
        r = create(c, image="unavailable")
        assert r.status_code == 503
        r = create(c, image="never-ready", timeout=0.3)
        assert r.status_code == 504 and "did not become ready" in r.json()["error"]
        assert c.get("/v1/sandboxes").json()["sandboxes"] == []
    assert engine.created and set(engine.created) <= set(engine.deleted)
    assert engine.alive() == []


def test_wait_ready_false_returns_at_once(server: RunningServer) -> None:
    with server.client() as c:
        r = create(c, image="never-ready", wait_ready=False)
        assert r.status_code == 201 and r.json()["status"] == "running"


def test_create_cancelled_by_client_disconnect(
    server: RunningServer, engine: AgentProcessEngine
) -> None:
    with server.client() as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/sandboxes", json={"image": "slow"}, timeout=0.5)
    deadline = time.monotonic() + 10
    while not engine.deleted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.created and engine.deleted == engine.created
    assert engine.alive() == []
    # The row is marked deleted just after the engine deleted the sandbox: allow for that step.
    with server.client() as c:
        while c.get("/v1/sandboxes").json()["sandboxes"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/v1/sandboxes").json()["sandboxes"] == []


def test_unknown_route_and_method(server: RunningServer) -> None:
    with server.client() as c:
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
        r = c.put("/v1/sandboxes")
        assert r.status_code == 405 and "error" in r.json()


# -- TCP: API tokens and projects --------------------------------------------------------------


def make_token(server: RunningServer, project: str) -> str:
    # Tokens are managed on the Unix socket; the TCP test server shares its database with a
    # socket-mode app, so go through the store directly.
    store = server.app.state.control.store
    _, token = store.create_token(project, "test")
    return str(token)


def test_tcp_requires_token(tcp_server: RunningServer) -> None:
    with tcp_server.client() as c:
        r = c.get("/v1/sandboxes")
        assert r.status_code == 401 and "missing API token" in r.json()["error"]
    with tcp_server.client(token="sl_wrong") as c:
        r = c.get("/v1/sandboxes")
        assert r.status_code == 401 and "invalid" in r.json()["error"]
    with tcp_server.client() as c:
        assert c.get("/v1/health").status_code == 200


def test_projects_are_isolated(tcp_server: RunningServer) -> None:
    a, b = make_token(tcp_server, "alpha"), make_token(tcp_server, "beta")
    with tcp_server.client(token=a) as ca, tcp_server.client(token=b) as cb:
        sid = create(ca, name="mine").json()["id"]
        assert cb.get(f"/v1/sandboxes/{sid}").status_code == 404
        assert cb.patch(f"/v1/sandboxes/{sid}", json={"idle_timeout": 1}).status_code == 404
        assert cb.delete(f"/v1/sandboxes/{sid}").status_code == 404
        assert cb.get("/v1/sandboxes").json()["sandboxes"] == []
        assert [s["id"] for s in ca.get("/v1/sandboxes").json()["sandboxes"]] == [sid]
        assert ca.get(f"/v1/sandboxes/{sid}").status_code == 200


def test_token_management_only_on_socket(tcp_server: RunningServer) -> None:
    tok = make_token(tcp_server, "alpha")
    with tcp_server.client(token=tok) as c:
        assert c.post("/v1/tokens", json={"project": "x"}).status_code == 403
        assert c.get("/v1/tokens").status_code == 403


def test_token_lifecycle_on_socket(server: RunningServer) -> None:
    with server.client() as c:
        r = c.post("/v1/tokens", json={"project": "alpha", "name": "ci"})
        assert r.status_code == 201, r.text
        tok = r.json()
        assert tok["token"].startswith("sl_")
        listed = c.get("/v1/tokens").json()["tokens"]
        assert [t["id"] for t in listed] == [tok["id"]]
        assert listed[0]["token"] is None  # shown once
        # stored hashed: the database never holds the token itself
        store = server.app.state.control.store
        row = store.list_tokens("alpha")[0]
        assert tok["token"] not in row.token_hash and len(row.token_hash) == 64
        assert store.project_for_token(tok["token"]) == "alpha"
        assert c.delete(f"/v1/tokens/{tok['id']}").status_code == 200
        assert store.project_for_token(tok["token"]) is None
        assert c.delete(f"/v1/tokens/{tok['id']}").status_code == 404
        assert c.post("/v1/tokens", json={"project": ""}).status_code == 400
        assert c.post("/v1/tokens", json={}).status_code == 400


def test_revoked_token_is_refused(tcp_server: RunningServer) -> None:
    store = tcp_server.app.state.control.store
    row, token = store.create_token("alpha", "t")
    with tcp_server.client(token=token) as c:
        assert c.get("/v1/sandboxes").status_code == 200
        store.revoke_token(row.id)
        assert c.get("/v1/sandboxes").status_code == 401


def test_socket_project_header(server: RunningServer) -> None:
    with server.client(project="alpha") as ca, server.client() as cd:
        sid = create(ca).json()["id"]
        assert cd.get(f"/v1/sandboxes/{sid}").status_code == 404
        assert ca.get(f"/v1/sandboxes/{sid}").status_code == 200


def test_half_created_rows_are_cleaned_at_start(
    engine: AgentProcessEngine, database_url: str, short_dir: Path
) -> None:
    """A server that died mid-create leaves a "creating" row; the next start removes it."""
    from support.server import start_server

    from sandlot.server.control.store import Store
    from sandlot.server.control.tables import SandboxRow, utcnow

    store = Store(database_url)
    store.add_sandbox(
        SandboxRow(
            id="deadbeef",
            project="default",
            name="x",
            status="creating",
            image="default",
            instance_type="micro",
            region="local",
            labels={},
            env={},
            error="",
            created_at=utcnow(),
            updated_at=utcnow(),
        )
    )
    store.close()
    srv = start_server(engine, database_url, unix_path=short_dir / "r2" / "sandlot.sock")
    try:
        assert "deadbeef" in engine.deleted
        with srv.client() as c:
            assert c.get("/v1/sandboxes/deadbeef").status_code == 404
    finally:
        srv.stop()
