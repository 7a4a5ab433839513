"""A background process's output history: a ring of chunks capped both in count and in bytes,
which any number of readers replay and follow by sequence number. Its own module because both
the processes this agent runs (:mod:`.processes`) and those an earlier agent left
(:mod:`.journal`) keep one."""

from __future__ import annotations

import collections
import threading
import time

from sandlot.agent.chunks import Chunk, chunk_bytes, chunk_fields

# Annotations only: importing typing at run time costs the agent milliseconds of start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

LOG_MAX_CHUNKS = 10_000
LOG_MAX_BYTES = 2 * 1024 * 1024


def iso(ts: float) -> str:
    """RFC 3339 in UTC with microseconds: ``2026-01-02T03:04:05.678901Z``."""
    whole = int(ts)
    micros = int((ts - whole) * 1e6)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


class LogEntry:
    __slots__ = ("chunk", "seq", "size", "stream", "ts")

    def __init__(self, seq: int, ts: float, stream: str, chunk: Chunk) -> None:
        self.seq = seq
        self.ts = ts
        self.stream = stream
        self.chunk = chunk
        self.size = len(chunk_bytes(chunk))

    def event(self) -> dict[str, Any]:
        return {"timestamp": iso(self.ts), "stream": self.stream, **chunk_fields(self.chunk)}


class LogRing:
    """Bounded output history; readers follow it by sequence number."""

    def __init__(self, max_chunks: int = LOG_MAX_CHUNKS, max_bytes: int = LOG_MAX_BYTES) -> None:
        self._entries: collections.deque[LogEntry] = collections.deque()
        self._bytes = 0
        self._max_chunks = max_chunks
        self._max_bytes = max_bytes
        self.next_seq = 0
        self.dropped = 0
        self.closed = False
        self.cond = threading.Condition()

    def append(self, stream: str, chunk: Chunk) -> None:
        entry = LogEntry(self.next_seq, time.time(), stream, chunk)
        with self.cond:
            self._entries.append(entry)
            self.next_seq += 1
            self._bytes += entry.size
            while len(self._entries) > self._max_chunks or (
                self._bytes > self._max_bytes and len(self._entries) > 1
            ):
                self._drop_oldest()
            self.cond.notify_all()

    def _drop_oldest(self) -> None:
        self._bytes -= self._entries.popleft().size
        self.dropped += 1

    @property
    def size(self) -> int:
        return self._bytes

    def clear(self) -> None:
        """Forget the history (readers skip ahead; the sequence numbers go on)."""
        with self.cond:
            while self._entries:
                self._drop_oldest()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def read_from(self, seq: int, wait: float | None) -> tuple[list[LogEntry], int, bool]:
        """Entries with sequence ≥ ``seq`` (waiting up to ``wait`` s for one); also the next
        sequence to ask for and whether the log is closed (the process ended)."""
        with self.cond:
            if wait and self.next_seq <= seq and not self.closed:
                self.cond.wait(wait)
            entries = self._entries
            # Sequence numbers are consecutive, so the first wanted entry is found by offset.
            start = max(0, seq - entries[0].seq) if entries else 0
            out = [entries[i] for i in range(start, len(entries))] if start < len(entries) else []
            return out, self.next_seq, self.closed
