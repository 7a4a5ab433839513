"""The async SDK end to end on the LocalEngine: the same surface as the sync one (which is
generated from it), with task cancellation as the abort signal."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from sandlot import (
    AsyncSandbox,
    InvalidPortError,
    NoSandboxSecretError,
    SandboxCommandError,
    SandboxNotFoundError,
    SandboxRequestError,
    SandboxTimeoutError,
)
from sandlot.sdk import CancelToken, CommandCancelledError, EndEvent, ExitEvent

pytestmark = [pytest.mark.root, pytest.mark.anyio, pytest.mark.runtimes]


@pytest.fixture
async def sb(api_url: str) -> AsyncIterator[AsyncSandbox]:
    async with await AsyncSandbox.create(image="busybox", labels={"suite": "async"}) as sandbox:
        yield sandbox


async def _running(sb: AsyncSandbox, marker: str) -> bool:
    return marker in (await sb.exec("ps -o args 2>/dev/null || ps")).stdout


async def test_hello(api_url: str) -> None:
    async with await AsyncSandbox.create() as sandbox:
        result = await sandbox.exec("echo 'Hello from Koyeb Sandbox!'")
        assert result.stdout.strip() == "Hello from Koyeb Sandbox!"
        sid = sandbox.id
    with pytest.raises(SandboxNotFoundError):
        await AsyncSandbox.get_from_id(sid)


async def test_create_options_and_lookup(api_url: str) -> None:
    sandbox = await AsyncSandbox.create(
        image="busybox",
        name="async-one",
        instance_type="small",
        env={"K": "v"},
        idle_timeout=10,
        delete_after_delay=100,
        delete_after_inactivity_delay=50,
        _experimental_enable_light_sleep=False,
        labels={"a": "b"},
        wait_ready=False,
        timeout=60,
        privileged=False,
        exposed_port_protocol="http",
        region=None,
    )
    try:
        assert await sandbox.wait_ready(timeout=30, poll_interval=0.05)
        assert await sandbox.is_healthy()
        assert (await sandbox.exec("echo $K")).stdout == "v\n"
        again = await AsyncSandbox.get_from_id(sandbox.id)
        assert again.secret == sandbox.secret
        await again.close()
        listed = await AsyncSandbox.list(labels={"a": "b"})
        assert [s.id for s in listed] == [sandbox.id]
        with pytest.raises(NoSandboxSecretError):
            await listed[0].exec("true")
        await sandbox.update_lifecycle(delete_after_delay=None, idle_timeout=0)
        assert sandbox.info["delete_after_delay"] is None and sandbox.info["idle_timeout"] == 0
        assert sandbox.get_sandbox_url().endswith("/koyeb-sandbox") and sandbox.get_domain()
    finally:
        await sandbox.delete()
        await sandbox.close()


async def test_exec(sb: AsyncSandbox) -> None:
    r = await sb.exec("echo out; echo err >&2; exit 5", cwd="/tmp", env={"X": "1"})
    assert (r.stdout, r.stderr, r.code, r.exit_code) == ("out\n", "err\n", 5, 5)
    chunks: list[str] = []
    await sb.exec("echo a; echo b", on_stdout=chunks.append)
    assert "".join(chunks) == "a\nb\n"
    with pytest.raises(SandboxCommandError):
        await sb.exec("false", raise_on_error=True)


async def test_exec_timeout_and_cancel_token(sb: AsyncSandbox) -> None:
    with pytest.raises(SandboxTimeoutError):
        await sb.exec("sleep 41.5", timeout=0.5)
    assert not await _running(sb, "sleep 41.5")
    token = CancelToken()

    async def cancel_soon() -> None:
        await anyio.sleep(0.5)
        token.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_soon)
        with pytest.raises(CommandCancelledError):
            await sb.exec("sleep 42.5", cancel=token)
    await anyio.sleep(0.3)
    assert not await _running(sb, "sleep 42.5")


async def test_task_cancellation_kills_the_command(sb: AsyncSandbox) -> None:
    start = time.monotonic()
    with anyio.move_on_after(0.5):
        await sb.exec("sleep 43.5", timeout=60)
    assert time.monotonic() - start < 2
    deadline = time.monotonic() + 5
    while await _running(sb, "sleep 43.5") and time.monotonic() < deadline:
        await anyio.sleep(0.1)
    assert not await _running(sb, "sleep 43.5")


@pytest.mark.gvisor_default
async def test_exec_stream(sb: AsyncSandbox) -> None:
    names: list[str] = []
    stream = sb.exec_stream("echo hi; echo ho >&2")
    for name in ("stdout", "stderr", "exit", "end"):
        stream.add_event_listener(name, lambda e, n=name: names.append(n))
    result = await stream.wait()
    assert result.code == 0 and names[-2:] == ["exit", "end"]
    assert {"stdout", "stderr"} <= set(names)
    events = [e async for e in sb.exec_stream("exit 9")]
    assert isinstance(events[-2], ExitEvent) and events[-2].code == 9
    assert isinstance(events[-1], EndEvent)


async def test_processes_and_files(sb: AsyncSandbox, tmp_path: Path) -> None:
    pid = await sb.launch_process("sleep 44.5")
    assert any(p.id == pid and p.status == "running" for p in await sb.list_processes())
    assert await sb.kill_all_processes() == 1
    fs = sb.filesystem
    await fs.mkdir("/w/x", recursive=True)
    await fs.write_file("/w/x/f.bin", b"\x00\xff" * 1000)
    assert await fs.read_bytes("/w/x/f.bin") == b"\x00\xff" * 1000
    await fs.write_files({"/w/a.txt": "A", "/w/b.txt": "B"})
    assert sorted(await fs.list_dir("/w")) == ["a.txt", "b.txt", "x"]
    await fs.rename_file("/w/a.txt", "/w/c.txt")
    assert await fs.exists("/w/c.txt") and await fs.is_file("/w/c.txt")
    assert await fs.is_dir("/w/x")
    await fs.rm("/w/c.txt")
    local = tmp_path / "l.bin"
    local.write_bytes(b"\x01\x02")
    await fs.upload_file(local, "/w/l.bin")
    await fs.download_file(tmp_path / "d.bin", "/w/l.bin")
    assert (tmp_path / "d.bin").read_bytes() == b"\x01\x02"
    assert (await fs.read_file("/w/b.txt")).content == "B"
    await fs.delete_dir("/w/x")
    await fs.rm("/w", recursive=True)
    assert not await fs.exists("/w")


async def test_ports_and_errors(sb: AsyncSandbox, api_url: str) -> None:
    with pytest.raises(InvalidPortError):
        await sb.expose_port(0)
    with pytest.raises(InvalidPortError):
        await sb.expose_port("3000")  # type: ignore[arg-type]
    assert await sb.get_tcp_proxy_info() is None  # created without enable_tcp_proxy
    exposed = await sb.expose_port(3000)
    assert exposed["exposed_at"].endswith(f"/sandboxes/{sb.id}/ports/3000/")
    assert [p["port"] for p in await sb.list_exposed_ports()] == [3000]
    await sb.unexpose_port(3000)
    with pytest.raises(SandboxRequestError):
        await sb.unexpose_port(3000)
    with pytest.raises(SandboxRequestError):
        await sb.wait_tcp_proxy_ready(timeout=1)
    with pytest.raises(SandboxRequestError, match="no registry secret named 'creds'"):
        await AsyncSandbox.create(registry_secret="creds")
    with pytest.raises(SandboxRequestError):
        await AsyncSandbox.create(instance_type="galactic")
    with pytest.raises(SandboxNotFoundError):
        await AsyncSandbox.get_from_id("f" * 24)


async def test_concurrent_execs(sb: AsyncSandbox) -> None:
    results: list[Any] = [None] * 10

    async def run(i: int) -> None:
        results[i] = (await sb.exec(f"echo {i}")).stdout

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(run, i)
    assert results == [f"{i}\n" for i in range(10)]


async def test_delete_while_streaming_and_server_down(api_url: str, tmp_path: Path) -> None:
    from sandlot import SandboxServiceError

    sandbox = await AsyncSandbox.create(image="busybox")
    other = await AsyncSandbox.get_from_id(sandbox.id)
    with pytest.raises(SandboxServiceError):
        async for event in sandbox.exec_stream("echo started; sleep 60"):
            if event.type == "stdout":
                await other.delete()
    await other.close()
    await sandbox.close()
    with pytest.raises(SandboxServiceError, match="cannot reach"):
        await AsyncSandbox.create(api_url=f"unix:{tmp_path / 'nobody.sock'}")


async def test_connection_reuse_after_errors(sb: AsyncSandbox) -> None:
    """Error answers and broken-off streams leave the handle's connections usable."""
    with pytest.raises(SandboxRequestError):
        await sb.filesystem.read_file("/no/such/file")
    with anyio.move_on_after(0.3):
        await sb.exec("sleep 5")
    for i in range(20):
        assert (await sb.exec(f"echo {i}")).stdout == f"{i}\n"
