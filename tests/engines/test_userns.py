"""A sandbox's user namespace is owned by its own host uid, carries its limits, and is pinned
until unmounted."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from pathlib import Path

import pytest

from sandlot.engines.local import mounts, userns

pytestmark = [pytest.mark.root]

_NS_GET_OWNER_UID = 0xB704
BASE = 3_900_000  # far above any slot the engine tests use


def test_namespace_is_owned_by_the_sandbox_uid(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    pin = tmp_path / "userns"
    userns.create_pinned(BASE, pin, limits={"max_inotify_instances": 7})
    try:
        assert userns.is_pinned(pin)
        fd = os.open(pin, os.O_RDONLY)
        try:
            owner = struct.unpack("I", fcntl.ioctl(fd, _NS_GET_OWNER_UID, b"\0" * 4))[0]
        finally:
            os.close(fd)
        assert owner == BASE  # the kernel charges its per-user counts to the sandbox's uid
        inside = subprocess.run(
            [
                "nsenter",
                f"--user={pin}",
                "sh",
                "-c",
                "cat /proc/self/uid_map /proc/sys/user/max_inotify_instances",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert inside == ["0", str(BASE), str(userns.ID_RANGE), "7"]
    finally:
        mounts.unmount(pin)
    assert not userns.is_pinned(pin)
