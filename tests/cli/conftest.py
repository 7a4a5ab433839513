"""CLI tests reuse the SDK tests' real server (LocalEngine, Unix socket in a temporary dir)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdk.conftest import api_url, local_server  # noqa: F401
