"""The server's OpenAPI document, made from its routing table (:class:`ApiRoute`: each route
with its summary and body models) plus the two proxies, whose paths are not routes of the API:
the agent gateway and the exposed ports."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

import sandlot
from sandlot.server.gateway.agent import GATEWAY_METHODS, GATEWAY_PATH
from sandlot.server.gateway.ports.router import PORTS_METHODS, PORTS_PATH
from sandlot.server.schemas import ErrorOut


@dataclass(frozen=True)
class ApiRoute:
    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response]]
    summary: str
    request: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int = 200
    auth: bool = True
    query: list[str] | None = None
    #: Error statuses this route answers besides 400, 401 and 404.
    errors: tuple[str, ...] = ()


def openapi_document(routes: list[ApiRoute]) -> dict[str, Any]:
    components: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            components[name] = sub
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"content": {"application/json": {"schema": ref(ErrorOut)}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__}
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in _path_params(r.path)
        ]
        params += [
            {"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
            for q in r.query or []
        ]
        if params:
            op["parameters"] = params
        if r.request is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(r.request)}},
            }
        responses: dict[str, Any] = {}
        if r.response is not None:
            responses[str(r.status)] = {
                "description": "OK",
                "content": {"application/json": {"schema": ref(r.response)}},
            }
        else:
            responses[str(r.status)] = {"description": "OK"}
        if r.auth:
            # 429: the token's requests in flight
            for code in ("400", "401", "404", "429", *r.errors):
                responses.setdefault(code, {"description": "error", **error})
            op["security"] = [{"bearer": []}]
        op["responses"] = responses
        paths.setdefault(r.path, {})[r.method.lower()] = op
    gateway_path = GATEWAY_PATH.replace("{path:path}", "{path}")
    for method in GATEWAY_METHODS:
        paths.setdefault(gateway_path, {})[method.lower()] = {
            "summary": "The sandbox's agent API (Koyeb executor protocol), proxied; "
            "authenticated by the sandbox secret",
            "operationId": f"gateway_{method.lower()}",
            "parameters": [
                {
                    "name": "sandbox_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                },
                {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {"description": "the agent's answer"},
                "404": {"description": "no such sandbox", **error},
                "502": {"description": "agent not reachable", **error},
            },
        }
    paths.update(_ports_paths(error))
    return {
        "openapi": "3.1.0",
        "info": {"title": "sandlot", "version": sandlot.__version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _path_params(path: str) -> list[str]:
    return re.findall(r"\{([a-z_]+)(?::[a-z]+)?\}", path)


def _ports_paths(error: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The exposed ports' gateway in the server's OpenAPI document."""
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": kind}}
        for name, kind in (("sandbox_id", "string"), ("port", "integer"), ("path", "string"))
    ]
    ops: dict[str, Any] = {}
    for method in PORTS_METHODS:
        ops[method.lower()] = {
            "summary": "An exposed port of the sandbox, proxied (also served at "
            "{port}-{sandbox_id}.{domain} with --domain; WebSocket and h2c upgrades pass "
            "through; HTTP/2 with prior knowledge served, and spoken to http2 sandboxes); "
            "public unless the sandbox has protect_ports",
            "operationId": f"port_{method.lower()}",
            "parameters": params,
            "responses": {
                "200": {"description": "the sandbox server's answer"},
                "401": {"description": "protected port: token missing or wrong", **error},
                "404": {"description": "no such sandbox, or the port is not exposed", **error},
                "502": {"description": "nothing listens on the port", **error},
                "503": {"description": "port_busy: too many requests in flight to it", **error},
            },
        }
    return {PORTS_PATH: ops}
