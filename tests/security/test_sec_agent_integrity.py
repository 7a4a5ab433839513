"""The agent stays ours: nothing a sandbox writes changes the code its agent runs.

Each attack is written from inside a real sandbox (as its root), then the sandbox goes through a
deep sleep (every process ends, the agent starts afresh on the kept filesystem): the agent must
answer as before, and the attacker's library -- which writes ``/pwned`` when loaded into a
program of the agent's runtime -- must not have run. Each test also checks the agent's memory
map: every file it maps belongs to the runtime. Before the fix the agent mapped the sandbox's
``/usr/lib/locale/C.utf8/LC_CTYPE`` and ``gconv-modules.cache``, honoured ``/etc/ld.so.preload``
and ``/etc/ld.so.cache``, took the image's ``LD_PRELOAD``, and read a secret the sandbox could
rewrite.
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import subprocess
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from support.local import (
    SandboxHandle,
    create_sandbox,
    deep_sleep,
)
from support.runtimes import engine_state_for_runtimes, runtime_params

from sandlot.engines.local import LocalEngine

pytestmark = [pytest.mark.anyio, pytest.mark.root]

RUNTIME = "/.sandlot/runtime"
PYTHON = f"{RUNTIME}/python/bin/python3"

#: Loaded into a program of the agent's runtime, it leaves a mark; elsewhere it does nothing
#: (the sandbox's own programs load it too, once it is in their preload list).
EVIL_C = r"""
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void pwn(void) {
    char exe[256] = {0};
    if (readlink("/proc/self/exe", exe, sizeof exe - 1) < 0) return;
    if (strncmp(exe, "/.sandlot/runtime/", 18) != 0) return;
    int fd = open("/pwned", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return;
    write(fd, exe, strlen(exe));
    write(fd, "\n", 1);
    close(fd);
}
"""


@pytest.fixture(scope="module")
def evil_library(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the attacker's library")
    d = tmp_path_factory.mktemp("evil")
    (d / "evil.c").write_text(EVIL_C)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(d / "evil.so"), str(d / "evil.c")], check=True
    )
    return (d / "evil.so").read_bytes()


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    """Both runtimes' sandboxes (gVisor's need a state directory every user may search)."""
    with engine_state_for_runtimes("sl-integrity-") as path:
        yield path


@pytest.fixture(params=runtime_params())
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class _Made(list[SandboxHandle]):
    """The sandboxes a test made, all of one runtime."""

    def __init__(self, runtime: str) -> None:
        super().__init__()
        self.runtime = runtime


@pytest.fixture
async def sandboxes(engine: LocalEngine, runtime: str) -> AsyncIterator[_Made]:
    made = _Made(runtime)
    yield made
    for handle in made:
        await handle.aclose()


async def _sandbox(engine: LocalEngine, made: _Made, **spec: object) -> SandboxHandle:
    handle = await create_sandbox(engine, runtime=made.runtime, **spec)
    made.append(handle)
    return handle


async def _put(sb: SandboxHandle, path: str, data: bytes) -> None:
    r = await sb.client.post(
        "/write_file",
        json={
            "path": path,
            "content": base64.b64encode(data).decode(),
            "encoding": "base64",
            "create_parents": True,
        },
    )
    assert r.status_code == 200, r.text


async def _assert_agent_is_ours(sb: SandboxHandle) -> None:
    """The agent answers (several requests: each ends a thread, which loads the unwinder),
    maps nothing but its runtime's files, and no attacker code ran in it."""
    for i in range(4):
        assert await sb.sh(f"echo answer-{i}") == f"answer-{i}\n"
    agent = (await sb.sh("cat /proc/1/task/1/children")).split()[0]
    mapped = set((await sb.sh(f"awk '{{print $6}}' /proc/{agent}/maps")).split())
    foreign = sorted(p for p in mapped if p.startswith("/") and not p.startswith(RUNTIME + "/"))
    assert not foreign, f"the agent maps files of the sandbox: {foreign}"
    marker = await sb.run("cat /pwned")
    assert marker["code"] != 0, f"attacker code ran in the agent's runtime: {marker['stdout']}"


