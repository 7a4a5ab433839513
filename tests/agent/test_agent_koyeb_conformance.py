"""Koyeb's own Python SDK (``koyeb-sdk`` on PyPI) drives our agent.

The SDK's ``Sandbox``/``AsyncSandbox`` normally learn the executor URL from Koyeb's control
plane; here we hand them our agent's address (a TCP listener: the SDK's HTTP client does not
speak Unix sockets) and call their public methods -- exec buffered and streamed, env, cwd,
files, processes, port binding -- exactly as a Koyeb user would.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentlib import SECRET, Agent, start_agent

koyeb_sandbox = pytest.importorskip("koyeb.sandbox", reason="koyeb-sdk is not installed")
koyeb_errors = pytest.importorskip("koyeb.sandbox.errors")
koyeb_fs = pytest.importorskip("koyeb.sandbox.filesystem")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tcp_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, str]]:
    port = _free_port()
    a = start_agent(tmp_path_factory.mktemp("koyeb"), listen=f"tcp:127.0.0.1:{port}")
    try:
        yield a, f"http://127.0.0.1:{port}"
    finally:
        a.stop()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK's httpx client trusts the environment; keep loopback traffic off any proxy.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)


def _connect(cls: Any, url: str) -> Any:
    """A Koyeb SDK sandbox handle pointed at our agent instead of Koyeb's cloud."""
    sb = cls(sandbox_id="sbx", app_id="app", service_id="svc", sandbox_secret=SECRET)
    sb._sandbox_url = (url, None)  # what Koyeb's control plane would have told it
    sb._url = url
    return sb


@pytest.fixture
def sandbox(tcp_agent: tuple[Agent, str]) -> Any:
    return _connect(koyeb_sandbox.Sandbox, tcp_agent[1])


def test_health(sandbox: Any) -> None:
    assert sandbox._check_executor_health() is True


def test_exec_streamed_and_buffered(sandbox: Any) -> None:
    for stream in (True, False):
        result = sandbox.exec("echo hello; echo oops >&2; exit 3", stream=stream)
        assert result.stdout == "hello\n"
        assert result.stderr == "oops\n"
        assert result.exit_code == 3
        assert not result.success


def test_exec_callbacks_get_exact_chunks(sandbox: Any) -> None:
    out: list[str] = []
    err: list[str] = []
    result = sandbox.exec(
        "printf 'a\\nb'; printf 'c\\n' >&2", on_stdout=out.append, on_stderr=err.append
    )
    assert "".join(out) == "a\nb" and "".join(err) == "c\n"
    assert result.exit_code == 0


def test_exec_env_and_cwd(sandbox: Any, tmp_path: Path) -> None:
    for stream in (True, False):
        result = sandbox.exec(
            'echo "$GREETING from $(pwd)"', cwd=str(tmp_path), env={"GREETING": "hi"}, stream=stream
        )
        assert result.stdout == f"hi from {tmp_path}\n"


def test_exec_raise_on_error(sandbox: Any) -> None:
    with pytest.raises(koyeb_sandbox.SandboxCommandError):
        sandbox.exec("exit 1", raise_on_error=True)


def test_bad_cwd_is_a_request_error(sandbox: Any, tmp_path: Path) -> None:
    with pytest.raises(koyeb_errors.SandboxError):
        sandbox.exec("true", cwd=str(tmp_path / "missing"), stream=False)


def test_filesystem(sandbox: Any, tmp_path: Path) -> None:
    fs = sandbox.filesystem
    root = tmp_path / "fs"
    fs.mkdir(str(root / "a" / "b"))
    fs.write_file(str(root / "a" / "f.txt"), "héllo\nworld\n")
    assert fs.read_file(str(root / "a" / "f.txt")).content == "héllo\nworld\n"
    assert sorted(fs.list_dir(str(root / "a"))) == ["b", "f.txt"]
    assert fs.exists(str(root / "a" / "f.txt")) and fs.is_file(str(root / "a" / "f.txt"))
    assert fs.is_dir(str(root / "a" / "b"))
    fs.rename_file(str(root / "a" / "f.txt"), str(root / "a" / "g.txt"))
    assert (root / "a" / "g.txt").read_text() == "héllo\nworld\n"
    binary = bytes(range(256))
    fs.write_file(str(root / "bin"), binary, encoding="base64")
    assert fs.read_file(str(root / "bin"), encoding="base64").content == binary
    fs.delete_file(str(root / "a" / "g.txt"))
    assert not (root / "a" / "g.txt").exists()
    fs.delete_dir(str(root / "a"))
    assert not (root / "a").exists()


def test_filesystem_errors_map_to_sdk_exceptions(sandbox: Any, tmp_path: Path) -> None:
    fs = sandbox.filesystem
    with pytest.raises(koyeb_fs.SandboxFileNotFoundError):
        fs.read_file(str(tmp_path / "missing"))
    with pytest.raises(koyeb_fs.SandboxFileNotFoundError):
        fs.delete_file(str(tmp_path / "missing"))
    with pytest.raises(koyeb_fs.SandboxFileNotFoundError):
        fs.list_dir(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(koyeb_fs.SandboxFileExistsError):
        fs.mkdir(str(tmp_path / "file"))


def test_processes(sandbox: Any) -> None:
    pid = sandbox.launch_process("echo started; sleep 30", env={"X": "1"})
    assert isinstance(pid, str) and pid
    procs = {p.id: p for p in sandbox.list_processes()}
    assert procs[pid].status == "running" and procs[pid].command == "echo started; sleep 30"
    sandbox.kill_process(pid)
    procs = {p.id: p for p in sandbox.list_processes()}
    assert procs[pid].status == "killed" and procs[pid].completed_at
    quick = sandbox.launch_process("exit 0")
    time.sleep(0.3)
    assert {p.id: p for p in sandbox.list_processes()}[quick].status == "completed"
    assert sandbox.kill_all_processes() == 0


def test_ports(sandbox: Any) -> None:
    exposed = sandbox.expose_port(8080)
    assert exposed.port == 8080
    exposed = sandbox.expose_port(9090)  # the SDK unbinds first, so no 409
    assert exposed.port == 9090
    sandbox.unexpose_port()
    sandbox.unexpose_port()  # safe when nothing is bound


def test_async_sandbox(tcp_agent: tuple[Agent, str], tmp_path: Path) -> None:
    async def scenario() -> None:
        sb = _connect(koyeb_sandbox.AsyncSandbox, tcp_agent[1])
        result = await sb.exec("echo async; echo e >&2")
        assert (result.stdout, result.stderr, result.exit_code) == ("async\n", "e\n", 0)
        result = await sb.exec("pwd", cwd=str(tmp_path), stream=False)
        assert result.stdout == f"{tmp_path}\n"
        await sb.filesystem.write_file(str(tmp_path / "f"), "x")
        assert (await sb.filesystem.read_file(str(tmp_path / "f"))).content == "x"
        pid = await sb.launch_process("sleep 30")
        assert pid in {p.id for p in await sb.list_processes()}
        await sb.kill_process(pid)
        exposed = await sb.expose_port(3000)
        assert exposed.port == 3000
        await sb.unexpose_port()

    asyncio.run(scenario())
