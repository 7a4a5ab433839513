"""/openapi.json stays true: it lists every route the app serves, and nothing else."""

from __future__ import annotations

import re

from starlette.routing import Route
from support.server import RunningServer


def test_openapi_lists_every_route(server: RunningServer) -> None:
    with server.client() as c:
        doc = c.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for route in server.app.routes:
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        for method in route.methods or ():
            served.add((path, method))

    # exposed ports are answered before routing (path form; the host form is not a path)
    from sandlot.server.gateway.ports.router import PORTS_METHODS, PORTS_PATH

    served |= {(PORTS_PATH, m) for m in PORTS_METHODS}

    # Starlette answers HEAD wherever it answers GET; the document need not repeat it.
    def without_implicit_head(pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
        return {(p, m) for p, m in pairs if m != "HEAD" or (p, "GET") not in pairs}

    assert without_implicit_head(served) == without_implicit_head(documented)
    # every schema reference resolves
    text = str(doc)
    for ref in re.findall(r"#/components/schemas/(\w+)", text):
        assert ref in doc["components"]["schemas"]


def test_openapi_matches_validation(server: RunningServer) -> None:
    with server.client() as c:
        doc = c.get("/openapi.json").json()
    create = doc["components"]["schemas"]["CreateSandbox"]
    assert create["additionalProperties"] is False
    for option in (
        "image",
        "name",
        "wait_ready",
        "instance_type",
        "exposed_port_protocol",
        "env",
        "region",
        "timeout",
        "idle_timeout",
        "enable_tcp_proxy",
        "privileged",
        "registry_secret",
        "delete_after_delay",
        "delete_after_inactivity_delay",
        "enable_light_sleep",
        "labels",
    ):
        assert option in create["properties"]
