"""API calls answered as plain JSON rather than the client's model objects.

Why: the client's models cost ~1 ms to build per Pod and the engine reads a few fields only;
but a call made with ``_preload_content=False`` returns the raw response *whatever its
status* (the client checks the status only when it reads the body itself), so every such call
goes through :func:`json_of`, which checks it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException


async def json_of(call: Awaitable[Any]) -> dict[str, Any]:
    """Await a ``_preload_content=False`` call; its JSON body, or :class:`ApiException`."""
    resp = await call
    try:
        body = await resp.read()
    finally:
        resp.release()
    check(resp, body)
    result: dict[str, Any] = json.loads(body)
    return result


def check(resp: Any, body: bytes = b"") -> None:
    """Raise :class:`ApiException` (with the server's message in ``body``) unless 2xx."""
    if not 200 <= resp.status <= 299:
        exc = ApiException(status=resp.status, reason=resp.reason)
        exc.body = body
        raise exc
