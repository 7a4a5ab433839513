"""Turning a process's raw output bytes into JSON-safe chunks without losing a byte.

Each chunk becomes either text (valid UTF-8, sent as is) or bytes (anything else, sent as
base64 with ``"encoding": "base64"``). A multi-byte character split across two reads is held
back and joined to the next read, so ordinary UTF-8 output never turns into base64 because of
where a ``read()`` happened to stop.
"""

from __future__ import annotations

import base64

Chunk = str | bytes  # str: valid UTF-8 text; bytes: anything else (sent as base64)


class Utf8Splitter:
    """Per-stream state: the incomplete UTF-8 sequence left at the end of the last read."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[Chunk]:
        if self._tail:
            data = self._tail + data
            self._tail = b""
        if not data:
            return []
        try:
            return [data.decode("utf-8")]
        except UnicodeDecodeError as exc:
            incomplete_end = exc.end == len(data) and len(data) - exc.start < 4
            if incomplete_end and exc.reason == "unexpected end of data":
                self._tail = data[exc.start :]
                return [data[: exc.start].decode("utf-8")] if exc.start else []
            # Invalid bytes: the valid text before them stays text, the rest goes as bytes.
            return [data[: exc.start].decode("utf-8"), data[exc.start :]] if exc.start else [data]

    def flush(self) -> list[Chunk]:
        """What is held back, at the end of the stream (an incomplete sequence stays bytes)."""
        tail, self._tail = self._tail, b""
        return [tail] if tail else []


def chunk_fields(chunk: Chunk) -> dict[str, str]:
    """The ``data`` (and, for bytes, ``encoding``) fields of an output event."""
    if isinstance(chunk, str):
        return {"data": chunk}
    return {"data": base64.b64encode(chunk).decode("ascii"), "encoding": "base64"}


def chunk_bytes(chunk: Chunk) -> bytes:
    return chunk.encode("utf-8") if isinstance(chunk, str) else chunk