async def test_ld_so_preload_is_ignored(
    engine: LocalEngine, sandboxes: _Made, evil_library: bytes
) -> None:
    """The reported attack: /etc/ld.so.preload, then a deep sleep."""
    sb = await _sandbox(engine, sandboxes)
    await _put(sb, "/evil.so", evil_library)
    await sb.sh("echo /evil.so > /etc/ld.so.preload")
    await deep_sleep(engine, sb)
    await _assert_agent_is_ours(sb)
    # the runtime's loader, started by hand inside, ignores it as well
    assert await sb.sh(f"{PYTHON} -I -S -c 'print(42)'") == "42\n"
    assert (await sb.run("cat /pwned"))["code"] != 0


async def test_library_cache_and_system_directories_are_ignored(
    engine: LocalEngine, sandboxes: _Made, evil_library: bytes
) -> None:
    """A library the runtime lacks is looked up in ld.so.cache, then the system directories:
    both are the sandbox's. glibc loads libgcc_s by name whenever a thread exits."""
    sb = await _sandbox(engine, sandboxes)
    for path in (
        "/opt/evil/libgcc_s.so.1",
        "/opt/evil/libevil.so",
        "/lib/x86_64-linux-gnu/libevil.so",
        "/usr/lib/libevil.so",
        "/lib/libevil.so",
    ):
        await _put(sb, path, evil_library)
    await sb.sh("echo /opt/evil > /etc/ld.so.conf.d/00-evil.conf && ldconfig")
    # the runtime's loader, asked for a library it lacks, finds none of these
    probe = await sb.run(f"{PYTHON} -I -S -c 'import ctypes; ctypes.CDLL(\"libevil.so\")'")
    assert probe["code"] != 0 and "libevil.so" in probe["stderr"]
    assert (await sb.run("cat /pwned"))["code"] != 0
    await deep_sleep(engine, sb)
    await _assert_agent_is_ours(sb)


async def test_locales_and_gconv_modules_are_ignored(
    engine: LocalEngine, sandboxes: _Made, evil_library: bytes
) -> None:
    """A locale's charset names a gconv module, which libc loads: the sandbox's gconv
    directory and locales must mean nothing to the runtime's libc."""
    sb = await _sandbox(engine, sandboxes)
    gconv = "/usr/lib/x86_64-linux-gnu/gconv"
    await _put(sb, f"{gconv}/EVIL.so", evil_library)
    await sb.sh(
        f"rm -f {gconv}/gconv-modules.cache && "
        f"printf 'module EVIL// INTERNAL EVIL 1\\nmodule INTERNAL EVIL// EVIL 1\\n' "
        f">> {gconv}/gconv-modules && "
        "printf garbage > /usr/lib/locale/C.utf8/LC_CTYPE"
    )
    # the runtime's libc, asked for that charset, loads no module of the sandbox
    probe = (
        "import ctypes; libc = ctypes.CDLL('libc.so.6'); "
        "libc.iconv_open.restype = ctypes.c_void_p; "
        "print(libc.iconv_open(b'EVIL//', b'UTF-8//'))"
    )
    await sb.run(f'{PYTHON} -I -S -c "{probe}"')
    assert (await sb.run("cat /pwned"))["code"] != 0
    await deep_sleep(engine, sb)
    await _assert_agent_is_ours(sb)


