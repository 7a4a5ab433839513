"""The sandbox's own files: mount points fixed up before a start, the agent's log rotated."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandlot.engines.local import own_files

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown and open_tree need root")


def test_mount_points_become_real_directories(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "elsewhere").mkdir(parents=True)
    (root / "sys").symlink_to("elsewhere")
    (root / "proc").write_text("a file")
    (root / ".sandlot").mkdir()
    (root / ".sandlot" / "runtime").symlink_to("/.sandlot/run/rt")
    (root / ".sandlot" / "run").mkdir()
    (root / ".sandlot" / "run" / "kept").write_text("the sandbox's")
    own_files.secure_mount_points(root, 123456)
    for relative in own_files.MOUNT_POINTS:
        path = root / relative
        assert path.is_dir() and not path.is_symlink(), relative
    assert (root / "sys").stat().st_uid == 123456
    assert (root / ".sandlot" / "run" / "kept").read_text() == "the sandbox's"
    assert (root / "elsewhere").is_dir()  # a symlink's target is left alone


def test_symlinked_parent_is_replaced_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / ".sandlot").symlink_to(outside)
    own_files.secure_mount_points(root, 0)
    assert (root / ".sandlot").is_dir() and not (root / ".sandlot").is_symlink()
    assert list(outside.iterdir()) == []


def test_agent_log_is_rotated_past_its_limit(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    own_files.prepare(
        layer,
        0,
        etc={"hostname": "h\n", "hosts": "", "resolv.conf": ""},
        secret="s",
        env={"A": "b"},
    )
    log = own_files.own_dir(layer) / "agent.log"
    big = own_files.LOG_MAX_BYTES + 4096
    log.write_bytes(b"x" * (big - 3) + b"end")
    fd = own_files.open_agent_log(layer)
    try:
        os.write(fd, b"new start\n")
    finally:
        os.close(fd)
    assert log.read_bytes() == b"new start\n"
    rotated = (own_files.own_dir(layer) / "agent.log.1").read_bytes()
    assert len(rotated) == own_files.LOG_MAX_BYTES and rotated.endswith(b"end")
    # under the limit, it is kept and appended to
    fd = own_files.open_agent_log(layer)
    os.write(fd, b"more\n")
    os.close(fd)
    assert log.read_bytes() == b"new start\nmore\n"
    config = own_files.own_dir(layer) / "config"
    assert (config / "secret").stat().st_mode & 0o777 == 0o440
    assert (config / "env").read_text() == '{"A": "b"}'
