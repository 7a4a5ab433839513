"""The local engine's gvisor runtime: real runsc sandboxes (skipped where runsc is not built).

What differs from crun is in docs/gvisor.md; these check that a sandbox works the same through
its agent, that its kernel is gVisor's, and that delete leaves nothing of it on the host.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.local import SandboxHandle

from sandlot.engines.base import EngineError, EngineUnavailableError
from sandlot.engines.local import LocalEngine
from sandlot.engines.local import cgroups as cgroup_paths
from sandlot.engines.local.mounts import mounts_under

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.root,
    pytest.mark.skipif(
        shutil.which("runsc") is None,
        reason="runsc is not installed (scripts/setup.sh builds it; SANDLOT_SKIP_RUNSC skips it)",
    ),
]


async def test_commands_and_files_run_under_gvisors_kernel(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    sb: SandboxHandle = await make_sandbox(runtime="gvisor")
    assert "gvisor" in await sb.sh("cat /proc/version")
    # syslog(2) is denied by the seccomp profile, which gVisor applies too (as crun does)
    assert "not permitted" in (await sb.run("dmesg"))["stderr"]
    await sb.sh("printf 'hello' > /tmp/f && mkdir -p /work && cp /tmp/f /work/g")
    assert await sb.sh("cat /work/g") == "hello"
    assert (await sb.sh("id -u")).strip() == "0"
    out = await sb.run("exit 3")
    assert out["code"] == 3


async def test_crun_stays_the_default(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    sb: SandboxHandle = await make_sandbox()
    assert "gvisor" not in await sb.sh("cat /proc/version")


async def test_delete_leaves_no_runsc_state_mounts_or_cgroups(
    engine: LocalEngine, make_sandbox
) -> None:  # type: ignore[no-untyped-def]
    sb: SandboxHandle = await make_sandbox(runtime="gvisor")
    directory = engine.sandboxes_dir / sb.id
    assert (directory / "agent.sock").exists()
    runsc_root = engine.state_dir / "oci" / "runsc"
    assert sb.id in {p.name.split("_")[0] for p in runsc_root.iterdir()} or any(
        sb.id in p.name for p in runsc_root.iterdir()
    )
    cgroups = cgroup_paths.sandbox_cgroup_dirs(engine.layout, sb.id)
    assert any(d.exists() for d in cgroups)
    await sb.aclose()
    await engine.delete(sb.id)
    assert not directory.exists()
    assert mounts_under(directory) == []
    assert not any(sb.id in p.name for p in runsc_root.iterdir())
    assert not any(d.exists() for d in cgroups)
    assert await engine._runtime_named("gvisor").list_ids() == []


async def test_an_unknown_runtime_is_refused(engine: LocalEngine) -> None:
    with pytest.raises(EngineError, match="unknown runtime 'kata'"):
        engine._runtime_named("kata")


async def test_a_missing_runsc_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from sandlot.engines.local.cgroups import detect_layout
    from sandlot.engines.local.oci_runtime import OciRuntime

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EngineUnavailableError, match="runsc, which is not installed"):
        OciRuntime.detect_gvisor(tmp_path, detect_layout())


async def test_deep_sleep_keeps_files(engine: LocalEngine, make_sandbox) -> None:  # type: ignore[no-untyped-def]
    """Deep sleep (stop/start: a new agent, its new socket adopted; the files were written to
    the sandbox's disk, not runsc's own overlay)."""
    sb: SandboxHandle = await make_sandbox(runtime="gvisor")
    await sb.sh("echo kept > /root/f")
    await engine.stop(sb.id)
    assert (await engine.inspect(sb.id)).state.value == "stopped"
    await engine.start(sb.id)
    await sb.wait_healthy(timeout=30)
    assert (await sb.sh("cat /root/f")) == "kept\n"


async def test_light_sleep_keeps_processes_and_memory_and_runsc_keeps_answering(
    engine: LocalEngine, make_sandbox
) -> None:  # type: ignore[no-untyped-def]
    """Light sleep through ``runsc pause``: the old way (the cgroup freezer) froze runsc's own
    control server, and every later ``runsc state`` hung for minutes. Paused, inspect answers
    and the memory stays charged; resumed, the counter goes on; a paused sandbox can be
    stopped (deep sleep from light sleep) and deleted."""
    sb: SandboxHandle = await make_sandbox(runtime="gvisor")
    await sb.run(
        "nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.05; done' "
        ">/dev/null 2>&1 &"
    )
    await sb.sh("until [ -s /tmp/n ]; do sleep 0.05; done")
    await engine.pause(sb.id)
    assert (await engine.inspect(sb.id)).state.value == "paused"
    memory = engine.memory_usage(sb.id)
    await engine.resume(sb.id)
    assert (await engine.inspect(sb.id)).state.value == "running"
    first = int(await sb.sh("cat /tmp/n"))
    await sb.sh(f"until [ $(cat /tmp/n) -gt {first} ]; do sleep 0.05; done")  # still counting
    assert memory is not None and memory > 0
    await engine.resume(sb.id)  # resuming a running sandbox is harmless
    await engine.pause(sb.id)
    await engine.stop(sb.id)  # a paused sandbox stops (deep sleep from light sleep)
    assert (await engine.inspect(sb.id)).state.value == "stopped"
