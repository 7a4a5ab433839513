"""A sandbox's writable layer is hostile input to the snapshot made of it: what a tenant can
plant there (device nodes, links out, host-root setuid files, host capabilities, a terabyte of
holes, deep trees, odd names, fifos) must not become something the host or the next tenant
trusts. Each test plants it directly in an upper directory, as the sandbox's uid range would
own it, and copies it the way a snapshot does."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.local import IMAGES_DIR
from support.loopfs import loop_filesystem
from support.server import start_server

from sandlot import Sandbox, SandboxNotFoundError, Snapshot
from sandlot.engines.base import InsufficientResources
from sandlot.engines.local import LocalEngine
from sandlot.engines.local.idmap import ID_BASE, ID_RANGE, STORAGE_ID_BASE
from sandlot.images import layer_copy
from sandlot.images.snapshots import SnapshotStore
from sandlot.images.store import Image, ImageStore
from sandlot.sdk._connection import resolve_connection

pytestmark = pytest.mark.root
BASE = ID_BASE + 7 * ID_RANGE  # the tenant's root on the host


@pytest.fixture
def upper(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (device nodes, owners, trusted xattrs)")
    d = tmp_path / "upper"
    d.mkdir()
    os.chown(d, BASE, BASE)
    return d


def _copy(upper: Path, tmp_path: Path) -> tuple[Path, layer_copy.LayerTotals]:
    target = tmp_path / "layer"
    target.mkdir()
    totals = layer_copy.LayerTotals()
    layer_copy.apply_layer(upper, target, layer_copy.from_sandbox(BASE), totals)
    return target, totals


def _v3_caps(rootid: int) -> bytes:
    return struct.pack("<IIIIII", 0x03000000, 1 << 21, 0, 0, 0, rootid)  # cap_sys_admin


def test_device_nodes_and_sockets_are_left_out(upper: Path, tmp_path: Path) -> None:
    os.mknod(upper / "mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))
    os.mknod(upper / "disk", stat.S_IFBLK | 0o666, os.makedev(8, 0))
    os.mknod(upper / "whiteout", stat.S_IFCHR, 0)
    os.mkfifo(upper / "fifo")
    layer, totals = _copy(upper, tmp_path)
    assert sorted(os.listdir(layer)) == ["fifo", "whiteout"]
    assert layer_copy.is_whiteout(os.lstat(layer / "whiteout"))
    assert stat.S_ISFIFO(os.lstat(layer / "fifo").st_mode)  # copied without opening it
    assert totals.dropped == {"device": 1, "special": 1}


def test_nothing_is_owned_by_host_root(upper: Path, tmp_path: Path) -> None:
    (upper / "rootsuid").write_bytes(b"#!/bin/sh\n")
    os.chown(upper / "rootsuid", 0, 0)  # outside the tenant's range: host root
    os.chmod(upper / "rootsuid", 0o4755)
    (upper / "mine").write_bytes(b"x")
    os.chown(upper / "mine", BASE + 1000, BASE + 1000)
    os.chmod(upper / "mine", 0o6755)
    os.symlink("/etc/shadow", upper / "link")
    os.lchown(upper / "link", BASE, BASE)
    layer, _ = _copy(upper, tmp_path)
    for path in (layer, *layer.iterdir()):
        st = os.lstat(path)
        assert STORAGE_ID_BASE <= st.st_uid < ID_BASE and STORAGE_ID_BASE <= st.st_gid < ID_BASE
    assert os.lstat(layer / "rootsuid").st_uid == STORAGE_ID_BASE + 65534  # nobody, not root
    mine = os.lstat(layer / "mine")
    assert mine.st_uid == STORAGE_ID_BASE + 1000 and stat.S_IMODE(mine.st_mode) == 0o6755
    assert mine.st_mtime_ns == os.lstat(upper / "mine").st_mtime_ns  # times kept
    assert os.readlink(layer / "link") == "/etc/shadow"  # a link, never followed
    assert (layer / "link").is_symlink()


def test_host_capabilities_are_dropped_and_tenant_ones_shifted(upper: Path, tmp_path: Path) -> None:
    (upper / "v2").write_bytes(b"x")
    v2 = struct.pack("<IIIII", 0x02000000, 1 << 21, 0, 0, 0)  # valid on the host itself
    os.setxattr(upper / "v2", "security.capability", v2)
    (upper / "v3").write_bytes(b"x")
    os.setxattr(upper / "v3", "security.capability", _v3_caps(BASE))
    (upper / "v3other").write_bytes(b"x")
    os.setxattr(upper / "v3other", "security.capability", _v3_caps(BASE + ID_RANGE))
    layer, totals = _copy(upper, tmp_path)
    with pytest.raises(OSError):
        os.getxattr(layer / "v2", "security.capability")
    with pytest.raises(OSError):
        os.getxattr(layer / "v3other", "security.capability")
    assert os.getxattr(layer / "v3", "security.capability") == _v3_caps(STORAGE_ID_BASE)
    assert totals.dropped == {"capability": 2}


def test_overlay_metadata_other_than_opaque_is_dropped(upper: Path, tmp_path: Path) -> None:
    (upper / "dir").mkdir()
    os.setxattr(upper / "dir", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "dir", "trusted.overlay.redirect", b"/etc")
    os.setxattr(upper / "dir", "user.mine", b"kept")
    layer, _ = _copy(upper, tmp_path)
    assert os.getxattr(layer / "dir", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(layer / "dir", "user.mine") == b"kept"
    with pytest.raises(OSError):
        os.getxattr(layer / "dir", "trusted.overlay.redirect")


def test_a_terabyte_of_holes_and_a_million_links_cost_one_copy(upper: Path, tmp_path: Path) -> None:
    with open(upper / "sparse", "wb") as f:
        f.seek(2**40)
        f.write(b"end")
    (upper / "big").write_bytes(b"a" * 2**20)
    for n in range(200):
        os.link(upper / "big", upper / f"link{n}")
    assert layer_copy.measure(upper).bytes < 3 * 2**20
    layer, totals = _copy(upper, tmp_path)
    assert os.stat(layer / "sparse").st_size == 2**40 + 3
    assert os.stat(layer / "sparse").st_blocks * 512 < 2**20
    assert os.stat(layer / "big").st_nlink == 201
    assert totals.bytes < 3 * 2**20


def test_a_hard_link_to_a_file_outside_the_layer_is_a_copy(upper: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"host")
    os.link(outside, upper / "inside")
    layer, _ = _copy(upper, tmp_path)
    assert (layer / "inside").read_bytes() == b"host"
    assert os.stat(layer / "inside").st_ino != os.stat(outside).st_ino
    (layer / "inside").write_bytes(b"changed")
    assert outside.read_bytes() == b"host"


def test_deep_trees_are_refused(upper: Path, tmp_path: Path) -> None:
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(layer_copy.MAX_DEPTH + 2):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    with pytest.raises(layer_copy.LayerRefused, match="deeper than"):
        layer_copy.measure(upper)


def test_odd_names_survive(upper: Path, tmp_path: Path) -> None:
    names = [b"new\nline", b"\xff\xfebytes", b"-rf", b" ", b"x" * 255]
    for name in names:
        with open(os.path.join(os.fsencode(upper), name), "wb") as f:
            f.write(name)
    layer, _ = _copy(upper, tmp_path)
    assert sorted(os.listdir(os.fsencode(layer))) == sorted(names)


def test_a_snapshot_the_disk_cannot_hold_is_refused_and_leaves_nothing(
    upper: Path, tmp_path: Path
) -> None:
    with open(upper / "data", "wb") as f:
        f.write(os.urandom(2**20) * 40)  # 40 MiB of data, no holes
    with loop_filesystem(tmp_path, 300) as mnt:
        store = SnapshotStore(mnt / "snapshots")
        image = Image("default", tmp_path / "rootfs", uid_base=STORAGE_ID_BASE)
        with pytest.raises(InsufficientResources, match="disk"):
            store.create("big", upper, BASE, image, ())  # 40 MiB + the 256 MiB reserve
        assert os.listdir(store.root) == []


# -- another project's snapshots -------------------------------------------------------------


@pytest.fixture(scope="module")
def two_projects(state: Path) -> Iterator[tuple[str, str, str]]:
    """A TCP server over a real engine, and tokens of two projects: (url, ours, theirs)."""
    tmp = Path(tempfile.mkdtemp(prefix="sl-snap-sec-"))
    engine = LocalEngine(state, images=ImageStore(IMAGES_DIR))
    srv = start_server(engine, f"sqlite:///{tmp / 'db'}", tcp=True)
    store = srv.app.state.control.store
    _, ours = store.create_token("ours", "test")
    _, theirs = store.create_token("theirs", "test")
    yield srv.url, ours, theirs
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def test_another_project_cannot_see_spawn_or_delete_a_snapshot(
    two_projects: tuple[str, str, str],
) -> None:
    url, ours, theirs = two_projects
    with Sandbox.create(image="busybox", api_url=url, api_token=ours) as sb:
        sb.exec("echo private > /secret.txt")
        snap = sb.snapshot("private")
        try:
            with pytest.raises(SandboxNotFoundError):
                Snapshot.get(snap.id, api_url=url, api_token=theirs)
            assert Snapshot.list(api_url=url, api_token=theirs) == []
            with pytest.raises(SandboxNotFoundError):
                Sandbox.create(snapshot=snap.id, api_url=url, api_token=theirs)
            stolen = Snapshot(dict(snap.info), resolve_connection(url, theirs))
            with pytest.raises(SandboxNotFoundError):
                stolen.delete()
            with pytest.raises(SandboxNotFoundError):  # nor snapshot or fork our sandboxes
                Sandbox(dict(sb.info), resolve_connection(url, theirs)).snapshot("mine-now")
            with pytest.raises(SandboxNotFoundError):
                Sandbox(dict(sb.info), resolve_connection(url, theirs)).fork()
            assert Snapshot.get(snap.id, api_url=url, api_token=ours).status.value == "available"
        finally:
            snap.delete()