def _open_terminal(unix_path: str, secret: str) -> bytes:
    """A WebSocket handshake on the agent's terminal route; returns the response head."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(unix_path)
        s.sendall(
            b"GET /pty?cmd=true HTTP/1.1\r\nHost: agent\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + secret.encode() + b"\r\n\r\n"
        )
        return s.recv(4096)


async def test_openssl_configuration_is_ignored(
    engine: LocalEngine, sandboxes: _Made, evil_library: bytes
) -> None:
    """OpenSSL reads openssl.cnf from its built-in directory, and loads the providers it names;
    the agent used hashlib (OpenSSL) for the WebSocket handshake of its terminals."""
    sb = await _sandbox(engine, sandboxes)
    await _put(sb, "/evil.so", evil_library)
    config = (
        "openssl_conf = init\n[init]\nproviders = providers\n[providers]\nevil = evil\n"
        "default = default\n[evil]\nmodule = /evil.so\nactivate = 1\n"
        "[default]\nactivate = 1\n"
    )
    await _put(sb, "/usr/lib/ssl/openssl.cnf", config.encode())
    probe = await sb.run(f"{PYTHON} -I -S -c 'import hashlib; print(hashlib.sha256().name)'")
    assert probe["stdout"] == "sha256\n", probe
    assert (await sb.run("cat /pwned"))["code"] != 0
    await deep_sleep(engine, sb)
    head = await anyio.to_thread.run_sync(
        _open_terminal, str(sb.info.agent_address.unix_path), sb.secret
    )
    assert head.startswith(b"HTTP/1.1 101") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head, head
    await _assert_agent_is_ours(sb)


async def test_python_start_up_files_are_ignored(engine: LocalEngine, sandboxes: _Made) -> None:
    """site, .pth files, sitecustomize, the current directory, a zipped stdlib: all where a
    stock Python would look, none where the agent's does."""
    sb = await _sandbox(engine, sandboxes)
    payload = b"open('/pwned', 'a').write(__file__ + '\\n')\n"
    cwd = (await sb.sh("readlink /proc/1/cwd")).strip()
    for path in (
        "/usr/lib/python3.11/sitecustomize.py",
        "/usr/lib/python3.11/site.py",
        "/usr/local/lib/python3.11/dist-packages/sitecustomize.py",
        "/root/.local/lib/python3.11/site-packages/usercustomize.py",
        f"{cwd}/sandlot/__init__.py",
        f"{cwd}/sandlot/agent/__init__.py",
        f"{cwd}/sandlot/agent/__main__.py",
        f"{cwd}/encodings/__init__.py",
        f"{cwd}/json/__init__.py",
        "/.sandlot/sandlot/__init__.py",
    ):
        await _put(sb, path, payload)
    await _put(sb, "/usr/lib/python3/dist-packages/evil.pth", b"import os; " + payload)
    await sb.sh("cp /usr/lib/python3.11/sitecustomize.py /usr/lib/python311.zip")
    # Python looks for lib/python311.zip in each parent of its executable's directory: the
    # last one, /.sandlot, is the sandbox's -- a zip there was the agent's standard library.
    early = (
        b"import posix\n"
        b"fd = posix.open('/pwned', posix.O_WRONLY | posix.O_CREAT | posix.O_APPEND, 0o644)\n"
        b"posix.write(fd, b'zip\\n')\n"
    )
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("encodings/__init__.py", early)
        z.writestr("os.py", early)
    for directory in ("/.sandlot/lib", "/.sandlot/runtime/lib", "/lib", "/usr/lib"):
        await sb.run(f"mkdir -p {directory}")
        await sb.client.post(
            "/write_file",
            json={
                "path": f"{directory}/python311.zip",
                "content": base64.b64encode(archive.getvalue()).decode(),
                "encoding": "base64",
            },
        )
    probe = await sb.run(f"{PYTHON} -I -S -c 'import sys; print(sys.prefix)'")
    assert probe["stdout"] == f"{RUNTIME}/python\n", probe
    assert (await sb.run("cat /pwned"))["code"] != 0
    await deep_sleep(engine, sb)
    await _assert_agent_is_ours(sb)


async def test_commands_environment_does_not_reach_the_agent(
    engine: LocalEngine, sandboxes: _Made, evil_library: bytes
) -> None:
    """An image (or a create call) may set LD_PRELOAD and friends for its commands; the files
    they name are the sandbox's to rewrite. Commands keep their environment; the agent's
    loader never sees it."""
    env = {
        "LD_PRELOAD": "/evil.so",
        "LD_LIBRARY_PATH": "/opt/evil",
        "GCONV_PATH": "/opt/evil",
        "LOCPATH": "/opt/evil",
        "PYTHONPATH": "/opt/evil",
        "PYTHONSTARTUP": "/opt/evil/x.py",
    }
    sb = await _sandbox(engine, sandboxes, env=env)
    await _put(sb, "/evil.so", evil_library)
    await _put(sb, "/opt/evil/libgcc_s.so.1", evil_library)
    await deep_sleep(engine, sb)
    await _assert_agent_is_ours(sb)
    assert await sb.sh("echo $LD_PRELOAD $PYTHONPATH") == "/evil.so /opt/evil\n"
    agent = (await sb.sh("cat /proc/1/task/1/children")).split()[0]
    agent_env = await sb.sh(f"tr '\\0' '\\n' < /proc/{agent}/environ")
    assert "LD_PRELOAD" not in agent_env and "PYTHONPATH" not in agent_env


