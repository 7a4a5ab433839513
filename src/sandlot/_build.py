"""Which sandlot this is, finer than the version: a digest of the installed package's files.

The SDK starts a local server on first use and leaves it running; after ``pip install -U`` (or
an edit of a development checkout) that server still runs the old code. The SDK compares this
digest with the one the server reports and restarts a server of its own installation that is
out of date (:func:`sandlot.sdk._autostart.ensure_local_server`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def build_id() -> str:
    """Digest of the package's source files (paths, sizes, modification times): ~1 ms."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*")):
        if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
            st = path.stat()
            digest.update(
                f"{path.relative_to(PACKAGE_DIR)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()[:16]
