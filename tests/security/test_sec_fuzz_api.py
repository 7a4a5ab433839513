"""Fuzz the server from its own OpenAPI document with schemathesis: zero 5xx for any input.

Before: a deeply nested JSON body raised RecursionError (a 500 whose text was the exception's,
and the next keep-alive request on that connection was reset); a port written in other Unicode
digits ('²') or with thousands of digits raised ValueError 500s.

- The control API (every route the served ``/openapi.json`` lists, the gateway's and exposed
  ports' included) on a TCP server with an API token, sandboxes made by agent processes (their
  image and env are ignored: the fuzzer's values must not reach a host process).
- The agent's API through the gateway (``/sandboxes/{id}/koyeb-sandbox/...`` with the secret),
  from the agent's own OpenAPI document, against a real sandbox of the local engine (the fuzzer
  runs arbitrary commands and deletes arbitrary paths: only inside a sandbox). Needs root.

Short by default; the long variants run with ``SANDLOT_LONG=1 .venv/bin/python -m pytest -m
slow tests/security/test_sec_fuzz_api.py`` (``SANDLOT_FUZZ_EXAMPLES`` sets the examples per
operation: 10 by default, 300 in the long run).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.agent_engine import AgentProcessEngine
from support.local import IMAGES_DIR, local_engine_unavailable
from support.server import RunningServer, start_server

from sandlot.engines.base import SandboxInfo, SandboxSpec
from sandlot.server.api.app import create_app, openapi_document
from sandlot.server.config import ServerConfig

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

AGENT_SPEC = Path(__file__).resolve().parents[2] / "src" / "sandlot" / "agent" / "openapi.json"
SHORT = int(os.environ.get("SANDLOT_FUZZ_EXAMPLES", "10"))
LONG = int(os.environ.get("SANDLOT_FUZZ_EXAMPLES", "300"))


class FuzzEngine(AgentProcessEngine):
    """Agent processes that ignore the fuzzed image and env (a host process, not a sandbox:
    ``LD_PRELOAD=...`` or ``image=slow`` must not reach it)."""

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        return await super().create(dataclasses.replace(spec, image="default", env={}))


@pytest.fixture(scope="module")
def control_server() -> Iterator[tuple[RunningServer, str]]:
    root = Path(tempfile.mkdtemp(prefix="sl-fz-"))
    srv = start_server(FuzzEngine(root / "sb"), f"sqlite:///{root / 'db'}", tcp=True)
    _, token = srv.app.state.control.store.create_token("fuzz", "fuzz")
    try:
        yield srv, token
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def _control_document() -> dict[str, object]:
    """The control API's OpenAPI document, as the server serves it at ``/openapi.json`` (built
    here at collection time, from an app that is never started)."""
    config = ServerConfig(
        database_url="sqlite://",
        engines={"local": FuzzEngine(Path(tempfile.gettempdir()) / "sl-fuzz-unused")},
        default_region="local",
        auth="token",
    )
    app = create_app(config)
    try:
        return openapi_document(app.state.api.routes())
    finally:
        app.state.control.store.close()


control = schemathesis.openapi.from_dict(_control_document())


def _settings(examples: int) -> object:
    return hypothesis.settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        derandomize=True,
        database=None,
    )


def _call(case: schemathesis.Case, base_url: str, token: str, hidden: str = "") -> None:
    """Send the case: never a 5xx (except a create whose sandbox was not ready within the
    ``timeout`` the request itself gave: 504, as documented), never ``hidden`` (the server's
    state directory) in an answer."""
    response = case.call(
        base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    text = response.text
    not_ready = response.status_code == 504 and "did not become ready within" in text
    assert response.status_code < 500 or not_ready, (
        f"{response.status_code}: {text[:500]}\n{case.as_curl_command()}"
    )
    assert not hidden or hidden not in text, f"a host path in: {text[:500]}"
    assert "Traceback" not in text


@control.parametrize()
@_settings(SHORT)
def test_fuzz_control_api(
    case: schemathesis.Case, control_server: tuple[RunningServer, str]
) -> None:
    srv, token = control_server
    _call(case, srv.url, token, hidden=str(srv.engine.root.parent))


@control.parametrize()
@_settings(LONG)
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SANDLOT_LONG"), reason="long run: SANDLOT_LONG=1")
def test_fuzz_control_api_long(
    case: schemathesis.Case, control_server: tuple[RunningServer, str]
) -> None:
    srv, token = control_server
    _call(case, srv.url, token, hidden=str(srv.engine.root.parent))


def test_control_server_survived(control_server: tuple[RunningServer, str]) -> None:
    srv, token = control_server
    with srv.client(token) as c:
        assert c.get("/v1/health").status_code == 200
        assert c.get("/v1/sandboxes").status_code == 200


# -- the agent through the gateway ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_sandbox() -> Iterator[tuple[str, str]]:
    """(the sandbox's gateway URL, its secret), on a TCP server with a real local engine."""
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore

    root = Path(tempfile.mkdtemp(prefix="sl-fg-"))
    engine = LocalEngine(root / "state", images=ImageStore(IMAGES_DIR))
    srv = start_server(engine, f"sqlite:///{root / 'db'}", tcp=True)
    try:
        _, token = srv.app.state.control.store.create_token("fuzz", "fuzz")
        with srv.client(token) as c:
            r = c.post("/v1/sandboxes", json={"idle_timeout": 0})
            assert r.status_code == 201, r.text
            sb = r.json()
        yield f"{srv.url}/sandboxes/{sb['id']}/koyeb-sandbox", sb["secret"]
        with httpx.Client() as c:  # the sandbox's agent survived the fuzzing
            r = c.get(f"{srv.url}/sandboxes/{sb['id']}/koyeb-sandbox/health")
            assert r.json() == {"status": "ok"}
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


agent = schemathesis.openapi.from_path(str(AGENT_SPEC))


def _call_agent(case: schemathesis.Case, base_url: str, secret: str) -> None:
    """Through the gateway, the agent's answers are what its own fuzzing checks
    (``tests/agent/test_agent_fuzz.py``): no 5xx, and statuses, content types and bodies as its
    OpenAPI document says."""
    from schemathesis import checks

    case.call_and_validate(
        base_url=base_url,
        headers={"Authorization": f"Bearer {secret}"},
        checks=[
            checks.not_a_server_error,
            checks.status_code_conformance,
            checks.content_type_conformance,
            checks.response_schema_conformance,
        ],
        timeout=60,
    )


@agent.parametrize()
@_settings(SHORT)
def test_fuzz_agent_through_the_gateway(
    case: schemathesis.Case, gateway_sandbox: tuple[str, str]
) -> None:
    base, secret = gateway_sandbox
    _call_agent(case, base, secret)


@agent.parametrize()
@_settings(LONG)
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SANDLOT_LONG"), reason="long run: SANDLOT_LONG=1")
def test_fuzz_agent_through_the_gateway_long(
    case: schemathesis.Case, gateway_sandbox: tuple[str, str]
) -> None:
    base, secret = gateway_sandbox
    _call_agent(case, base, secret)


# -- what fuzzing found before --------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/sandboxes", "/v1/secrets"])
def test_deeply_nested_json_is_a_400_and_the_connection_lives(
    control_server: tuple[RunningServer, str], route: str
) -> None:
    """Before: RecursionError, a 500 with the exception's text, and the next request on the
    same keep-alive connection reset."""
    srv, token = control_server
    with srv.client(token) as c:
        r = c.post(route, content=b'{"labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "invalid_json"
        assert c.get("/v1/health").status_code == 200  # the same connection


@pytest.mark.parametrize("port", ["²", "٣", "1" * 5000, "-1", "0", "65536", " 80"])
def test_odd_port_numbers_are_4xx(control_server: tuple[RunningServer, str], port: str) -> None:
    """Before: '²' passed ``str.isdigit()`` and ``int()`` raised: a 500 (so did 5000 digits)."""
    srv, token = control_server
    with srv.client(token) as c:
        sb = c.post("/v1/sandboxes", json={}).json()
        try:
            r = c.delete(f"/v1/sandboxes/{sb['id']}/ports", params={"port": port})
            assert r.status_code == 400, r.text
            r = c.get(f"/sandboxes/{sb['id']}/ports/{port}/")
            assert r.status_code == 404, r.text
        finally:
            c.delete(f"/v1/sandboxes/{sb['id']}")
