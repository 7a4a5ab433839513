"""Who may use which image: host paths and OCI layouts are the host's files, not a tenant's.

An image reference that names a host path (a root filesystem directory, or ``oci:PATH`` of an OCI
layout) makes the server, as root, mount or unpack that path. A tenant (an API token) that could
name one would boot the host's ``/usr`` or ``/proc/self/root`` as its sandbox, or have the server
unpack a layout the tenant wrote itself into its own sandbox's shared directory (whose host path
it can read in ``/proc/self/mountinfo``). So host paths are for trusted principals only:

- the owner of the server's local Unix socket (the host's administrator), anywhere;
- anybody, inside a directory the administrator listed (``sandlot server
  --trusted-image-dir DIR``): the path is resolved fully (symlinks, ``..``) and must stay inside.

Everyone else gets the built-in images and registry references. The refusal never echoes the
path: whether a host path exists is not a tenant's business either.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sandlot.engines.base import ImageError
from sandlot.images.store import host_path, parse_oci


class ImageRefused(ImageError):
    """This principal may not use this image (HTTP 403)."""


REFUSED = (
    "images from host paths and OCI layouts are only for the server's administrator (its local "
    "socket) or in directories it trusts (sandlot server --trusted-image-dir); use a registry "
    "reference (such as 'python:3.12-slim') or a built-in image ('default', 'busybox')"
)


@dataclass(frozen=True)
class ImageTrust:
    #: Directories (resolved) in which anybody may use host paths as images.
    trusted_dirs: tuple[Path, ...] = ()

    @classmethod
    def from_dirs(cls, dirs: Iterable[str | Path]) -> ImageTrust:
        """Resolve each directory now (a symlink given as a trusted directory is followed once,
        here, by the administrator's choice); each must exist."""
        resolved = []
        for d in dirs:
            path = Path(os.path.realpath(d))
            if not path.is_dir():
                raise ValueError(f"trusted image directory {str(d)!r} is not a directory")
            if path == Path("/"):
                raise ValueError("the host's root cannot be a trusted image directory")
            resolved.append(path)
        return cls(tuple(resolved))

    def check(self, ref: str, *, local: bool) -> str:
        """The reference to create from (a trusted directory's path fully resolved, so that
        what was checked is what is used), or :class:`ImageRefused`. ``local``: the principal
        is the local socket's owner."""
        path = host_path(ref)
        if path is None or local:
            return ref
        if os.path.isabs(path) and "\0" not in path:
            resolved = Path(os.path.realpath(path))
            for trusted in self.trusted_dirs:
                if resolved.is_relative_to(trusted):
                    if ref.startswith("oci:"):
                        return f"oci:{resolved}:{parse_oci(ref[4:])[1]}"
                    return str(resolved)
        raise ImageRefused(REFUSED)
