"""What the real LocalEngine needs in tests: root, crun/runc, and the host's built images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sandlot.paths import state_dir

#: Built by `python -m sandlot.images build` (.ci/run does it); shared by every test server.
IMAGES_DIR = Path(os.environ.get("SANDLOT_TEST_IMAGES_DIR") or state_dir() / "images")


def local_engine_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the local engine needs root (CI runs as root)"
    if not (shutil.which("crun") or shutil.which("runc")):
        return "needs crun or runc (apt-get install crun)"
    return None


def engine_from_env() -> object:
    """``sandlot server --engine support.local:engine_from_env``: a LocalEngine whose state is
    ``$SANDLOT_TEST_ENGINE_STATE`` and whose images are the host's (for benchmarks and tests
    that need the server in its own process)."""
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore

    return LocalEngine(Path(os.environ["SANDLOT_TEST_ENGINE_STATE"]), images=ImageStore(IMAGES_DIR))
