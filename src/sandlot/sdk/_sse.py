"""Server-sent events (``exec_stream``'s wire format) read with a bound on each line: the
agent is inside the sandbox, so its stream is hostile input."""

from __future__ import annotations

from sandlot.sdk._limits import MAX_EVENT_LINE
from sandlot.sdk.errors import SandboxServiceError


class LineSplitter:
    """Bytes of a server-sent-event stream to lines, none longer than ``limit``.

    httpx's own line iterator holds a line however long it grows; an agent is inside the
    sandbox, so its answers are hostile input and a line without end must not become a
    client without memory."""

    __slots__ = ("_pending", "limit")

    def __init__(self, limit: int = MAX_EVENT_LINE) -> None:
        self.limit = limit
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[str]:
        self._pending += data
        if b"\n" not in data:
            self._check(len(self._pending))
            return []
        *lines, rest = self._pending.split(b"\n")
        self._pending = rest
        self._check(max(len(rest), *(len(line) for line in lines)))
        return [line.rstrip(b"\r").decode("utf-8", "replace") for line in lines]

    def _check(self, length: int) -> None:
        if length > self.limit:
            raise SandboxServiceError(
                f"the sandbox's agent sent an event longer than {self.limit} bytes; "
                "it is broken or not sandlot's agent"
            )


def parse_sse_line(line: str) -> tuple[str | None, str | None]:
    """``event: x`` → ("event", x); ``data: y`` → ("data", y); other lines → (None, None)."""
    if line.startswith("event:"):
        return "event", line[6:].strip()
    if line.startswith("data:"):
        value = line[5:]
        return "data", value[1:] if value.startswith(" ") else value
    return None, None
