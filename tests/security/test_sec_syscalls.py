"""The seccomp profile holds on both runtimes: a syscall it denies is denied under gVisor too.

Attack sent: code in a gVisor sandbox calls what the profile denies (``unshare`` of a user
namespace, ``add_key``, ``bpf``, a ``personality`` outside Docker's list, ``mount``). On the old
code runsc ignored the profile (its ``--oci-seccomp`` is off by default): ``unshare --user``
succeeded and reached gVisor's own namespace code. runsc also answers every denial with EPERM
whatever ``errnoRet`` says, which would break thread creation through ``clone3``: threads are
checked too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support.local import IMAGES_DIR, SandboxHandle, create_sandbox, local_engine_unavailable
from support.runtimes import runtime_params, searchable_state_dir

from sandlot.engines.local import LocalEngine
from sandlot.images.store import ImageStore

pytestmark = [pytest.mark.root]

_SYSCALL = (
    "python3 -c 'import ctypes,os,sys; l=ctypes.CDLL(None,use_errno=True); "
    "r=l.syscall({args}); print(r, ctypes.get_errno())'"
)
#: Denied by the profile (answered with EPERM, errno 1, on both runtimes).
DENIED = {
    "add_key": _SYSCALL.format(args='248,b"user",b"k",b"v",1,-4'),
    "bpf": _SYSCALL.format(args="321,0,0,0"),
    "personality(READ_IMPLIES_EXEC)": _SYSCALL.format(args="135,0x0400000"),
    "unshare(CLONE_NEWUSER)": _SYSCALL.format(args="272,0x10000000"),
    "unshare(CLONE_NEWNET)": _SYSCALL.format(args="272,0x40000000"),
    "mount": _SYSCALL.format(args='165,b"none",b"/mnt",b"tmpfs",0,0'),
}


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    with searchable_state_dir("sl-syscalls-") as path:
        yield path


@pytest.fixture
async def sandbox(state: Path, runtime: str) -> AsyncIterator[SandboxHandle]:
    engine = LocalEngine(state / "state", images=ImageStore(IMAGES_DIR))
    sb = await create_sandbox(engine, runtime=runtime)
    try:
        yield sb
    finally:
        await sb.aclose()
        await engine.delete(sb.id)


@pytest.mark.anyio
@pytest.mark.parametrize("runtime", runtime_params(gvisor_by_default=True))
async def test_the_profiles_denials_hold(sandbox: SandboxHandle, runtime: str) -> None:
    for name, command in DENIED.items():
        assert (await sandbox.sh(command)).split() == ["-1", "1"], f"{name} on {runtime}"
    assert (await sandbox.run("unshare --user true"))["code"] != 0
    # ... while what the profile allows works, threads (clone3 or clone) included.
    threads = (
        'python3 -c \'import threading; t=threading.Thread(target=print, args=("t",)); '
        "t.start(); t.join()'"
    )
    assert await sandbox.sh(threads) == "t\n"
    assert (await sandbox.sh(_SYSCALL.format(args="39"))).split()[1] == "0"  # getpid


def test_a_runtime_without_errno_ret_gets_clone3_allowed_and_nothing_else() -> None:
    from sandlot.engines.local.seccomp import seccomp_profile

    honoured = seccomp_profile(privileged=False)
    plain = seccomp_profile(privileged=False, errno_ret=False)
    assert any(r.get("errnoRet") for r in honoured["syscalls"])
    assert not any(r.get("errnoRet") for r in plain["syscalls"])
    allowed = {n for r in plain["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    before = {
        n for r in honoured["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]
    }
    assert allowed - before == {"clone3"}
    assert "unshare" not in allowed and "setns" not in allowed
