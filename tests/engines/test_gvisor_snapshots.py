"""Filesystem snapshots of gVisor sandboxes, and spawns on gVisor (skipped without runsc)."""

from __future__ import annotations

import shutil

import pytest
from support.local import SandboxHandle

from sandlot.engines.local import LocalEngine, new_sandbox_id

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed"),
]


async def test_gvisor_snapshot_spawns_on_both_runtimes(  # type: ignore[no-untyped-def]
    engine: LocalEngine, make_sandbox
) -> None:
    sb: SandboxHandle = await make_sandbox(runtime="gvisor")
    await sb.sh("mkdir -p /work && echo from-gvisor > /work/f && rm /etc/issue")
    snap = "g" + new_sandbox_id()
    await engine.snapshot(sb.id, snap)
    try:
        for runtime in ("gvisor", "crun"):
            child: SandboxHandle = await make_sandbox(runtime=runtime, snapshot=snap)
            assert await child.sh("cat /work/f") == "from-gvisor\n"
            assert (await child.run("test -e /etc/issue"))["code"] == 1
            await engine.delete(child.id)
    finally:
        await engine.delete_snapshot(snap)
