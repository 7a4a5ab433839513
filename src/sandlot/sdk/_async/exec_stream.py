"""AsyncExecStream: a command's output as it happens.

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import httpx

from sandlot.sdk._answers import raise_for_status, transport_error
from sandlot.sdk._async.base import SandboxBase
from sandlot.sdk._async.calls import check_limit, read_answer, to_json
from sandlot.sdk._deadlines import StreamGuard
from sandlot.sdk._output import OutputKeeper
from sandlot.sdk._primitives import monotonic
from sandlot.sdk._sse import LineSplitter, parse_sse_line
from sandlot.sdk.errors import (
    CommandCancelledError,
    SandboxError,
    SandboxRequestError,
    SandboxServiceError,
    SandboxTimeoutError,
)
from sandlot.sdk.types import (
    EVENT_NAMES,
    CancelToken,
    CommandResult,
    EndEvent,
    ExitEvent,
    Listener,
    StderrEvent,
    StdoutEvent,
    StreamEvent,
)


class AsyncExecStream:
    """A command's output as it happens (the seed's ``exec_stream``).

    Either add listeners (``stdout``, ``stderr``, ``exit``, ``end``) and ``await wait()``, or
    ``async for event in stream`` (typed :class:`StreamEvent` objects). Leaving an
    ``async with`` block or cancelling kills the command if it still runs.
    """

    def __init__(
        self,
        sandbox: SandboxBase,
        cmd: str,
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        timeout: float | None,
        cancel: CancelToken | None,
        max_output_bytes: int = 0,
    ) -> None:
        if not isinstance(cmd, str):
            raise SandboxRequestError(f"cmd must be a string, not {type(cmd).__name__}", 400)
        if env is not None and not isinstance(env, Mapping):
            raise SandboxRequestError(f"env must be a mapping, not {type(env).__name__}", 400)
        if timeout is not None and timeout < 0:
            raise SandboxRequestError("timeout must not be negative", 400)
        check_limit(max_output_bytes, "max_output_bytes")
        self._sandbox = sandbox
        self.cmd = cmd
        self._cwd = cwd
        self._env = env
        self._timeout = timeout
        self._cancel = cancel
        self._listeners: dict[str, list[Listener]] = {name: [] for name in EVENT_NAMES}
        self._started = False
        self._iterator: AsyncGenerator[StreamEvent, None] | None = None
        self._kept = {
            "stdout": OutputKeeper(max_output_bytes),
            "stderr": OutputKeeper(max_output_bytes),
        }
        self.result: CommandResult | None = None

    def add_event_listener(self, name: str, callback: Listener) -> None:
        if name not in self._listeners:
            raise ValueError(f"unknown event {name!r}; expected one of {', '.join(EVENT_NAMES)}")
        self._listeners[name].append(callback)

    def remove_event_listener(self, name: str, callback: Listener) -> None:
        if callback in self._listeners.get(name, []):
            self._listeners[name].remove(callback)

    async def __aenter__(self) -> AsyncExecStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop following the command; if it still runs, it is killed (the connection closes)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            await iterator.aclose()

    def __aiter__(self) -> AsyncGenerator[StreamEvent, None]:
        if self._iterator is None:
            self._iterator = self._events()
        return self._iterator

    async def wait(self) -> CommandResult:
        """Run the command to its end, calling the listeners; returns its result."""
        async for _event in self:
            pass
        assert self.result is not None
        return self.result

    def _dispatch(self, event: StreamEvent) -> None:
        for callback in list(self._listeners[event.type]):
            callback(event)

    async def _events(self) -> AsyncGenerator[StreamEvent, None]:
        if self._started:
            raise SandboxError("an exec stream can be consumed once")
        self._started = True
        sandbox = self._sandbox
        body: dict[str, Any] = {"cmd": self.cmd}
        if self._cwd is not None:
            body["cwd"] = self._cwd
        if self._env is not None:
            body["env"] = dict(self._env)
        if self._timeout:
            body["timeout"] = self._timeout  # the agent kills the command itself, too
        headers = sandbox._agent_headers()
        headers["content-type"] = "application/json"
        headers["accept"] = "text/event-stream"
        content = to_json(**body)
        client = await sandbox._http()
        started = monotonic()
        what = f"exec in sandbox {sandbox.id}"
        # The client-side deadline is a little later than the agent's own, which reports a
        # timeout itself; this one only covers an agent that cannot.
        guard_after = self._timeout + 2.0 if self._timeout else None
        completed: dict[str, Any] | None = None
        try:
            async with client.stream(
                "POST",
                sandbox._agent_path("/run_streaming"),
                content=content,
                headers=headers,
                timeout=httpx.Timeout(None, connect=10.0),
            ) as response:
                if response.status_code >= 400:
                    raise_for_status(await read_answer(response, what), what)
                guard = StreamGuard(response, guard_after, self._cancel)
                lines = LineSplitter()
                try:
                    event_name: str | None = None
                    async for piece in response.aiter_bytes():
                        for line in lines.feed(piece):
                            kind, value = parse_sse_line(line)
                            if kind == "event":
                                event_name = value
                                continue
                            if kind != "data" or value is None:
                                continue
                            payload = json.loads(value)
                            for event in self._translate(event_name, payload):
                                if isinstance(event, ExitEvent):
                                    completed = payload
                                self._dispatch(event)
                                yield event
                            event_name = None
                except (httpx.HTTPError, OSError) as exc:
                    if guard.reason in ("timeout", "cancelled"):
                        pass
                    else:
                        raise SandboxServiceError(
                            f"{what}: the output stream broke off ({exc or type(exc).__name__}): "
                            "the sandbox's agent died (it restarts by itself; the command was "
                            "lost) or the sandbox was deleted"
                        ) from exc
                finally:
                    guard.close()
                if completed is None:
                    if guard.reason == "cancelled":
                        raise CommandCancelledError(f"command cancelled: {self.cmd}")
                    if guard.reason == "timeout":
                        raise SandboxTimeoutError(
                            f"command timed out after {self._timeout:g}s: {self.cmd}"
                        )
        except httpx.HTTPError as exc:
            raise transport_error(exc, sandbox._conn, what) from exc
        if completed is None:
            raise SandboxServiceError(
                f"{what}: the output stream ended before the command did: the sandbox's agent "
                "died (it restarts by itself; the command was lost) or the sandbox was deleted"
            )
        if completed.get("timed_out"):
            raise SandboxTimeoutError(f"command timed out after {self._timeout:g}s: {self.cmd}")
        stdout, stdout_dropped = self._kept["stdout"].take()
        stderr, stderr_dropped = self._kept["stderr"].take()
        self.result = CommandResult(
            stdout=stdout,
            stderr=stderr,
            exit_code=int(completed.get("code", -1)),
            command=self.cmd,
            duration=monotonic() - started,
            signal=completed.get("signal"),
            stdout_dropped_bytes=stdout_dropped,
            stderr_dropped_bytes=stderr_dropped,
        )
        end = EndEvent("end", {})
        self._dispatch(end)
        yield end

    def _translate(self, event_name: str | None, payload: dict[str, Any]) -> list[StreamEvent]:
        if "stream" in payload:
            raw = payload.get("data", "")
            if payload.get("encoding") == "base64":
                data = base64.b64decode(raw)
                text = data.decode("utf-8", "replace")
            else:
                text = str(raw)
                data = text.encode("utf-8")
            if payload["stream"] == "stderr":
                self._kept["stderr"].add(data)
                return [StderrEvent("stderr", {"data": text})]
            self._kept["stdout"].add(data)
            return [StdoutEvent("stdout", {"data": text})]
        if "code" in payload:
            return [ExitEvent("exit", {"code": int(payload["code"])})]
        if "error" in payload or event_name == "error":
            raise SandboxServiceError(
                f"exec failed: {payload.get('error') or 'unknown error'}", body=payload
            )
        return []
