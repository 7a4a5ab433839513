"""The database on a full disk: its reserve is released so the store keeps working, a write that
found no room raises DatabaseFull (the API's 507, never a 500), and the reserve comes back when
the disk has room again. A real SQLite on a real (tmpfs) filesystem of a few MiB."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandlot.server.control.sqlitefiles import DatabaseFull, DiskReserve
from sandlot.server.control.store import Store

pytestmark = [pytest.mark.root]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


def test_store_survives_a_full_disk(small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiskReserve, "RECHECK", 0.0)
    store = Store(f"sqlite:///{small_disk / 'sandlot.db'}")
    try:
        assert store.reserve is not None and store.reserve.path.exists()
        filler = _fill(small_disk)
        # Writes go on until the disk is really full; the first that finds no room raises
        # DatabaseFull and frees the reserve, and the writes after it have room again.
        full = None
        for i in range(20_000):
            try:
                store.add_event("sb", "note", "x" * 2000 + str(i))
            except DatabaseFull as exc:
                full = exc
                break
        assert full is not None, "the disk never filled"
        assert "disk is full" in str(full)
        assert not store.reserve.path.exists()
        for i in range(100):
            store.add_event("sb", "after", str(i))
        assert len(store.list_events("sb")) >= 100
        # Room again: the reserve is made anew by the next use of the store.
        filler.unlink()
        deadline = time.monotonic() + 10
        while not store.reserve.path.exists():
            assert time.monotonic() < deadline
            store.list_events("sb")
    finally:
        store.close()
