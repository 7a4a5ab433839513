"""The test servers clean up after failing tests: sandboxes a test made and never deleted are
removed from the engine when its server stops -- only that server's, the engine may be shared."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from support.server import RunningServer, start_server

from sandlot import Sandbox


def _engine_ids(server: RunningServer) -> set[str]:
    return {info.id for info in asyncio.run(server.engine.list())}


def test_a_stopped_test_server_leaves_no_sandbox(local_server: RunningServer) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sl-cleanup-"))
    other = Sandbox.create(image="busybox", api_url=local_server.url)  # not this server's
    try:
        srv = start_server(local_server.engine, f"sqlite:///{tmp / 'db'}", unix_path=tmp / "s")
        forgotten = Sandbox.create(image="busybox", api_url=srv.url)  # as a failed test would
        assert forgotten.id in _engine_ids(local_server)
        srv.stop()
        ids = _engine_ids(local_server)
        assert forgotten.id not in ids
        assert other.id in ids and other.exec("true").exit_code == 0
    finally:
        other.delete()
        shutil.rmtree(tmp, ignore_errors=True)
