"""Short aliases of sandbox directories, for the agents' Unix sockets."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

#: Where short aliases of sandbox directories live (see :func:`short_link`).
SOCKET_LINKS_DIR = Path("/run/sandlot/links")


def short_link(target: Path) -> Path:
    """A short symlink to ``target``: Unix socket paths are limited to 107 bytes, and a state
    directory can be deep (``connect`` follows symlinks, so the alias keeps agent socket paths
    short whatever the state directory is)."""
    link = SOCKET_LINKS_DIR / hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:12]
    SOCKET_LINKS_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (link.is_symlink() and os.readlink(link) == str(target.resolve())):
        tmp = link.with_name(link.name + f".{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(target.resolve())
        tmp.rename(link)
    return link
