"""Server restarts over the real LocalEngine: sandboxes keep running while the server is down,
and a sandbox the server was deleting when it died is removed when it comes back."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sdk.conftest import IMAGES_DIR, local_engine_unavailable
from support.server import start_server

from sandlot import Sandbox
from sandlot.engines.base import SandboxNotFound


@pytest.fixture
def tmp_state() -> Iterator[Path]:
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    tmp = Path(tempfile.mkdtemp(prefix="sl-restart-"))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_restart_reattaches_and_finishes_deletes(tmp_state: Path) -> None:
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore

    db = f"sqlite:///{tmp_state / 'db'}"
    sock = tmp_state / "s.sock"
    engine = LocalEngine(tmp_state / "state", images=ImageStore(IMAGES_DIR))
    srv = start_server(engine, db, unix_path=sock)
    try:
        keep = Sandbox.create(image="busybox", api_url=srv.url)
        doomed = Sandbox.create(image="busybox", api_url=srv.url)
        keep.exec("echo kept > /root/state")
        # The server "dies" right after marking `doomed` deleted, before the engine deleted it.
        srv.app.state.control.store.update_sandbox(doomed.id, status="deleted")
    finally:
        srv.stop(keep_sandboxes=True)  # as if it had died: the next server takes over

    engine2 = LocalEngine(tmp_state / "state", images=ImageStore(IMAGES_DIR))
    srv2 = start_server(engine2, db, unix_path=sock)
    try:
        again = Sandbox.get_from_id(keep.id, api_url=srv2.url)
        assert again.exec("cat /root/state").stdout == "kept\n"
        with pytest.raises(SandboxNotFound):
            asyncio.run(engine2.inspect(doomed.id))
        again.delete()
    finally:
        srv2.stop()
        for info in asyncio.run(engine2.list()):
            asyncio.run(engine2.delete(info.id))
