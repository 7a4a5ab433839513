"""AsyncSnapshotTemplate: a snapshot described by its steps (Koyeb's ``DeclarativeSnapshot``,
made by ``AsyncSandbox.template(name, image, workdir=...)``).

``.file(path, content)``, ``.copy(local_src, dst)`` (a file or a directory), ``.run(command,
cwd=...)`` and ``.env(...)`` record steps; ``.build()`` runs them, in the order given, in a
builder sandbox of the image, keeps its filesystem as a snapshot and deletes the builder. A step
that fails stops the build: :class:`TemplateBuildError` carries its exit code and output, and
the builder is deleted all the same. ``.env`` applies to the build's commands (a spawned
sandbox gets its own ``env=``).

Identical templates are built once: the steps (with the content of every file they write) are
hashed into a label of the snapshot, and a build finds an available snapshot of the project
with that label instead of building again.

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sandlot.sdk.errors import SandboxError, TemplateBuildError

#: ``AsyncSandbox.create`` and ``AsyncSnapshot.list``, given by ``AsyncSandbox.template`` (the
#: sandbox module sits above this one).
Factory = Callable[..., Any]

#: The label that holds a template's digest (what makes a build find an earlier one).
DIGEST_LABEL = "sandlot.template-digest"


class AsyncSnapshotTemplate:
    def __init__(
        self,
        create: Factory,
        find: Factory,
        name: str,
        image: str = "default",
        workdir: str | None = None,
        api_token: str | None = None,
        api_url: str | None = None,
        delete_builder: bool = True,
        **create_kwargs: Any,
    ) -> None:
        self._create = create
        self._find = find
        self.name = name
        self.image = image
        self.workdir = workdir
        self._api_token = api_token
        self._api_url = api_url
        self._delete_builder = delete_builder
        self._create_kwargs = create_kwargs
        self._env: dict[str, str] = {}
        #: ("file", path, bytes) | ("copy", local, dst) | ("run", command, cwd)
        self._steps: list[tuple[str, Any, Any]] = []
        self._operations: list[str] = []

    def file(self, path: str, content: str | bytes) -> AsyncSnapshotTemplate:
        """Write ``content`` to ``path`` in the builder."""
        data = content.encode() if isinstance(content, str) else bytes(content)
        self._steps.append(("file", path, data))
        return self

    def copy(self, src: str | os.PathLike[str], dst: str) -> AsyncSnapshotTemplate:
        """Copy a local file, or a directory with everything in it, to ``dst``."""
        if not Path(src).exists():
            raise SandboxError(f"template {self.name}: nothing to copy at {os.fspath(src)!r}")
        self._steps.append(("copy", os.fspath(src), dst))
        return self

    def run(self, command: str, cwd: str | None = None) -> AsyncSnapshotTemplate:
        """Run ``command`` (``sh -c``) in ``cwd`` (default: the template's workdir)."""
        self._steps.append(("run", command, cwd))
        return self

    def env(self, variables: Mapping[str, str] | None = None, **more: str) -> AsyncSnapshotTemplate:
        """Environment variables for the build's commands."""
        self._env.update(variables or {}, **more)
        return self

    def get_operations(self) -> list[str]:
        """What the last :meth:`build` did, step by step (Koyeb's name)."""
        return list(self._operations)

    # -- the build ------------------------------------------------------------------------------

    def _files_of(self, src: str, dst: str) -> list[tuple[str, str]]:
        """(local file, path in the sandbox) for a copy step, in a stable order."""
        if not Path(src).is_dir():
            return [(src, dst)]
        out = []
        for root, dirs, files in os.walk(src):
            dirs.sort()
            for name in sorted(files):
                local = os.path.join(root, name)
                relative = os.path.relpath(local, src).replace(os.sep, "/")
                out.append((local, posixpath.join(dst, relative)))
        return out

    def digest(self) -> str:
        """What identifies this template: its image, workdir, env and steps, with the content
        of every file they write."""
        h = hashlib.sha256()
        head = {"image": self.image, "workdir": self.workdir, "env": self._env}
        h.update(json.dumps(head, sort_keys=True).encode())
        for kind, a, b in self._steps:
            if kind == "copy":
                for local, remote in self._files_of(a, b):
                    h.update(json.dumps(["file", remote]).encode())
                    h.update(hashlib.sha256(Path(local).read_bytes()).digest())
            elif kind == "file":
                h.update(json.dumps(["file", a]).encode())
                h.update(hashlib.sha256(b).digest())
            else:
                h.update(json.dumps([kind, a, b]).encode())
        return h.hexdigest()[:32]

    async def build(
        self,
        snapshot_name: str | None = None,
        on_output: Callable[[str], object] | None = None,
        timeout: float = 600,
    ) -> Any:
        """Run the steps and keep the result as a snapshot (an ``AsyncSnapshot``), or find the
        one an identical template built. ``on_output`` gets the commands' output as it
        comes."""
        digest = self.digest()
        found = await self._find(
            labels={DIGEST_LABEL: digest}, api_token=self._api_token, api_url=self._api_url
        )
        for snapshot in found:
            if snapshot.status.value == "available":
                self._operations = [f"reused: snapshot {snapshot.id}"]
                return snapshot
        self._operations = []
        builder = await self._create(
            image=self.image,
            api_token=self._api_token,
            api_url=self._api_url,
            env=self._env or None,
            **self._create_kwargs,
        )
        try:
            await self._apply(builder, on_output, timeout)
            made = await builder.snapshot(
                snapshot_name or self.name,
                labels={DIGEST_LABEL: digest},
                timeout=timeout,
            )
            made.operations = list(self._operations)
            return made
        finally:
            if self._delete_builder:
                await builder.delete()
            await builder.close()

    async def _apply(
        self,
        builder: Any,
        on_output: Callable[[str], object] | None,
        timeout: float,
    ) -> None:
        if self.workdir:
            self._operations.append(f"set_workdir: {self.workdir}")
            await builder.filesystem.mkdir(self.workdir, recursive=True)
        for number, (kind, a, b) in enumerate(self._steps, start=1):
            if kind == "file":
                self._operations.append(f"create_file: {a}")
                await self._write(builder, a, b)
            elif kind == "copy":
                self._operations.append(f"copy: {a} -> {b}")
                for local, remote in self._files_of(a, b):
                    await self._write(builder, remote, Path(local).read_bytes())
            else:
                self._operations.append(f"run: {a}")
                result = await builder.exec(
                    a,
                    cwd=b or self.workdir,
                    timeout=timeout,
                    on_stdout=on_output,
                    on_stderr=on_output,
                )
                if result.exit_code != 0:
                    raise TemplateBuildError(number, a, result)

    async def _write(self, builder: Any, path: str, data: bytes) -> None:
        parent = posixpath.dirname(path)
        if parent and parent != "/":
            await builder.filesystem.mkdir(parent, recursive=True)
        await builder.filesystem.write_file(path, data)
