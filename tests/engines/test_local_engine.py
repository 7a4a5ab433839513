"""The local engine from the inside: isolation, limits and cleanup of real crun sandboxes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from sandlot.engines.base import (
    EngineError,
    ImageError,
    InsufficientResources,
    SandboxNotFound,
    SandboxSpec,
)
from sandlot.engines.local import LocalEngine, new_sandbox_id
from sandlot.engines.local.cgroups import CgroupLayout, sandbox_cgroup_dirs
from sandlot.engines.local.mounts import mounts_under
from sandlot.instance_types import INSTANCE_TYPES, get_instance_type

from .conftest import Factory

pytestmark = [pytest.mark.anyio, pytest.mark.root]


async def test_exec_in_default_image(make_sandbox: Factory) -> None:
    sb = await make_sandbox()
    out = await sb.run("echo 'Hello from Koyeb Sandbox!'; python3 -c 'print(6*7)'")
    assert out["code"] == 0
    assert out["stdout"] == "Hello from Koyeb Sandbox!\n42\n"


async def test_busybox_image_without_python(make_sandbox: Factory) -> None:
    sb = await make_sandbox(image="busybox")
    assert await sb.sh("echo hi") == "hi\n"
    out = await sb.run("command -v python3")
    assert out["code"] != 0, "the busybox image must not contain python: the agent brings its own"


async def test_own_hostname_and_pid_namespace(make_sandbox: Factory) -> None:
    sb = await make_sandbox(name="my-box")
    assert (await sb.sh("hostname")).strip() == "my-box"
    assert "sandlot-init" in await sb.sh("cat /proc/1/cmdline")
    pids = (await sb.sh("ls /proc | grep -E '^[0-9]+$'")).split()
    assert len(pids) < 20, f"sandbox sees too many processes: {pids}"
    host_pid = str(os.getpid())
    cmdlines = await sb.sh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
    assert "pytest" not in cmdlines and host_pid not in pids


async def test_no_host_files(make_sandbox: Factory) -> None:
    sb = await make_sandbox()
    out = await sb.run("ls /work /root/.pyenv 2>&1")
    assert out["code"] != 0
    shadow = Path("/etc/shadow").read_bytes()
    inside = await sb.run("sha256sum /etc/shadow")
    assert hashlib.sha256(shadow).hexdigest() not in inside["stdout"]


async def test_only_loopback_network(make_sandbox: Factory) -> None:
    sb = await make_sandbox()
    assert (await sb.sh("ls /sys/class/net")).split() == ["lo"]
    # loopback works inside; nothing else is reachable
    out = await sb.run(
        'python3 -c "import socket; s=socket.socket(); s.settimeout(2); '
        "s.connect(('1.1.1.1', 53))\""
    )
    assert out["code"] != 0 and "unreachable" in out["stderr"].lower()


def _limit_file(layout: CgroupLayout, kind: str) -> str:
    if layout is CgroupLayout.V2:
        return {"memory": "/sys/fs/cgroup/memory.max", "pids": "/sys/fs/cgroup/pids.max"}[kind]
    return {
        "memory": "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "pids": "/sys/fs/cgroup/pids/pids.max",
    }[kind]


@pytest.mark.parametrize("instance_type", ["nano", "small"])
async def test_instance_type_limits(
    make_sandbox: Factory, engine: LocalEngine, instance_type: str
) -> None:
    sb = await make_sandbox(image="busybox", instance_type=instance_type)
    it = INSTANCE_TYPES[instance_type]
    mem = (await sb.sh(f"cat {_limit_file(engine.layout, 'memory')}")).strip()
    pids = (await sb.sh(f"cat {_limit_file(engine.layout, 'pids')}")).strip()
    assert int(mem) == it.memory_bytes
    assert int(pids) == it.pids
    assert (await sb.sh("ulimit -n")).strip() == str(it.open_files)


@pytest.mark.parametrize("instance_type", list(INSTANCE_TYPES))
async def test_every_instance_type_starts(
    make_sandbox: Factory, engine: LocalEngine, instance_type: str
) -> None:
    sb = await make_sandbox(image="busybox", instance_type=instance_type)
    it = INSTANCE_TYPES[instance_type]
    assert int(await sb.sh(f"cat {_limit_file(engine.layout, 'memory')}")) == it.memory_bytes
    nofile = int(await sb.sh("ulimit -n"))
    # the instance type's limit, or the host's ceiling when it cannot grant more
    assert nofile == min(it.open_files, engine._max_open_files or it.open_files)


async def test_fork_bomb_is_contained(make_sandbox: Factory) -> None:
    sb = await make_sandbox(image="busybox", instance_type="nano")
    out = await sb.run(
        "i=0; while [ $i -lt 2000 ]; do sleep 30 & i=$((i+1)); done; echo started $i", timeout=20
    )
    assert out["code"] != 0 or "started 2000" not in out["stdout"]
    # (not `kill -9 -1`: that would take the agent down with the sleeps)
    await sb.run("killall -9 sleep; true")
    assert await sb.sh("echo alive") == "alive\n"


async def test_memory_hog_is_oom_killed_agent_survives(make_sandbox: Factory) -> None:
    sb = await make_sandbox(instance_type="nano")
    other = await make_sandbox(image="busybox")
    out = await sb.run("python3 -c 'a = bytearray(600 * 2**20); print(len(a))'", timeout=30)
    assert out["code"] != 0
    assert "629145600" not in out["stdout"]
    assert await sb.sh("echo still-here") == "still-here\n"
    assert await other.sh("echo fine") == "fine\n"


async def test_sandboxes_cannot_see_each_other(make_sandbox: Factory) -> None:
    a = await make_sandbox(image="busybox")
    b = await make_sandbox(image="busybox")
    await b.sh("echo secret > /tmp/b-marker; sleep 300 >/dev/null 2>&1 &")
    assert (await a.run("cat /tmp/b-marker"))["code"] != 0
    assert "sleep 300" not in await a.sh("ps -o args")


async def test_root_inside_is_unprivileged_outside(make_sandbox: Factory) -> None:
    sb = await make_sandbox(image="busybox")
    assert (await sb.sh("id -u")).strip() == "0"
    assert sb.info.pid
    status = Path(f"/proc/{sb.info.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    host_uid = int(uid_line.split()[1])
    assert host_uid >= 1_000_000, f"sandbox root is host uid {host_uid}"


async def test_seccomp_and_capabilities(make_sandbox: Factory) -> None:
    sb = await make_sandbox()
    assert (await sb.run("unshare --user true"))["code"] != 0
    assert (await sb.run("mount -t tmpfs none /mnt"))["code"] != 0
    assert "NoNewPrivs:\t1" in await sb.sh("grep NoNewPrivs /proc/self/status")
    # Docker's default set: CAP_SYS_ADMIN (bit 21) absent from the bounding set.
    bnd = int((await sb.sh("grep CapBnd /proc/self/status")).split()[1], 16)
    assert not bnd & (1 << 21)
    # masked paths read empty
    assert (await sb.sh("cat /proc/kcore 2>/dev/null | head -c 10 | wc -c")).strip() == "0"
    # root can still write where it owns things (the image is id-mapped into its range)
    assert (
        await sb.sh("echo x > /etc/new-file && cat /etc/new-file && touch /usr/bin/z && echo ok")
        == "x\nok\n"
    )


async def test_privileged_widens_explicitly(make_sandbox: Factory) -> None:
    sb = await make_sandbox(privileged=True)
    assert (await sb.run("mount -t tmpfs none /mnt && echo mounted"))["stdout"] == "mounted\n"
    bnd = int((await sb.sh("grep CapBnd /proc/self/status")).split()[1], 16)
    assert bnd & (1 << 21)


# -- bad input and faults -----------------------------------------------------------------------


def _spec(image: str = "busybox") -> SandboxSpec:
    return SandboxSpec(
        id=new_sandbox_id(), image=image, instance_type=get_instance_type("nano"), secret="s"
    )


def _assert_nothing_left(engine: LocalEngine, sandbox_id: str) -> None:
    assert not (engine.sandboxes_dir / sandbox_id).exists()
    assert not mounts_under(engine.sandboxes_dir / sandbox_id)
    assert not [d for d in sandbox_cgroup_dirs(engine.layout, sandbox_id) if d.exists()]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert sandbox_id not in loops


async def test_unknown_image(engine: LocalEngine) -> None:
    spec = _spec("No-Such-Image")  # not a registry reference: nothing is pulled
    with pytest.raises(ImageError, match="unknown image"):
        await engine.create(spec)
    _assert_nothing_left(engine, spec.id)


async def test_image_without_sh(engine: LocalEngine, tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    spec = _spec(str(tmp_path))
    with pytest.raises(ImageError, match="no /bin/sh"):
        await engine.create(spec)
    _assert_nothing_left(engine, spec.id)


async def test_broken_rootfs_path(engine: LocalEngine, tmp_path: Path) -> None:
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    with pytest.raises(ImageError, match="not a directory"):
        await engine.create(_spec(str(f)))


def test_unknown_instance_type() -> None:
    with pytest.raises(ValueError, match="unknown instance_type 'huge'"):
        get_instance_type("huge")


def test_missing_runtime(engine_state: Path) -> None:
    from sandlot.engines.base import EngineUnavailableError

    with pytest.raises(EngineUnavailableError, match="no-such-runtime"):
        LocalEngine(engine_state, oci_runtime="no-such-runtime")


async def test_reserved_env_rejected(engine: LocalEngine) -> None:
    spec = SandboxSpec(
        id=new_sandbox_id(),
        image="busybox",
        secret="s",
        instance_type=get_instance_type("nano"),
        env={"SANDBOX_SECRET": "x"},
    )
    with pytest.raises(EngineError, match="reserved"):
        await engine.create(spec)
    _assert_nothing_left(engine, spec.id)


async def test_two_deletes_at_once(engine: LocalEngine) -> None:
    spec = _spec()
    await engine.create(spec)
    await asyncio.gather(engine.delete(spec.id), engine.delete(spec.id))
    _assert_nothing_left(engine, spec.id)
    with pytest.raises(SandboxNotFound):
        await engine.inspect(spec.id)


async def test_delete_during_create(engine: LocalEngine) -> None:
    spec = _spec()
    create = asyncio.create_task(engine.create(spec))
    await asyncio.sleep(0.005)
    await engine.delete(spec.id)
    try:
        await create
    except SandboxNotFound:
        pass
    else:  # create won the race: the delete that follows it must still remove everything
        await engine.delete(spec.id)
    _assert_nothing_left(engine, spec.id)


async def test_processes_ignoring_sigterm_are_killed(
    make_sandbox: Factory, engine: LocalEngine
) -> None:
    sb = await make_sandbox(image="busybox")
    await sb.sh("(trap '' TERM; while true; do sleep 1; done) >/dev/null 2>&1 &")
    await engine.delete(sb.id)
    _assert_nothing_left(engine, sb.id)


async def test_recover_removes_half_created(engine: LocalEngine) -> None:
    spec = _spec()
    await engine.create(spec)
    meta_path = engine.sandboxes_dir / spec.id / "meta.json"
    meta_path.write_text(meta_path.read_text().replace('"ready": true', '"ready": false'))
    removed = await engine.recover()
    assert spec.id in removed
    _assert_nothing_left(engine, spec.id)


@pytest.mark.parametrize("cycles", [int(os.environ.get("SANDLOT_CYCLES", "200"))])
async def test_create_delete_cycles_leave_nothing(engine: LocalEngine, cycles: int) -> None:
    for _ in range(cycles):
        spec = _spec()
        await engine.create(spec)
        await engine.delete(spec.id)
        _assert_nothing_left(engine, spec.id)
    assert list(engine.sandboxes_dir.iterdir()) == []


async def test_disk_quota_on_writable_layer(make_sandbox: Factory) -> None:
    sb = await make_sandbox(image="busybox", instance_type="nano")  # 1 GiB
    out = await sb.run("dd if=/dev/zero of=/big bs=1M count=1100 2>&1; echo rc=$?", timeout=60)
    assert "No space left" in out["stdout"]
    assert await sb.sh("rm /big && echo ok") == "ok\n"


async def test_full_disk_under_state_dir(tmp_path: Path) -> None:
    from sandlot.engines.local.mounts import unmount
    from sandlot.images.store import default_store

    state = tmp_path / "small"
    state.mkdir()
    # room for the agent runtime (its directory and its packed image); then fill the rest
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(state)], check=True)
    try:
        eng = LocalEngine(state, images=default_store())
        eng.agent_runtime()  # fits; then fill the rest of the disk
        filler = state / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * (1 << 20))
        spec = _spec()
        with pytest.raises(InsufficientResources, match="not enough disk") as refused:
            await eng.create(spec)
        assert refused.value.resource == "disk"
        _assert_nothing_left(eng, spec.id)
        filler.unlink()
    finally:
        unmount(state)


async def test_deep_state_dir_keeps_socket_paths_short(tmp_path: Path) -> None:
    from sandlot.images.store import default_store

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    eng = LocalEngine(deep, images=default_store())
    spec = _spec()
    info = await eng.create(spec)
    try:
        assert info.agent_address.unix_path
        assert len(info.agent_address.unix_path) < 100
        from .conftest import SandboxHandle

        handle = SandboxHandle(info, "s")
        await handle.wait_healthy()
        assert await handle.sh("echo deep") == "deep\n"
        await handle.aclose()
    finally:
        await eng.delete(spec.id)


# -- sleep: pause/resume (light) and stop/start (deep) ----------------------------------------


async def test_pause_keeps_memory_and_resume_continues(
    make_sandbox: Factory, engine: LocalEngine
) -> None:
    from sandlot.engines.base import SandboxState

    sb = await make_sandbox(image="busybox")
    await sb.sh("echo 41 > /tmp/n; (sleep 0.2; echo 42 > /tmp/n) >/dev/null 2>&1 &")
    await engine.pause(sb.id)
    assert (await engine.inspect(sb.id)).state is SandboxState.PAUSED
    await asyncio.sleep(0.5)  # frozen: the background job cannot run
    await engine.resume(sb.id)
    assert (await engine.inspect(sb.id)).state is SandboxState.RUNNING
    await asyncio.sleep(0.5)
    assert await sb.sh("cat /tmp/n") == "42\n"


async def test_stop_releases_memory_start_keeps_files(
    make_sandbox: Factory, engine: LocalEngine
) -> None:
    from sandlot.engines.base import SandboxState
    from sandlot.engines.local.mounts import unmount

    sb = await make_sandbox(image="busybox")
    await sb.sh("echo kept > /root/file; sleep 300 >/dev/null 2>&1 &")
    await engine.stop(sb.id)
    assert (await engine.inspect(sb.id)).state is SandboxState.STOPPED
    assert engine.memory_usage(sb.id) is None  # cgroup gone: memory released
    info = await engine.start(sb.id)
    assert info.state is SandboxState.RUNNING
    await sb.wait_healthy()
    assert await sb.sh("cat /root/file") == "kept\n"
    assert "sleep 300" not in await sb.sh("ps -o args")
    # as after a host reboot: the mounts are gone, the files are not
    await engine.stop(sb.id)
    for point in mounts_under(engine.sandboxes_dir / sb.id):
        unmount(point)
    await engine.start(sb.id)
    await sb.wait_healthy()
    assert await sb.sh("cat /root/file") == "kept\n"
    # mounted again with the image's owner range: its files are still root's inside
    assert await sb.sh("stat -c %u:%g /bin/busybox") == "0:0\n"


async def test_start_unknown_sandbox(engine: LocalEngine) -> None:
    with pytest.raises(SandboxNotFound):
        await engine.start("nope")
    with pytest.raises(SandboxNotFound):
        await engine.stop("nope")


async def test_pool_sandbox_is_claimed_by_first_token(engine: LocalEngine) -> None:
    import httpx

    from .conftest import SandboxHandle

    spec = SandboxSpec(
        id=new_sandbox_id(),
        image="busybox",
        secret="",
        instance_type=get_instance_type("nano"),
        pool=True,
    )
    info = await engine.create(spec)
    owner = SandboxHandle(info, "owner-token")
    other = SandboxHandle(info, "someone-else")
    try:
        await owner.wait_healthy()
        assert await owner.sh("echo mine") == "mine\n"  # first token claims it
        with pytest.raises(AssertionError):
            await other.run("true")
        # the claim survives a deep sleep (the agent restarts, reads the persisted secret)
        await engine.stop(spec.id)
        await engine.start(spec.id)
        await owner.wait_healthy()
        assert await owner.sh("echo still-mine") == "still-mine\n"
        r = await other.client.post("/run", json={"cmd": "true"})
        assert r.status_code == httpx.codes.UNAUTHORIZED
    finally:
        await owner.aclose()
        await other.aclose()
        await engine.delete(spec.id)


async def test_sandbox_cannot_redirect_its_agent_socket(
    make_sandbox: Factory, engine: LocalEngine
) -> None:
    """Regression: the agent socket used to live in a directory the sandbox can write, where
    root inside could swap it for a symlink to a host socket that the gateway would use."""
    sb = await make_sandbox(image="busybox")
    directory = engine.sandboxes_dir / sb.id
    sock = Path(sb.info.agent_address.unix_path or "").resolve()
    assert sock.parent == directory.resolve()  # the host-only part of the sandbox's directory
    for shared in ("run", "layer", "etc"):
        assert not sock.is_relative_to((directory / shared).resolve())
    # whatever the sandbox does in its shared directory changes nothing for the host
    await sb.sh("ln -sf /run/sandlot-host.sock /.sandlot/run/agent.sock && ls /.sandlot/run")
    assert await sb.sh("echo still-the-agent") == "still-the-agent\n"
    assert (await sb.run("ls /.sandlot/agent.sock 2>&1"))["code"] != 0


async def test_concurrent_creates(engine: LocalEngine) -> None:
    """Regression: creates run in worker threads; nothing process-wide (like the umask) may be
    changed by one while another starts its sandbox."""
    from .conftest import SandboxHandle

    specs = [_spec() for _ in range(8)]
    infos = await asyncio.gather(*[engine.create(s) for s in specs])
    try:
        for info, spec in zip(infos, specs, strict=True):
            handle = SandboxHandle(info, spec.secret)
            await handle.wait_healthy()
            assert await handle.sh("touch /root/x && echo ok") == "ok\n"
            await handle.aclose()
    finally:
        await asyncio.gather(*[engine.delete(s.id) for s in specs])
    for spec in specs:
        _assert_nothing_left(engine, spec.id)
