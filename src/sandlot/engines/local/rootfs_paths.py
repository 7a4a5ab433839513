"""Paths inside an image's root filesystem, looked up from the host as the sandbox would see
them: the engine asks whether ``/bin/sh`` and the image's working directory exist before it
starts anything, and an image's symlinks (absolute ones included) must never lead the host's
lookup out of the rootfs."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_in_root(root: Path, relative: str) -> Path | None:
    """Resolve ``relative`` inside ``root`` as the sandbox would see it (absolute symlinks are
    relative to ``root``); None if it does not exist. Never escapes ``root``."""
    parts = [p for p in relative.strip("/").split("/") if p]
    current = root
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = root
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        if not candidate.exists():
            return None
        current = candidate
    return current
