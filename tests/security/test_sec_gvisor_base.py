"""gVisor sandboxes on the server's default, closed state directory.

runsc's gofer opens a sandbox's root filesystem and bind sources by path as the sandbox's own
host uid. Before, a gvisor sandbox needed a state directory every user could search (the
server's default, 0700, refused them with a 503), and the sandbox's directory in it was opened
to its group. Now runsc gets a per-sandbox directory under ``/run/sandlot/gvisor`` holding bind
mounts (engines/local/gvisor_bundle.py): these check that the state directory stays closed,
even to the sandbox's own uid, and that a directory someone else made at that path is refused,
never used.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.local import create_sandbox
from support.runtimes import RUNSC_MISSING

from sandlot.engines.base import EngineUnavailableError, SandboxSpec
from sandlot.engines.local import LocalEngine, gvisor_bundle, idmap, new_sandbox_id
from sandlot.instance_types import get_instance_type

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("runsc") is None, reason=RUNSC_MISSING),
]


def _as_uid(uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


async def test_a_closed_state_directory_runs_gvisor_and_stays_closed(engine: LocalEngine) -> None:
    state = engine.state_dir
    assert not any(os.stat(p).st_mode & stat.S_IXOTH for p in [state, *state.parents][:2])
    sb = await create_sandbox(engine, runtime="gvisor")
    try:
        assert "gvisor" in await sb.sh("cat /proc/version")
        directory = engine.sandboxes_dir / sb.id
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert not os.stat(state).st_mode & (stat.S_IXOTH | stat.S_IXGRP)
        base = os.stat(directory / "layer" / "upper").st_uid  # the sandbox's mapped root
        # The sandbox's own host uid reaches nothing of the state directory...
        denied = _as_uid(base, "ls", str(directory / "bundle" / "rootfs"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        # ...and another uid nothing of runsc's directory either.
        run_dir = gvisor_bundle.sandbox_run_dir(sb.id)
        st = os.stat(run_dir)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, base, 0o710)
        other = _as_uid(base + idmap.ID_RANGE * 1000 + 7, "ls", str(run_dir / "rootfs"))
        assert other.returncode != 0 and "Permission denied" in other.stderr
    finally:
        await sb.aclose()
        await engine.delete(sb.id)
    assert not gvisor_bundle.sandbox_run_dir(sb.id).exists()  # removed with the sandbox


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A run directory of this test's own (the host-wide one is shared by every server)."""
    root = Path(f"/run/sandlot-test-{uuid.uuid4().hex[:8]}")
    root.mkdir(mode=0o755)
    monkeypatch.setattr(gvisor_bundle, "RUN_DIR", root)
    monkeypatch.setattr(gvisor_bundle, "GVISOR_RUN_DIR", root / "gvisor")
    yield root / "gvisor"
    from sandlot.engines.local.mounts import mounts_under, unmount

    for point in mounts_under(root):
        unmount(point)
    shutil.rmtree(root, ignore_errors=True)


def _spec() -> SandboxSpec:
    return SandboxSpec(
        id=new_sandbox_id(),
        image="default",
        instance_type=get_instance_type("micro"),
        secret="s-" + new_sandbox_id(),
        runtime="gvisor",
    )


@pytest.mark.parametrize("kind", ["someone else's", "writable by all", "a symlink"])
async def test_an_attackers_run_directory_is_refused(
    engine: LocalEngine, run_dir: Path, tmp_path: Path, kind: str
) -> None:
    bait = tmp_path / "bait"
    bait.mkdir()
    if kind == "a symlink":
        run_dir.symlink_to(bait)
    else:
        run_dir.mkdir(mode=0o755)
        if kind == "someone else's":
            os.chown(run_dir, 65534, 65534)
        else:
            run_dir.chmod(0o777)
    spec = _spec()
    with pytest.raises(EngineUnavailableError, match="refuse the host's run directory") as caught:
        await engine.create(spec)
    assert str(engine.state_dir) not in str(caught.value)
    assert list(bait.iterdir()) == [] and not (engine.sandboxes_dir / spec.id).exists()
    if kind != "a symlink":
        assert list(run_dir.iterdir()) == []


async def test_a_stale_sandbox_run_directory_is_made_afresh(
    engine: LocalEngine, run_dir: Path
) -> None:
    """A crash's leftover (root's: its parent is root's alone) is taken down, not reused."""
    spec = _spec()
    stale = run_dir / spec.id
    stale.mkdir(parents=True)
    (stale / "rootfs").symlink_to("/")
    (stale / "config.json").write_text("{}")
    info = await engine.create(spec)
    try:
        from support.local import SandboxHandle

        sb = SandboxHandle(info, spec.secret)
        await sb.wait_healthy()
        assert "gvisor" in await sb.sh("cat /proc/version")
        assert not (stale / "rootfs").is_symlink() and os.path.ismount(stale / "rootfs")
        await sb.aclose()
    finally:
        await engine.delete(spec.id)
    assert not stale.exists()


async def test_recover_removes_a_crashed_creates_run_directory(engine: LocalEngine) -> None:
    """A create cut short by a crash (its meta not ready) is removed at recover, run directory
    and its mounts of the sandbox's files included."""
    import json

    sb = await create_sandbox(engine, runtime="gvisor")
    await sb.aclose()
    run_dir = gvisor_bundle.sandbox_run_dir(sb.id)
    assert os.path.ismount(run_dir / "rootfs")
    meta_file = engine.sandboxes_dir / sb.id / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "ready": False}))
    try:
        assert sb.id in await engine.recover()
        assert not run_dir.exists()
    finally:
        await engine.delete(sb.id)


async def test_a_symlink_in_place_of_the_agent_socket_is_never_adopted(
    engine: LocalEngine, tmp_path: Path
) -> None:
    """The engine re-adopts a restarted agent's socket (gvisor_agent_watch.py): a symlink the
    sandbox puts there, to a socket of the host's, is never followed nor bound."""
    import asyncio
    import socket

    from sandlot.engines.local import gvisor_agent_watch

    bait_path = tmp_path / "host.sock"
    bait = socket.socket(socket.AF_UNIX)
    bait.bind(str(bait_path))
    bait.listen(8)
    bait.setblocking(False)
    sb = await create_sandbox(engine, runtime="gvisor")
    try:
        await sb.sh(f"rm -f /.sandlot/run/agent.sock; ln -s {bait_path} /.sandlot/run/agent.sock")
        await asyncio.sleep(gvisor_agent_watch.POLL_INTERVAL * 5)
        assert (await sb.sh("echo still")) == "still\n"  # the adopted socket: the agent's
        try:
            bait.accept()
            raise AssertionError("the host's socket got a connection")
        except BlockingIOError:
            pass
    finally:
        bait.close()
        await sb.aclose()
        await engine.delete(sb.id)
