"""The server's own JSON calls to a sandbox's agent, with their answers bounded, validated and
timed out.

The agent runs inside the sandbox, and root there can replace it: what it answers is hostile
input, like a request from the internet. Measured against a fake agent on today's code before
this module: an endless ``/bound_ports`` answer grew the server from 74 to 735 MiB, and answers
of the wrong shape (a list where an object was expected, a port that is not a number) raised
``KeyError``/``AttributeError`` 500s. Here every call

- is timed out as a whole (connect, head and body: :data:`CALL_TIMEOUT`);
- reads at most :data:`ANSWER_LIMIT` bytes of answer (the real agent's are under 1 KiB);
- decodes the JSON (deep nesting is an error like any other) and validates its shape with a
  pydantic model;

and any breach is an :class:`AgentAnswerError` -- an :class:`.upstream.UpstreamError`, so the
callers' "agent not reachable" paths (a 502 that says what the agent did) handle it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from sandlot.server.upstream import AgentPool, UpstreamError

#: A call to an agent, answer read whole, takes at most this long (a real one: ~1 ms).
CALL_TIMEOUT = 10.0
#: The largest answer read from an agent by the server's own calls.
ANSWER_LIMIT = 64 * 1024
#: More bound ports than a real sandbox could use: an agent listing more is lying.
MAX_BOUND_PORTS = 1024
#: What of an agent's error message is quoted to the client.
MESSAGE_LIMIT = 300

Model = TypeVar("Model", bound=BaseModel)
Port = Annotated[int, Field(ge=1, le=65535)]
#: A port as the agent may write it in text (Koyeb's ``current_port`` is a string).
PortText = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,5}$")]


class AgentAnswerError(UpstreamError):
    """The agent's answer was too slow, too large or not of the expected shape."""


class BoundPorts(BaseModel):
    """``GET /bound_ports`` and the ``ports`` of ``/bind_port`` and ``/unbind_port``."""

    model_config = ConfigDict(extra="ignore")
    ports: list[Port] = Field(default_factory=list, max_length=MAX_BOUND_PORTS)


class AgentReply(BaseModel):
    """What the server reads of any other answer: an error message, a conflicting port."""

    model_config = ConfigDict(extra="ignore")
    error: str | None = None
    current_port: Port | PortText | None = None

    def message(self, status: int) -> str:
        """The agent's error message, shortened, or its status."""
        text = (self.error or "").strip()
        if len(text) > MESSAGE_LIMIT:
            text = text[:MESSAGE_LIMIT] + "..."
        return text or f"HTTP {status}"


async def call(
    agent: AgentPool,
    method: str,
    route: str,
    body: dict[str, Any] | None = None,
    *,
    timeout: float | None = None,
    limit: int = ANSWER_LIMIT,
) -> tuple[int, Any]:
    """One JSON call: (status, decoded answer), the answer's shape not yet checked;
    ``timeout``: :data:`CALL_TIMEOUT` unless given."""
    timeout = CALL_TIMEOUT if timeout is None else timeout
    data = json.dumps(body).encode() if body is not None else b""
    headers = [(b"content-type", b"application/json")] if body is not None else []
    if agent.secret is not None:
        headers.append((b"authorization", b"Bearer " + agent.secret))
    try:
        with anyio.fail_after(timeout):
            response = await agent.request(method, route, headers, data)
            try:
                raw = await response.read(limit)
            finally:
                response.close()
    except TimeoutError:
        raise AgentAnswerError(f"no answer to {route} within {timeout:g}s") from None
    try:
        return response.status, json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise AgentAnswerError(f"the answer to {route} is not JSON") from None


def validate(model: type[Model], answer: Any, route: str) -> Model:
    """``answer`` as ``model``, or :class:`AgentAnswerError` saying it is not."""
    try:
        return model.model_validate(answer)
    except ValidationError as exc:
        where = ", ".join(".".join(str(p) for p in e["loc"]) or "body" for e in exc.errors()[:3])
        raise AgentAnswerError(f"the answer to {route} is malformed ({where})") from None
