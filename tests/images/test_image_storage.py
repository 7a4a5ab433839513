"""Built-in images given to the storage uid range (root needed for chown and mknod): owners
shifted, setuid bits and file capabilities kept, device nodes gone."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from sandlot.engines.local.idmap import STORAGE_ID_BASE
from sandlot.images.storage import shift_to_storage, storage_capability

S = STORAGE_ID_BASE
V2_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def test_capabilities_become_v3_of_the_storage_root() -> None:
    v3 = storage_capability(V2_NET_RAW)
    assert v3 == struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, S)
    v1 = struct.pack("<III", 0x01000000, 1 << 13, 0)
    assert storage_capability(v1) == struct.pack("<IIIIII", 0x03000000, 1 << 13, 0, 0, 0, S)
    # a v3 one for root of a namespace inside the image's range moves with the range
    nested = struct.pack("<IIIIII", 0x03000001, 1, 0, 0, 0, 1000)
    assert storage_capability(nested) == struct.pack("<IIIIII", 0x03000001, 1, 0, 0, 0, S + 1000)
    assert storage_capability(struct.pack("<IIIIII", 0x03000001, 1, 0, 0, 0, 1 << 20)) is None
    assert storage_capability(b"junk") is None


@pytest.mark.root
def test_shift_to_storage(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (chown, mknod)")
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "dev").mkdir()
    su = root / "bin" / "su"
    su.write_bytes(b"x")
    su.chmod(0o4755)
    shadow = root / "bin" / "chage"
    shadow.write_bytes(b"x")
    os.chown(shadow, 0, 42)
    shadow.chmod(0o2755)
    ping = root / "bin" / "ping"
    ping.write_bytes(b"x")
    os.setxattr(ping, "security.capability", V2_NET_RAW)
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "fifo")
    (root / "home").mkdir()
    os.chown(root / "home", 1000, 1000)
    (root / "bin" / "sh").symlink_to("su")
    os.chown(root / "bin" / "sh", 0, 0, follow_symlinks=False)

    shift_to_storage(root)

    assert not (root / "dev" / "null").exists()
    assert stat.S_ISFIFO((root / "fifo").lstat().st_mode)
    assert (su.stat().st_uid, stat.S_IMODE(su.stat().st_mode)) == (S, 0o4755)
    assert (shadow.stat().st_gid, stat.S_IMODE(shadow.stat().st_mode)) == (S + 42, 0o2755)
    assert os.getxattr(ping, "security.capability") == storage_capability(V2_NET_RAW)
    assert (root / "home").stat().st_uid == S + 1000
    assert (root / "bin" / "sh").lstat().st_uid == S
    assert root.stat().st_uid == S
