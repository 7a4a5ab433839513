"""Host paths never leave the server (issue 11, items 9 and 10): an engine failure's text -- crun,
mount and the kernel name the host files they failed on -- reaches the API client, the sandbox's
``error`` field and its events without them.

Attack: make the engine fail with a message naming the state directory's files, and read every
place the message reaches a tenant (here over TCP with an API token)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agent_engine import AgentProcessEngine
from support.server import RunningServer, start_server

from sandlot.engines.base import EngineError, SandboxInfo, SandboxSpec
from sandlot.paths import state_dir
from sandlot.server.gateway.asgi import json_body
from sandlot.server.redact import PLACEHOLDER, hide_host_paths

HOST_TEXT = (
    "crun: open `{state}/sandboxes/{id}/bundle/config.json`: No such file or directory; "
    "mount /run/sandlot/runtime/abc on {state}/sandboxes/{id}/bundle/rootfs/.sandlot/runtime failed"
)


class LeakyEngine(AgentProcessEngine):
    """The test engine, failing ``image='leaky'`` the way crun does: naming host files."""

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        if spec.image == "leaky":
            raise EngineError(HOST_TEXT.format(state=state_dir(), id=spec.id))
        return await super().create(spec)


@pytest.fixture
def leaky_server(tmp_path: Path) -> Iterator[RunningServer]:
    with tempfile.TemporaryDirectory(prefix="slhp-", dir="/tmp") as short:
        engine = LeakyEngine(Path(short) / "sandboxes", slow_seconds=30)
        srv = start_server(engine, f"sqlite:///{tmp_path / 'sandlot.db'}", tcp=True)
        try:
            yield srv
        finally:
            srv.stop()


def _token(srv: RunningServer) -> str:
    store = srv.app.state.control.store
    _row, token = store.create_token("team-a", "t")
    return str(token)


def test_engine_failure_text_reaches_the_tenant_without_host_paths(
    leaky_server: RunningServer,
) -> None:
    with leaky_server.client(token=_token(leaky_server)) as client:
        r = client.post("/v1/sandboxes", json={"image": "leaky"})
        assert r.status_code >= 400
        body = r.text
        assert str(state_dir()) not in body and "/run/sandlot" not in body, body
        assert PLACEHOLDER in r.json()["error"]  # the message still says what failed


def test_a_sandboxs_error_and_history_hide_host_paths(leaky_server: RunningServer) -> None:
    """A wake that failed records the engine's text in the sandbox's ``error`` field and its
    events (lifecycle.py): both are read back by the tenant."""
    store = leaky_server.app.state.control.store
    with leaky_server.client(token=_token(leaky_server)) as client:
        r = client.post("/v1/sandboxes", json={})
        assert r.status_code == 201, r.text
        sandbox_id = r.json()["id"]
        text = HOST_TEXT.format(state=state_dir(), id=sandbox_id)
        store.add_event(sandbox_id, "error", f"waking from deep sleep failed: {text}")
        store.update_sandbox(sandbox_id, error=text)
        assert store.get_any_sandbox(sandbox_id).error == text  # the server keeps it all
        for path in (f"/v1/sandboxes/{sandbox_id}", f"/v1/sandboxes/{sandbox_id}/events"):
            answer = client.get(path)
            assert answer.status_code == 200, answer.text
            assert str(state_dir()) not in answer.text, answer.text
            assert "/run/sandlot" not in answer.text, answer.text
            assert PLACEHOLDER in answer.text
        client.delete(f"/v1/sandboxes/{sandbox_id}")


def test_proxy_error_answers_hide_host_paths() -> None:
    """The gateway's and ports' JSON errors (wake failures carry engine text) go through one
    builder; it hides host paths too."""
    _headers, data = json_body({"error": f"waking failed: {state_dir()}/sandboxes/x/disk.img"})
    assert str(state_dir()).encode() not in data and PLACEHOLDER.encode() in data


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("no such image 'python:3.12'", "no such image 'python:3.12'"),
        ("path /root/data.txt in the sandbox", "path /root/data.txt in the sandbox"),
        ("/var/lib/sandlot-ids/17 is locked", f"{PLACEHOLDER} is locked"),
        ("'/run/sandlot/links/ab/agent.sock' refused", f"'{PLACEHOLDER}' refused"),
    ],
)
def test_only_host_directories_are_hidden(text: str, kept: str) -> None:
    assert hide_host_paths(text) == kept
