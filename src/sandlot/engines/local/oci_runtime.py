"""A thin async wrapper around the OCI runtime binary (crun by default, runc as fallback).

It knows two host facts so the engine does not have to: which runtime exists, and how to start it
on a hybrid cgroup host (crun from a private mount namespace without ``/sys/fs/cgroup/unified``;
the host's layout is never touched). Every runtime call uses our own ``--root`` so ``list`` sees
only sandlot's sandboxes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandlot.engines.base import EngineError, EngineUnavailableError
from sandlot.engines.local.cgroups import CGROUP_ROOT, CgroupLayout

_HYBRID_SHIM = f'umount {CGROUP_ROOT}/unified && exec "$0" "$@"'


class OciRuntimeError(EngineError):
    pass


@dataclass(frozen=True)
class OciRuntime:
    name: str
    binary: str
    root: Path
    layout: CgroupLayout

    @classmethod
    def detect(cls, root: Path, layout: CgroupLayout, preferred: str | None = None) -> OciRuntime:
        candidates = [preferred] if preferred else ["crun", "runc"]
        for name in candidates:
            binary = shutil.which(name)
            if binary:
                root.mkdir(parents=True, exist_ok=True)
                return cls(name=name, binary=binary, root=root / name, layout=layout)
        wanted = preferred or "crun (or runc)"
        raise EngineUnavailableError(
            f"the local engine needs the OCI runtime {wanted}: apt-get install crun"
        )

    def argv(self, *args: str) -> list[str]:
        base = [self.binary, "--root", str(self.root), *args]
        if self.layout is CgroupLayout.HYBRID and self.name == "crun":
            return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                    _HYBRID_SHIM, *base]
        return base

    async def _call(
        self, *args: str, check: bool = True, stdout: Any = None
    ) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *self.argv(*args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout if stdout is not None else asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        rc = proc.returncode if proc.returncode is not None else -1
        text_out = out.decode(errors="replace") if out else ""
        text_err = err.decode(errors="replace").strip() if err else ""
        if check and rc != 0:
            raise OciRuntimeError(f"{self.name} {args[0]} failed: {text_err or text_out}")
        return rc, text_out, text_err

    async def run_detached(
        self, sandbox_id: str, bundle: Path, log_path: Path, pid_file: Path
    ) -> int:
        """Start the sandbox and return the host pid of its init process."""
        # The container's stdout/stderr go to a file: a pipe would keep crun waiting on it.
        with open(log_path, "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *self.argv("run", "--detach", "--pid-file", str(pid_file), "--bundle",
                           str(bundle), sandbox_id),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )
            rc = await proc.wait()
        if rc != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise OciRuntimeError(f"{self.name} could not start the sandbox: " + " | ".join(tail))
        return int(pid_file.read_text().strip())

    async def state(self, sandbox_id: str) -> dict[str, Any] | None:
        rc, out, _ = await self._call("state", sandbox_id, check=False)
        if rc != 0:
            return None
        parsed: dict[str, Any] = json.loads(out)
        return parsed

    async def kill_all(self, sandbox_id: str, signal: str = "KILL") -> None:
        await self._call("kill", "--all", sandbox_id, signal, check=False)

    async def delete(self, sandbox_id: str) -> None:
        await self._call("delete", "--force", sandbox_id, check=False)

    async def list_ids(self) -> list[str]:
        rc, out, _ = await self._call("list", "--format", "json", check=False)
        if rc != 0 or not out.strip():
            return []
        return [entry["id"] for entry in json.loads(out) or []]
