"""The OpenAPI description in the repo describes exactly the routes the agent serves."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from agentlib import SRC, Agent

SPEC_PATH = Path(SRC) / "sandlot" / "agent" / "openapi.json"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def _served_routes() -> set[tuple[str, str]]:
    from sandlot.agent.app import App
    from sandlot.agent.auth import Authenticator

    app = App(Authenticator(b"x", pool=False, persist_path=None))
    return {(path, method.lower()) for path, methods in app.routes.items() for method in methods}


def _described_routes(spec: dict) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_every_route_is_described_and_vice_versa() -> None:
    spec = json.loads(SPEC_PATH.read_text())
    assert spec["openapi"].startswith("3.")
    served, described = _served_routes(), _described_routes(spec)
    assert served - described == set(), "served but not described"
    assert described - served == set(), "described but not served"


def test_schema_references_resolve() -> None:
    spec = json.loads(SPEC_PATH.read_text())
    text = SPEC_PATH.read_text()
    import re

    for ref in set(re.findall(r'"\$ref": "#/components/(\w+)/(\w+)"', text)):
        assert ref[1] in spec["components"][ref[0]], ref


def test_served_without_auth(agent: Agent) -> None:
    with agent.client(secret="") as c:
        r = c.get("/openapi.json")
    assert r.status_code == 200
    assert r.json() == json.loads(SPEC_PATH.read_text())


def test_public_routes_have_no_security(client: httpx.Client) -> None:
    spec = json.loads(SPEC_PATH.read_text())
    from sandlot.agent.app import PUBLIC_PATHS

    for path in PUBLIC_PATHS:
        for method, op in spec["paths"][path].items():
            assert op.get("security") == [], (path, method)


def test_committed_json_is_generated_from_the_spec_module() -> None:
    from openapi_spec import render

    assert SPEC_PATH.read_text() == render(), (
        "regenerate: python tests/agent/openapi_spec.py > src/sandlot/agent/openapi.json"
    )