async def test_agent_configuration_cannot_be_rewritten(
    engine: LocalEngine, sandboxes: _Made
) -> None:
    """The agent's secret was a file root inside could rewrite: after a deep sleep the agent
    took the sandbox's word for it and shut its owner out."""
    sb = await _sandbox(engine, sandboxes)
    secret = await sb.run("ls /.sandlot/config/secret /.sandlot/run/secret 2>/dev/null")
    for path in secret["stdout"].split():
        await sb.run(f"chmod 600 {path}; echo attacker > {path}")
    await sb.run("echo attacker > /.sandlot/config/secret; echo '{}' > /.sandlot/config/env")
    await deep_sleep(engine, sb)
    await _assert_agent_is_ours(sb)  # the owner's secret still opens it
    assert await sb.sh("echo $HOME") == "/root\n"  # and its commands' env is intact


async def test_mount_points_cannot_be_redirected(engine: LocalEngine, sandboxes: _Made) -> None:
    """Root inside can rename /.sandlot (mounts move along) and leave symlinks where the
    platform mounts things at the next start: /.sandlot/runtime pointing into /.sandlot/run
    put the runtime under the later run mount, and the agent could not start."""
    sb = await _sandbox(engine, sandboxes)
    await sb.sh(
        "mv /.sandlot /.old && mkdir -p /.sandlot/run/rt && "
        "ln -s /.sandlot/run/rt /.sandlot/runtime && ln -s /tmp /.sandlot/config && "
        "mkdir -p /.old/run/rt/bin && "
        "printf '#!/bin/sh\\ntouch /pwned\\n' > /.old/run/rt/bin/sandlot-init"
    )
    await deep_sleep(engine, sb)
    await _assert_agent_is_ours(sb)


async def test_privileged_sandbox_cannot_redirect_sys(
    engine: LocalEngine, sandboxes: _Made, evil_library: bytes
) -> None:
    """The runtime's loader looks for its preload list under /sys; a privileged sandbox can
    unmount /sys and leave a symlink there for the next start."""
    sb = await _sandbox(engine, sandboxes, privileged=True)
    await _put(sb, "/evil.so", evil_library)
    await sb.sh(
        "umount -l /sys && mv /sys /sys.old && mkdir /evil-sys && ln -s /evil-sys /sys && "
        "echo /evil.so > /evil-sys/ld.so.preload"
    )
    await deep_sleep(engine, sb)
    await _assert_agent_is_ours(sb)
    assert await sb.sh("test -d /sys/kernel && echo sysfs") == "sysfs\n"


async def test_privileged_sandbox_cannot_rewrite_the_runtime_or_its_configuration(
    engine: LocalEngine, sandboxes: _Made
) -> None:
    """A privileged sandbox may remount its views read-write: the runtime's filesystem is
    read-only underneath, and the configuration's files belong to a user it does not map."""
    sb = await _sandbox(engine, sandboxes, privileged=True)
    for point in (RUNTIME, "/.sandlot/config"):
        await sb.run(f"mount -o remount,rw {point}")
    for path in (PYTHON, "/.sandlot/config/secret", "/.sandlot/config/env"):
        before = await sb.sh(f"stat -c '%a %s %Y' {path}")
        out = await sb.run(f"echo attacker >> {path}")
        assert out["code"] != 0, (path, out)
        # gVisor answers chmod on these with success and changes nothing: the effect counts
        await sb.run(f"chmod 666 {path}; rm -f {path}")
        assert await sb.sh(f"stat -c '%a %s %Y' {path}") == before, path
    out = await sb.run(f"touch {RUNTIME}/new /.sandlot/config/new")
    assert out["code"] != 0, out
    await deep_sleep(engine, sb)
    await _assert_agent_is_ours(sb)
