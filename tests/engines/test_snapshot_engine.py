"""Filesystem snapshots in the local engine: real sandboxes, snapshotted and spawned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandlot.engines.base import SandboxNotFound
from sandlot.engines.local import LocalEngine, new_sandbox_id
from sandlot.engines.local.idmap import ID_BASE, STORAGE_ID_BASE
from sandlot.images import snapshots
from sandlot.images.snapshots import SnapshotInUse, SnapshotNotFound

from .conftest import Factory

pytestmark = [pytest.mark.anyio, pytest.mark.root]


async def test_snapshot_keeps_changes_deletions_and_opaque_dirs(
    engine: LocalEngine, make_sandbox: Factory
) -> None:
    sb = await make_sandbox()
    await sb.sh(
        "mkdir -p /work/sub && echo kept > /work/sub/a.txt && ln /work/sub/a.txt /work/hard"
        " && ln -s /etc/passwd /work/link && rm /etc/issue"
        " && rm -rf /etc/apt && mkdir /etc/apt && echo only > /etc/apt/new"
        " && truncate -s 10G /work/sparse && chmod 4755 /work/sub/a.txt"
    )
    snap = "s" + new_sandbox_id()
    info = await engine.snapshot(sb.id, snap)
    try:
        assert info.size < 10 * 2**20  # the sparse 10 GB file costs nothing
        layer = engine.snapshots.root / snap / "layer"
        for dirpath, dirnames, filenames in os.walk(layer):
            for name in [*dirnames, *filenames]:
                st = os.lstat(os.path.join(dirpath, name))
                assert STORAGE_ID_BASE <= st.st_uid < ID_BASE, (name, st.st_uid)
        # the sandbox runs on after its snapshot (it was frozen only meanwhile)
        assert await sb.sh("cat /work/sub/a.txt") == "kept\n"
        child = await make_sandbox(snapshot=snap)
        assert await child.sh("cat /work/sub/a.txt /work/hard") == "kept\nkept\n"
        assert await child.sh("stat -c '%i %a %U' /work/hard") == await child.sh(
            "stat -c '%i %a %U' /work/sub/a.txt"
        )
        assert (await child.sh("stat -c %a /work/sub/a.txt")).strip() == "4755"
        assert (await child.sh("readlink /work/link")).strip() == "/etc/passwd"
        assert (await child.run("test -e /etc/issue"))["code"] == 1  # the whiteout holds
        assert (await child.sh("ls /etc/apt")).split() == ["new"]  # opaque: nothing below
        assert (await child.sh("stat -c %s /work/sparse")).strip() == str(10 * 2**30)
        # its own changes stay its own
        await child.sh("echo child > /work/sub/a.txt")
        assert await sb.sh("cat /work/sub/a.txt") == "kept\n"
        with pytest.raises(SnapshotInUse, match="in use by a sandbox"):
            await engine.delete_snapshot(snap)
        await engine.delete(child.id)
    finally:
        await engine.delete_snapshot(snap)
    assert not (engine.snapshots.root / snap).exists()
    with pytest.raises(SnapshotNotFound):
        await engine.delete_snapshot(snap)


async def test_snapshots_stack_then_flatten(
    engine: LocalEngine, make_sandbox: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshots, "MAX_LAYERS", 2)
    made: list[str] = []
    try:
        sb = await make_sandbox()
        await sb.sh("echo 1 > /one && echo gone > /gone")
        made.append("a" + new_sandbox_id())
        await engine.snapshot(sb.id, made[-1])
        second = await make_sandbox(snapshot=made[-1])
        await second.sh("echo 2 > /two && rm /gone")
        made.append("b" + new_sandbox_id())
        await engine.snapshot(second.id, made[-1])
        assert len(engine.snapshots.get(made[-1]).layers) == 2  # stacked, nothing copied
        await engine.delete(second.id)
        with pytest.raises(SnapshotInUse, match="base of snapshot"):
            await engine.delete_snapshot(made[0])
        third = await make_sandbox(snapshot=made[-1])
        await third.sh("echo 3 > /three")
        made.append("c" + new_sandbox_id())
        info = await engine.snapshot(third.id, made[-1])
        assert len(engine.snapshots.get(made[-1]).layers) == 1
        assert any("flattened" in m for m in info.messages)
        last = await make_sandbox(snapshot=made[-1])
        assert await last.sh("cat /one /two /three") == "1\n2\n3\n"
        assert (await last.run("test -e /gone"))["code"] == 1
    finally:
        for sandbox in await engine.list():
            await engine.delete(sandbox.id)
        for snap in reversed(made):
            await engine.delete_snapshot(snap)


async def test_snapshot_of_unknown_sandbox(engine: LocalEngine) -> None:
    with pytest.raises(SandboxNotFound):
        await engine.snapshot(new_sandbox_id(), "x" + new_sandbox_id())


async def test_spawn_from_unknown_snapshot(make_sandbox: Factory) -> None:
    with pytest.raises(SnapshotNotFound):
        await make_sandbox(snapshot="nope" + new_sandbox_id())


async def test_snapshots_survive_a_new_engine(engine: LocalEngine, make_sandbox: Factory) -> None:
    sb = await make_sandbox()
    await sb.sh("echo persisted > /p")
    snap = "p" + new_sandbox_id()
    await engine.snapshot(sb.id, snap)
    try:
        (engine.snapshots.root / ".tmp-crashed").mkdir()
        again = LocalEngine(engine.state_dir, images=engine.images)
        await again.recover()
        assert not (engine.snapshots.root / ".tmp-crashed").exists()
        assert again.snapshots.get(snap).layers == (Path(engine.snapshots.root / snap / "layer"),)
    finally:
        await engine.delete_snapshot(snap)


async def test_snapshot_of_a_sleeping_sandbox(engine: LocalEngine, make_sandbox: Factory) -> None:
    sb = await make_sandbox()
    await sb.sh("echo asleep > /s")
    await engine.pause(sb.id)  # light sleep: stays frozen after the snapshot
    light = "l" + new_sandbox_id()
    await engine.snapshot(sb.id, light)
    assert (await engine.inspect(sb.id)).state.value == "paused"
    await engine.resume(sb.id)
    await engine.stop(sb.id)  # deep sleep: nothing runs, the files stay
    deep = "d" + new_sandbox_id()
    await engine.snapshot(sb.id, deep)
    try:
        for snap in (light, deep):
            child = await make_sandbox(snapshot=snap)
            assert await child.sh("cat /s") == "asleep\n"
            await engine.delete(child.id)
    finally:
        await engine.delete_snapshot(light)
        await engine.delete_snapshot(deep)


def test_image_prune_keeps_what_snapshots_stack_on(tmp_path: Path) -> None:
    from sandlot.engines.local.engine import images_in_use
    from sandlot.images.store import Image

    store = snapshots.SnapshotStore(tmp_path / "snapshots")
    upper = tmp_path / "upper"
    upper.mkdir()
    base = Image("default", Path("/images/default-x/rootfs"), uid_base=STORAGE_ID_BASE)
    store.create("kept", upper, ID_BASE, base, ())
    assert images_in_use(tmp_path) == {Path("/images/default-x/rootfs")}
