"""Snapshots, spawn, fork and templates end to end: the SDK (both faces) against a real server
running real crun sandboxes. Each state (creating -> available -> deleted, failed) and each bad
input (unknown id, a deleted sandbox, FULL on crun, a snapshot in use, a full disk, a failing
template step) is sent."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
from sdk.conftest import IMAGES_DIR, local_engine_unavailable
from support.server import RunningServer, start_server

from sandlot import (
    AsyncSandbox,
    Sandbox,
    SandboxNotFoundError,
    SandboxRequestError,
    SandboxServiceError,
    Snapshot,
    SnapshotStatus,
    SnapshotType,
    TemplateBuildError,
    UnsupportedFeatureError,
)
from sandlot.images import layer_copy


def test_snapshot_spawn_and_delete(api_url: str) -> None:
    with Sandbox.create(image="busybox") as sb:
        sb.exec("mkdir -p /data && echo hello > /data/f && rm /bin/vi")
        snap = sb.snapshot("first")
        assert snap.status is SnapshotStatus.AVAILABLE
        assert snap.snapshot_type is SnapshotType.FILESYSTEM
        assert snap.sandbox_id == sb.id == snap.service_id
        assert snap.size is not None and snap.size > 0
        assert snap.created_at is not None and snap.available_at is not None
        assert snap.image == "busybox"
        assert Snapshot.get(snap.id).name == "first"
        assert snap.id in [s.id for s in Snapshot.list(sandbox_id=sb.id)]
        with snap.spawn(name="spawned") as child:
            assert child.image == "busybox"
            assert child.exec("cat /data/f").stdout == "hello\n"
            assert child.exec("test -e /bin/vi").exit_code == 1
            assert child.secret != sb.secret
            with pytest.raises(SandboxRequestError) as refused:
                snap.delete()
            assert refused.value.status_code == 409 and "in use" in str(refused.value)
        with Sandbox.create_from_snapshot(snap.id) as again:
            assert again.exec("cat /data/f").stdout == "hello\n"
        with Sandbox.create(snapshot="first") as by_name:  # Koyeb's SDK takes names too
            assert by_name.exec("cat /data/f").stdout == "hello\n"
        twin = sb.snapshot("first")
        with pytest.raises(SandboxRequestError, match="give the id"):
            Sandbox.create(snapshot="first")
        twin.delete()
    assert snap.delete()
    assert snap.status is SnapshotStatus.DELETED
    snap.refresh()
    assert snap.status is SnapshotStatus.DELETED
    assert snap.id not in [s.id for s in Snapshot.list()]
    assert snap.id in [s.id for s in Snapshot.list(status=SnapshotStatus.DELETED)]
    with pytest.raises(SandboxRequestError, match="deleted: it cannot be spawned"):
        Sandbox.create(snapshot=snap)
    with pytest.raises(SandboxNotFoundError):
        snap.delete()


def test_bad_inputs(api_url: str) -> None:
    with pytest.raises(SandboxNotFoundError):
        Snapshot.get("0123456789abcdef01234567")
    with pytest.raises(SandboxNotFoundError):
        Snapshot.get("../sandboxes")
    with pytest.raises(SandboxNotFoundError):
        Sandbox.create(snapshot="no-such-snapshot")
    sb = Sandbox.create(image="busybox")
    try:
        with pytest.raises(UnsupportedFeatureError, match="gvisor"):
            sb.snapshot("full", snapshot_type=SnapshotType.FULL)
        with pytest.raises(SandboxRequestError, match="name"):
            sb.snapshot("Not A Name!")
        snap = sb.snapshot("other-image")
        with pytest.raises(SandboxRequestError, match="leave image out"):
            Sandbox.create(image="default", snapshot=snap)
        snap.delete()
    finally:
        sb.delete()
    with pytest.raises(SandboxRequestError, match="was deleted") as deleted:
        sb.snapshot("late")
    assert deleted.value.status_code == 409


def test_full_disk_is_refused_and_leaves_nothing(
    api_url: str, local_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store's disk is this host's: the reserve kept free is raised past what it has.
    monkeypatch.setattr(layer_copy, "DISK_RESERVE", 1 << 60)
    root = local_server.engine.snapshots.root  # type: ignore[attr-defined]
    before = sorted(p.name for p in root.iterdir())
    with Sandbox.create(image="busybox") as sb:
        with pytest.raises(SandboxServiceError) as full:
            sb.snapshot("too-big")
        assert full.value.status_code == 507 and "disk" in str(full.value)
        failed = Snapshot.list(sandbox_id=sb.id)
        assert [s.status for s in failed] == [SnapshotStatus.FAILED]
        assert "disk" in failed[0].messages[0]
        assert sb.exec("echo still running").stdout == "still running\n"  # thawed
        failed[0].delete()  # a failed snapshot has no files: deleting it is fine
    assert sorted(p.name for p in root.iterdir()) == before


def test_snapshot_of_a_spawned_sandbox_stacks(api_url: str) -> None:
    with Sandbox.create(image="busybox") as sb:
        sb.exec("echo 1 > /one")
        first = sb.snapshot("first")
        with first.spawn() as child:
            child.exec("echo 2 > /two")
            second = child.snapshot("second")
        with second.spawn() as grandchild:
            assert grandchild.exec("cat /one /two").stdout == "1\n2\n"
        with pytest.raises(SandboxRequestError, match="base of snapshot"):
            first.delete()
        second.delete()
        first.delete()


def test_fork(api_url: str) -> None:
    with Sandbox.create(image="busybox", env={"WHO": "source"}) as sb:
        sb.exec("echo state > /root/s")
        forks = sb.fork(n=2)
        try:
            assert len({f.id for f in forks} | {sb.id}) == 3
            assert len({f.secret for f in forks} | {sb.secret}) == 3
            for f in forks:
                assert f.exec("cat /root/s; echo $WHO").stdout == "state\nsource\n"
            forks[0].exec("echo changed > /root/s")
            assert forks[1].exec("cat /root/s").stdout == "state\n"
            assert sb.exec("cat /root/s").stdout == "state\n"
            fork_snaps = Snapshot.list(sandbox_id=sb.id)
            assert len(fork_snaps) == 1
        finally:
            for f in forks:
                f.delete()
        # the fork's snapshot went with its last sandbox
        assert Snapshot.list(sandbox_id=sb.id) == []


def test_template_builds_once_and_reports_a_failing_step(
    api_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    local = tmp_path_factory.mktemp("template-src")
    (local / "pkg").mkdir()
    (local / "pkg" / "mod.txt").write_text("module\n")
    (local / "top.txt").write_text("top\n")
    before = {s.id for s in Sandbox.list()}
    template = (
        Sandbox.template("tmpl", "busybox", workdir="/app")
        .env(GREETING="hi")
        .file("/app/conf.ini", "[x]\n")
        .copy(local, "/app/src")
        .run("echo $GREETING > built.txt && cat src/pkg/mod.txt >> built.txt")
    )
    snap = template.build()
    try:
        assert {s.id for s in Sandbox.list()} == before  # the builder is gone
        with snap.spawn() as sb:
            assert sb.exec("cat /app/built.txt /app/conf.ini /app/src/top.txt").stdout == (
                "hi\nmodule\n[x]\ntop\n"
            )
        again = (
            Sandbox.template("tmpl", "busybox", workdir="/app")
            .env(GREETING="hi")
            .file("/app/conf.ini", "[x]\n")
            .copy(local, "/app/src")
            .run("echo $GREETING > built.txt && cat src/pkg/mod.txt >> built.txt")
        )
        assert again.build().id == snap.id  # identical steps: built once
        assert again.get_operations()[0].startswith("reused")
        digest = again.digest()
        (local / "top.txt").write_text("changed\n")  # a copied file's content is a step's
        assert again.digest() != digest
    finally:
        snap.delete()
    failing = Sandbox.template("bad", "busybox").run("echo out; echo err >&2; exit 3")
    with pytest.raises(TemplateBuildError) as failed:
        failing.build()
    assert failed.value.exit_code == 3 and failed.value.step == 1
    assert "out" in str(failed.value) and "err" in str(failed.value)
    assert {s.id for s in Sandbox.list()} == before


@pytest.mark.anyio
async def test_async_face(api_url: str) -> None:
    sb = await AsyncSandbox.create(image="busybox")
    try:
        await sb.exec("echo async > /a")
        snap = await sb.snapshot("async", wait_available=False)
        assert await snap.wait_available(timeout=60)
        child = await snap.spawn()
        try:
            assert (await child.exec("cat /a")).stdout == "async\n"
        finally:
            await child.delete()
            await child.close()
        await snap.delete()
    finally:
        await sb.delete()
        await sb.close()


def test_a_project_keeps_a_bounded_number_of_snapshots(
    api_url: str, local_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_server.app.state.control.snapshots, "max_per_project", 1)
    with Sandbox.create(image="busybox") as sb:
        first = sb.snapshot("one")
        with pytest.raises(SandboxRequestError, match="SANDLOT_MAX_SNAPSHOTS") as refused:
            sb.snapshot("two")
        assert refused.value.status_code == 429
        first.delete()
        sb.snapshot("two").delete()


def test_snapshots_survive_a_server_restart(tmp_path_factory: pytest.TempPathFactory) -> None:
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore
    from sandlot.server.control.tables import SnapshotRow, utcnow

    tmp = Path(tempfile.mkdtemp(prefix="sl-snap-restart-"))
    db, sock = f"sqlite:///{tmp / 'db'}", tmp / "s.sock"
    engine = LocalEngine(tmp / "state", images=ImageStore(IMAGES_DIR))
    srv = start_server(engine, db, unix_path=sock)
    try:
        sb = Sandbox.create(image="busybox", api_url=srv.url)
        sb.exec("echo kept > /k")
        snap = sb.snapshot("kept")
        # The server dies in the middle of a snapshot: its row says creating, the sandbox
        # is frozen for the copy.
        half = SnapshotRow(
            id="half0made0snapshot000000",
            project="default",
            name="half",
            sandbox_id=sb.id,
            region="local",
            snapshot_type="filesystem",
            status="creating",
            image="busybox",
            labels={},
            messages=[],
            ephemeral=False,
            created_at=utcnow(),
        )
        srv.app.state.control.store.add_snapshot(half)
        asyncio.run(engine.pause(sb.id))
    finally:
        srv.stop(keep_sandboxes=True)
    engine = LocalEngine(tmp / "state", images=ImageStore(IMAGES_DIR))
    srv = start_server(engine, db, unix_path=sock)
    try:
        again = Snapshot.get(snap.id, api_url=srv.url)
        assert again.status is SnapshotStatus.AVAILABLE
        with again.spawn() as child:
            assert child.exec("cat /k").stdout == "kept\n"
        stale = Snapshot.get("half0made0snapshot000000", api_url=srv.url)
        assert stale.status is SnapshotStatus.FAILED and "stopped" in stale.messages[0]
        thawed = Sandbox.get_from_id(sb.id, api_url=srv.url)
        assert thawed.exec("cat /k", timeout=30).stdout == "kept\n"  # not left frozen
        thawed.delete()
        again.delete()
        stale.delete()
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/v1/snapshots?status=bogus", None, 400),
        ("GET", "/v1/snapshots?snapshot_type=memory", None, 400),
        ("GET", "/v1/snapshots?label=novalue", None, 400),
        ("GET", "/v1/snapshots/..%2F..%2Fetc", None, 404),
        ("DELETE", "/v1/snapshots/nope", None, 404),
        ("POST", "/v1/sandboxes/nope/snapshots", {"name": "x"}, 404),
        ("POST", "/v1/sandboxes/nope/fork", {"n": 1}, 404),
        ("POST", "/v1/sandboxes/nope/fork", {"n": 17}, 400),
        ("POST", "/v1/sandboxes/nope/fork", {"n": True}, 400),
        ("POST", "/v1/sandboxes/nope/snapshots", {"name": "x", "snapshot_type": "ram"}, 400),
        ("POST", "/v1/sandboxes/nope/snapshots", {"name": "x", "extra": 1}, 400),
        ("POST", "/v1/sandboxes", {"snapshot": "nope"}, 404),
        ("POST", "/v1/sandboxes", {"snapshot": 7}, 400),
    ],
)
def test_bad_api_input_is_a_clear_4xx(
    local_server: RunningServer, method: str, path: str, body: object, status: int
) -> None:
    with local_server.client() as client:
        answer = client.request(method, path, json=body)
    assert answer.status_code == status, answer.text
    assert answer.json().get("error") or answer.json().get("message")
    assert "/var/" not in answer.text and "/tmp/" not in answer.text


def test_the_disk_quota_holds_snapshots_too(api_url: str, local_server: RunningServer) -> None:
    store = local_server.app.state.control.store
    with Sandbox.create(image="busybox") as sb:
        held = store.usage("default").disk_mb
        store.set_quota("default", disk_mb=held)
        try:
            with pytest.raises(SandboxRequestError, match="disk quota") as refused:
                sb.snapshot("over")
            assert refused.value.status_code == 429
        finally:
            store.delete_quota("default")
        sb.snapshot("fits").delete()
