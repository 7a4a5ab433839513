"""A full host disk: the server keeps answering, creates are refused with a clear 507, sandboxes
promised their disk (``--overcommit none``) can still write, and all comes back by itself when
space returns.

Attack sent (issue 12, item 2): with the state filesystem full, SQLite failed ("database or disk
is full") and the API answered 500s; sandboxes under their quota could not write either (their
disks are sparse). Here the state directory and the database live on a small ext4 made by the
test, which the test fills to the last block.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.local import IMAGES_DIR, local_engine_unavailable
from support.loopfs import loop_filesystem
from support.server import RunningServer, start_server

from sandlot import Sandbox

pytestmark = [pytest.mark.root]


@contextlib.contextmanager
def _server_on_small_disk(tmp: Path, overcommit: str) -> Iterator[tuple[RunningServer, Path]]:
    from sandlot.engines.local import LocalEngine
    from sandlot.engines.local.admission import Overcommit
    from sandlot.images.store import ImageStore

    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    # 3 GiB: one nano sandbox's 1 GiB disk, the agent runtime and the database fit.
    with loop_filesystem(tmp, 3 * 1024) as disk:
        engine = LocalEngine(
            disk / "state", images=ImageStore(IMAGES_DIR), overcommit=Overcommit(overcommit)
        )
        srv = start_server(engine, f"sqlite:///{disk / 'sandlot.db'}", unix_path=tmp / "s.sock")
        try:
            yield srv, disk
        finally:
            srv.stop()


def _fill(disk: Path) -> Path:
    """Take every free block of ``disk`` (a preallocated file, then small writes to the end)."""
    filler = disk / "filler"
    vfs = os.statvfs(disk)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, vfs.f_bavail * vfs.f_frsize)
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_END)
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def test_full_state_disk_refuses_creates_and_keeps_answering(tmp_path: Path) -> None:
    with (
        _server_on_small_disk(tmp_path, "none") as (srv, disk),
        Sandbox.create(api_url=srv.url, instance_type="nano", image="busybox") as sb,
    ):
        filler = _fill(disk)
        assert os.statvfs(disk).f_bavail == 0
        with srv.client() as http:
            # A create is refused, clearly: 507, naming the disk, never a 500.
            r = http.post("/v1/sandboxes", json={"instance_type": "nano", "image": "busybox"})
            assert r.status_code == 507, r.text
            assert r.json()["code"] == "insufficient_storage"
            assert "disk" in r.json()["error"]
            # The API still answers reads, and writes that need the database.
            for _ in range(20):
                listed = http.get("/v1/sandboxes")
                assert listed.status_code == 200, listed.text
                r = http.patch(f"/v1/sandboxes/{sb.id}", json={"labels": {"x": "y" * 200}})
                assert r.status_code in (200, 507), r.text
            assert http.get(f"/v1/sandboxes/{sb.id}").status_code == 200
        # The sandbox was promised 1 GiB: it can still write well into it.
        out = sb.exec("dd if=/dev/zero of=/data bs=1M count=300 conv=fsync 2>&1; echo rc=$?")
        assert "rc=0" in out.stdout, out.stdout

        # Space comes back: creates work again, and the database's reserve is re-made.
        filler.unlink()
        with srv.client() as http:
            r = http.post("/v1/sandboxes", json={"instance_type": "nano", "image": "busybox"})
            assert r.status_code == 201, r.text
            assert http.delete(f"/v1/sandboxes/{r.json()['id']}").status_code in (200, 204)
            reserve = srv.app.state.control.store.reserve
            deadline = time.monotonic() + 30
            while not reserve.path.exists():
                assert time.monotonic() < deadline, "the database's reserve was not re-made"
                http.get("/v1/sandboxes")
                time.sleep(0.2)


def test_default_policy_refuses_creates_on_a_full_disk(tmp_path: Path) -> None:
    """With the default (sparse disks), creates are admitted against free space less the 10 %
    reserve: a create that would not fit is a 507, and nothing of it is left behind."""
    with _server_on_small_disk(tmp_path, "allow") as (srv, disk):
        filler = _fill(disk)
        with srv.client() as http:
            r = http.post("/v1/sandboxes", json={"instance_type": "nano", "image": "busybox"})
            assert r.status_code == 507, r.text
            assert r.json()["code"] == "insufficient_storage"
            assert not any((disk / "state" / "sandboxes").iterdir())
            filler.unlink()
            r = http.post("/v1/sandboxes", json={"instance_type": "nano", "image": "busybox"})
            assert r.status_code == 201, r.text
            http.delete(f"/v1/sandboxes/{r.json()['id']}")
