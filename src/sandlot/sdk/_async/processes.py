"""ProcessesMixin: commands and background processes in a sandbox.

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sandlot.sdk._async.base import SandboxBase
from sandlot.sdk._async.exec_stream import AsyncExecStream
from sandlot.sdk._limits import DEFAULT_EXEC_TIMEOUT
from sandlot.sdk.errors import SandboxCommandError, SandboxRequestError, SandboxServiceError
from sandlot.sdk.types import CancelToken, CommandResult, ProcessInfo


class ProcessesMixin(SandboxBase):
    """Commands (``exec``, ``exec_stream``) and background processes."""

    # -- commands ---------------------------------------------------------------------------------

    async def exec(
        self,
        cmd: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = DEFAULT_EXEC_TIMEOUT,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
        cancel: CancelToken | None = None,
        raise_on_error: bool = False,
        max_output_bytes: int | None = None,
    ) -> CommandResult:
        """Run ``cmd`` with ``sh -c`` and return its ``stdout``, ``stderr`` and ``code``.

        ``on_stdout``/``on_stderr`` get each chunk of output as it arrives. The command is
        killed when ``timeout`` passes (:class:`SandboxTimeoutError`), when ``cancel`` is
        cancelled (:class:`CommandCancelledError`) or when the calling task is cancelled.

        The result keeps at most ``max_output_bytes`` of each stream (sandlot; default
        :attr:`max_output_bytes`, 64 MiB). Past it the command runs on to its end, its output
        still reaches ``on_stdout``/``on_stderr``, and ``result.truncated`` with
        ``stdout_dropped_bytes``/``stderr_dropped_bytes`` say how much the result lacks.
        """
        keep = self.max_output_bytes if max_output_bytes is None else max_output_bytes
        stream = AsyncExecStream(
            self, cmd, cwd=cwd, env=env, timeout=timeout, cancel=cancel, max_output_bytes=keep
        )
        if on_stdout is not None:
            out = on_stdout
            stream.add_event_listener("stdout", lambda ev: out(ev.data["data"]))
        if on_stderr is not None:
            err = on_stderr
            stream.add_event_listener("stderr", lambda ev: err(ev.data["data"]))
        result = await stream.wait()
        if raise_on_error and result.exit_code != 0:
            raise SandboxCommandError(
                f"command exited with code {result.exit_code}: {cmd}", result=result
            )
        return result

    def exec_stream(
        self,
        cmd: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        cancel: CancelToken | None = None,
        max_output_bytes: int = 0,
    ) -> AsyncExecStream:
        """Stream a command's output: add listeners for ``stdout``, ``stderr``, ``exit`` and
        ``end`` then ``await stream.wait()``, or iterate over the stream's events.

        The stream holds nothing it has delivered: its ``result`` has the exit code, and its
        ``stdout``/``stderr`` are empty (their sizes are in ``stdout_dropped_bytes`` and
        ``stderr_dropped_bytes``) unless ``max_output_bytes`` (sandlot) asks it to keep that
        much of each."""
        return AsyncExecStream(
            self,
            cmd,
            cwd=cwd,
            env=env,
            timeout=timeout,
            cancel=cancel,
            max_output_bytes=max_output_bytes,
        )

    # -- background processes -------------------------------------------------------------------

    async def launch_process(
        self, cmd: str, cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        """Start a long-lived background process; returns its id."""
        body: dict[str, Any] = {"cmd": cmd}
        if cwd is not None:
            body["cwd"] = cwd
        if env is not None:
            body["env"] = dict(env)
        data = await self._agent("POST", "/start_process", "launch process", json_body=body)
        return str(data["id"])

    async def kill_process(self, process_id: str) -> None:
        await self._agent(
            "POST", "/kill_process", f"kill process {process_id}", json_body={"id": process_id}
        )

    async def list_processes(self) -> list[ProcessInfo]:
        data = await self._agent("GET", "/list_processes", "list processes")
        return [
            ProcessInfo(
                id=str(p.get("id")),
                pid=p.get("pid"),
                status=str(p.get("status")),
                command=str(p.get("command", "")),
                raw=p,
            )
            for p in data.get("processes", [])
        ]

    async def kill_all_processes(self) -> int:
        """Stop every running background process; returns how many were stopped."""
        count = 0
        for process in await self.list_processes():
            if process.status == "running":
                try:
                    await self.kill_process(process.id)
                    count += 1
                except SandboxServiceError:
                    raise  # a SandboxRequestError too (as Koyeb's), but not "finished"
                except SandboxRequestError:
                    pass  # it finished meanwhile
        return count
