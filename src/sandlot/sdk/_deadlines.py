"""Deadlines and cancellation of streamed answers: one watchdog thread for every command's
timeout, and :class:`StreamGuard`, which ends a stream by shutting its socket down (that wakes a
blocked read in any thread or event loop)."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from sandlot.sdk.types import CancelToken


class _Watchdog:
    """One daemon thread that runs callbacks at deadlines. (A ``threading.Timer`` per command
    costs a thread start, ~0.1 ms, on every exec; scheduling here costs ~2 us.)"""

    def __init__(self) -> None:
        self._seq = itertools.count()
        self._cond = threading.Condition()
        #: [deadline, seq, callback or None once cancelled]
        self._heap: list[list[Any]] = []
        self._thread: threading.Thread | None = None

    def schedule(self, delay: float, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` in ``delay`` seconds; returns a function that cancels it."""
        entry: list[Any] = [time.monotonic() + delay, next(self._seq), callback]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="sandlot-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()

        def cancel() -> None:
            entry[2] = None

        return cancel

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2] is None:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        callback = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(wait)
            if callback is not None:
                with contextlib.suppress(Exception):  # must not kill the thread
                    callback()


_watchdog = _Watchdog()


class StreamGuard:
    """Ends a streaming response early -- on a deadline or a cancel token -- by shutting its
    socket down, which wakes a blocked read in any thread or event loop. The reader then sees
    the stream end and asks :attr:`reason` why."""

    def __init__(self, response: httpx.Response, timeout: float | None, cancel: CancelToken | None):
        self.reason: str | None = None
        self._response = response
        self._lock = threading.Lock()
        self._cancel_timer: Callable[[], None] = lambda: None
        self._unsubscribe: Callable[[], None] = lambda: None
        if timeout is not None and timeout > 0:
            self._cancel_timer = _watchdog.schedule(timeout, lambda: self._fire("timeout"))
        if cancel is not None:
            self._unsubscribe = cancel._subscribe(lambda: self._fire("cancelled"))

    def _fire(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
        stream = self._response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        # a socket.socket, or asyncio's TransportSocket wrapper: both can shut down
        shutdown = getattr(sock, "shutdown", None)
        if shutdown is not None:
            with contextlib.suppress(OSError):
                shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = "done"
        self._cancel_timer()
        self._unsubscribe()
