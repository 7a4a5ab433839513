"""Koyeb 1.5.5's create options that sandlot answers differently, checked in one place for
both faces of the SDK (docs/snapshots.md and the README list them):

- ``app_id`` names a Koyeb app, and ``enable_mesh=True`` Koyeb's service mesh: neither exists
  here, so both are refused with :class:`UnsupportedFeatureError` (``enable_mesh`` None or
  False, what Koyeb code passes by default, is accepted);
- ``cleanup_on_failure`` is accepted and changes nothing: the server always removes a sandbox
  whose create failed (it would hold host resources), and its events say why;
- ``poll_interval`` is the pace of the SDK's own readiness polls (the server waits for
  readiness itself when ``wait_ready``);
- ``config_files`` are written once the sandbox is ready, each with its permissions;
- ``entrypoint``/``command``/``args`` become the sandbox's main process (:func:`main_command`),
  which its agent starts beside itself and restarts whenever it ends (the image's own
  ENTRYPOINT and CMD are not run, as on Koyeb's sandboxes).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from sandlot.sdk.errors import SandboxRequestError, UnsupportedFeatureError
from sandlot.sdk.types import ConfigFile

_MODE = re.compile(r"0?[0-7]{3,4}")


def refuse_cloud_only(app_id: str | None, enable_mesh: bool | None) -> None:
    if app_id is not None:
        raise UnsupportedFeatureError(
            "app_id names a Koyeb app: sandlot has no apps, every sandbox stands alone "
            "(leave app_id out)"
        )
    if enable_mesh:
        raise UnsupportedFeatureError(
            "enable_mesh is Koyeb's service mesh: sandlot has none (leave it out or pass False)"
        )


def main_command(
    entrypoint: Sequence[str] | None, command: str | None, args: Sequence[str] | None
) -> str | None:
    """One ``sh -c`` line: ``entrypoint`` (argv) followed by ``command`` and ``args`` as
    arguments; without an entrypoint, ``command`` is a shell line and ``args`` its arguments."""
    for name, value in (("entrypoint", entrypoint), ("args", args)):
        if isinstance(value, str) or (
            value is not None and not all(isinstance(v, str) for v in value)
        ):
            raise SandboxRequestError(f"{name} must be a list of strings", 400)
    if command is not None and not isinstance(command, str):
        raise SandboxRequestError("command must be a string", 400)
    if entrypoint:
        return shlex.join([*entrypoint, *([command] if command else []), *(args or [])])
    if command:
        return command + (" " + shlex.join(args) if args else "")
    if args:
        raise SandboxRequestError("args needs an entrypoint or a command to pass them to", 400)
    return None


def config_file_items(config_files: Mapping[str, Any] | None) -> list[tuple[str, bytes, int]]:
    """(path, content, mode) of each config file, checked before anything is created."""
    out = []
    for path, value in (config_files or {}).items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise SandboxRequestError(f"config_files: {path!r} is not an absolute path", 400)
        spec = value if isinstance(value, ConfigFile) else ConfigFile(value)
        content = spec.content.encode() if isinstance(spec.content, str) else spec.content
        if not isinstance(content, bytes):
            raise SandboxRequestError(f"config_files: {path}: content must be str or bytes", 400)
        if not isinstance(spec.permissions, str) or not _MODE.fullmatch(spec.permissions):
            raise SandboxRequestError(
                f"config_files: {path}: permissions must be octal such as '0644', "
                f"not {spec.permissions!r}",
                400,
            )
        out.append((path, content, int(spec.permissions, 8)))
    return out
