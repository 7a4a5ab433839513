"""The control API's HTTP plumbing: request bodies read with a size limit and validated, JSON
answers and errors, a create cancelled when its client leaves, and the wrapper that turns an
:class:`ApiError` (or a bug) into an answer."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sandlot.server.config import MAX_JSON_BODY
from sandlot.server.errors import ApiError
from sandlot.server.redact import hide_host_paths

log = logging.getLogger("sandlot.server")
#: The whole answer to a bug: details go to the server's log, never to the client.
INTERNAL = "internal error (the server's log has the details)"

Handler = Callable[[Request], Awaitable[Response]]


def json_response(model: BaseModel, status: int = 200) -> Response:
    return Response(
        model.model_dump_json(exclude_none=False), status_code=status, media_type="application/json"
    )


def error_response(status: int, code: str, message: str, detail: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": hide_host_paths(message), "code": code}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read as it arrives and refused (413) past ``limit`` bytes: a declared
    ``Content-Length`` over it is refused before anything is read, a chunked body as soon as it
    grows over it."""
    too_large = ApiError(
        413, "body_too_large", f"request body too large: the limit is {limit} bytes"
    )
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    limit = getattr(request.app.state, "max_json_body", MAX_JSON_BODY)
    raw = await read_body(request, limit)
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "body"
            problems.append(f"{where}: {err['msg']}")
        raise ApiError(400, "invalid_request", "invalid request: " + "; ".join(problems)) from None


async def cancel_on_disconnect(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``work()``; cancel it if the client disconnects first (then return None). Its own
    exception, if any, is re-raised as is (not inside an exception group)."""
    result: Any = None
    error: BaseException | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        async def run() -> None:
            nonlocal result, error
            try:
                result = await work()
            except Exception as exc:
                error = exc
            finally:
                tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    if error is not None:
        raise error
    return result


def wrap(
    handler: Handler,
) -> Handler:
    """``handler`` answering its errors: an :class:`ApiError` as itself, anything else as a
    500 without details."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except Exception:
            # A bug, not bad input. Answered here rather than by Starlette's error middleware,
            # which re-raises so that the server then drops the keep-alive connection; and
            # never with the exception's text, which may hold host paths.
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, "internal", INTERNAL)

    endpoint.__name__ = handler.__name__
    return endpoint
