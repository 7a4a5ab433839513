"""SDK tests: a real sandlot server (in a thread, on a Unix socket in a temporary directory)
running the real LocalEngine (crun sandboxes; needs root). Images come from the host's image
store (built by `python -m sandlot.images build`, which .ci/run does).

A test module marked ``pytest.mark.runtimes`` runs each of its tests on both runtimes: its
``api_url`` (and ``tcp_api``) is then a server whose default runtime is crun or gvisor, on the
same engine, so the same ``Sandbox.create()`` calls make a crun or a gVisor sandbox. Which
gVisor cases run is tests/support/runtimes.py's choice (``gvisor_default`` marks, or
``SANDLOT_TEST_RUNTIMES=crun,gvisor`` for all)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.runtimes import RUNTIME_PARAMS, skip_unless_selected
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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("runtimes") is None:
        return
    for name in ("api_url", "tcp_api"):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, RUNTIME_PARAMS, indirect=True)
            return


def _runtime(request: pytest.FixtureRequest) -> str:
    runtime = str(getattr(request, "param", "crun"))
    skip_unless_selected(request, runtime)
    return runtime


@pytest.fixture(scope="session")
def gvisor_server(local_server: RunningServer) -> Iterator[RunningServer]:
    """The same engine behind a second Unix-socket server whose default runtime is gvisor."""
    tmp = Path(tempfile.mkdtemp(prefix="sl-sdk-gv-"))
    srv = start_server(
        local_server.engine,
        f"sqlite:///{tmp / 'sandlot.db'}",
        unix_path=tmp / "sandlot.sock",
        default_runtime="gvisor",
    )
    yield srv
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def sdk_runtime(request: pytest.FixtureRequest) -> str:
    """The runtime this case's sandboxes get by default (crun unless parametrized)."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    return str(params.get("api_url", params.get("tcp_api", "crun")))


@pytest.fixture
def api_url(
    local_server: RunningServer, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> str:
    """The server's URL, also exported as SANDLOT_URL (what examples and users rely on)."""
    server = local_server
    if _runtime(request) == "gvisor":
        server = request.getfixturevalue("gvisor_server")
    monkeypatch.setenv("SANDLOT_URL", server.url)
    monkeypatch.delenv("SANDLOT_API_TOKEN", raising=False)
    return server.url


@pytest.fixture
def tcp_api(
    local_server: RunningServer, request: pytest.FixtureRequest
) -> Iterator[tuple[str, str]]:
    """The same engine behind a TCP, token-authenticated server: (url, token)."""
    runtime = _runtime(request)
    tmp = Path(tempfile.mkdtemp(prefix="sl-tcp-"))
    srv = start_server(
        local_server.engine, f"sqlite:///{tmp / 'db'}", tcp=True, default_runtime=runtime
    )
    _, token = srv.app.state.control.store.create_token("tcp-project", "test")
    yield srv.url, token
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)
