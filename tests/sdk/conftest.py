"""SDK tests: a real sandlot server (in a thread, on a Unix socket in a temporary directory)
running the real LocalEngine (crun sandboxes; needs root). Images come from the host's image
store (built by `python -m sandlot.images build`, which .ci/run does)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.server import RunningServer, start_server

from sandlot.paths import state_dir

IMAGES_DIR = Path(os.environ.get("SANDLOT_TEST_IMAGES_DIR") or state_dir() / "images")


def local_engine_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the local engine needs root (CI runs as root)"
    if not (shutil.which("crun") or shutil.which("runc")):
        return "needs crun or runc (apt-get install crun)"
    return None


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def local_server() -> Iterator[RunningServer]:
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore

    tmp = Path(tempfile.mkdtemp(prefix="sl-sdk-"))
    engine = LocalEngine(tmp / "state", images=ImageStore(IMAGES_DIR))
    srv = start_server(engine, f"sqlite:///{tmp / 'sandlot.db'}", unix_path=tmp / "sandlot.sock")
    yield srv
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def api_url(local_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The server's URL, also exported as SANDLOT_URL (what examples and users rely on)."""
    monkeypatch.setenv("SANDLOT_URL", local_server.url)
    monkeypatch.delenv("SANDLOT_API_TOKEN", raising=False)
    return local_server.url


@pytest.fixture
def tcp_api(local_server: RunningServer) -> Iterator[tuple[str, str]]:
    """The same engine behind a TCP, token-authenticated server: (url, token)."""
    tmp = Path(tempfile.mkdtemp(prefix="sl-tcp-"))
    srv = start_server(local_server.engine, f"sqlite:///{tmp / 'db'}", tcp=True)
    _, token = srv.app.state.control.store.create_token("tcp-project", "test")
    yield srv.url, token
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)
