"""The sync SDK end to end: SDK → server → LocalEngine sandbox → agent, every seed method and
option."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sandlot import (
    InvalidPortError,
    MissingApiTokenError,
    NoSandboxSecretError,
    Sandbox,
    SandboxCommandError,
    SandboxError,
    SandboxNotFoundError,
    SandboxRequestError,
    SandboxServiceError,
    SandboxTimeoutError,
)
from sandlot.sdk import CancelToken, CommandCancelledError, ExitEvent, StdoutEvent

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.root, pytest.mark.runtimes]


@pytest.fixture
def sb(api_url: str) -> Any:
    with Sandbox.create(image="busybox") as sandbox:
        yield sandbox


@pytest.mark.gvisor_default
def test_hello_example(api_url: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hello.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SANDLOT_URL": api_url},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Hello from Koyeb Sandbox!"


def test_create_with_every_option(api_url: str) -> None:
    sandbox = Sandbox.create(
        image="koyeb/sandbox",
        name="every-option",
        wait_ready=True,
        instance_type="nano",
        exposed_port_protocol="http2",
        env={"GREETING": "hi there", "EMPTY": ""},
        region="local",
        api_token=None,
        timeout=120,
        idle_timeout=0,
        enable_tcp_proxy=False,
        privileged=False,
        registry_secret=None,
        delete_after_delay=3600,
        delete_after_inactivity_delay=600,
        _experimental_enable_light_sleep=True,
        labels={"suite": "sdk", "kind": "every-option"},
        api_url=api_url,
    )
    with sandbox:
        assert sandbox.name == "every-option"
        assert sandbox.image == "default" and sandbox.instance_type == "nano"
        assert sandbox.region == "local" and sandbox.labels["suite"] == "sdk"
        info = sandbox.info
        assert info["idle_timeout"] == 0 and info["delete_after_delay"] == 3600
        assert info["delete_after_inactivity_delay"] == 600
        assert info["enable_light_sleep"] is True and info["exposed_port_protocol"] == "http2"
        r = sandbox.exec('printf "%s|%s" "$GREETING" "${EMPTY-unset}"')
        assert r.stdout == "hi there|"
        # nano = 256 MB
        mem = sandbox.exec(
            "cat /sys/fs/cgroup/memory.max 2>/dev/null || "
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
        ).stdout.strip()
        assert mem == str(256 * 1024 * 1024)
    assert sandbox.status == "deleted"


def test_get_from_id_list_and_secrets(sb: Sandbox) -> None:
    again = Sandbox.get_from_id(sb.id)
    assert again.secret == sb.secret
    assert again.exec("echo same").stdout == "same\n"
    listed = Sandbox.list(name=sb.name)
    assert [s.id for s in listed] == [sb.id]
    assert listed[0].secret is None
    with pytest.raises(NoSandboxSecretError):
        listed[0].exec("true")
    assert Sandbox.list(labels={"nope": "x"}) == []
    again.close()


def test_lifecycle_methods(sb: Sandbox) -> None:
    assert sb.wait_ready(timeout=10, poll_interval=0.1) is True
    assert sb.is_healthy() is True
    assert sb.get_sandbox_url().endswith(f"/sandboxes/{sb.id}/koyeb-sandbox")
    assert sb.get_domain()
    sb.update_lifecycle(delete_after_delay=120, delete_after_inactivity_delay=None)
    assert sb.info["delete_after_delay"] == 120
    assert sb.info["delete_after_inactivity_delay"] is None
    sb.refresh()
    assert sb.info["delete_after_delay"] == 120
    with pytest.raises(SandboxRequestError):
        sb.update_lifecycle(idle_timeout=-1)


def test_exec_results(sb: Sandbox) -> None:
    r = sb.exec("echo out; echo err >&2; exit 7")
    assert (r.stdout, r.stderr, r.code, r.exit_code) == ("out\n", "err\n", 7, 7)
    assert not r.success
    assert sb.exec("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sb.exec("echo $A$B", env={"A": "x", "B": "y"}).stdout == "xy\n"
    # output without trailing newlines, many lines, and non-UTF-8 bytes survive
    assert sb.exec("printf 'a\\nb'").stdout == "a\nb"
    big = sb.exec("i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done").stdout
    assert big.splitlines() == [f"line{i}" for i in range(2000)]
    assert sb.exec("printf '\\377'").stdout == "\ufffd"
    with pytest.raises(SandboxCommandError) as info:
        sb.exec("exit 3", raise_on_error=True)
    assert info.value.result.code == 3
    with pytest.raises(SandboxRequestError):
        sb.exec("true", cwd="/no/such/dir")


def test_exec_callbacks(sb: Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    r = sb.exec("echo a; echo b >&2; echo c", on_stdout=out.append, on_stderr=err.append)
    assert "".join(out) == "a\nc\n" == r.stdout and "".join(err) == "b\n"


def _running(sb: Sandbox, marker: str) -> bool:
    return marker in sb.exec("ps -o args 2>/dev/null || ps").stdout


def test_exec_timeout_kills(sb: Sandbox) -> None:
    start = time.monotonic()
    with pytest.raises(SandboxTimeoutError):
        sb.exec("sleep 31.5", timeout=1)
    assert time.monotonic() - start < 5
    assert not _running(sb, "sleep 31.5")


def test_exec_cancel_token_kills(sb: Sandbox) -> None:
    token = CancelToken()
    threading.Timer(0.5, token.cancel).start()
    start = time.monotonic()
    with pytest.raises(CommandCancelledError):
        sb.exec("sleep 32.5", cancel=token, timeout=60)
    assert time.monotonic() - start < 5
    time.sleep(0.3)
    assert not _running(sb, "sleep 32.5")


def test_exec_stream_listeners_and_iteration(sb: Sandbox) -> None:
    seen: list[tuple[str, Any]] = []
    stream = sb.exec_stream("echo one; echo two >&2; exit 4")
    stream.add_event_listener("stdout", lambda e: seen.append(("stdout", e.data["data"])))
    stream.add_event_listener("stderr", lambda e: seen.append(("stderr", e.data["data"])))
    stream.add_event_listener("exit", lambda e: seen.append(("exit", e.data["code"])))
    stream.add_event_listener("end", lambda e: seen.append(("end", None)))
    result = stream.wait()
    assert ("stdout", "one\n") in seen and ("stderr", "two\n") in seen
    assert seen[-2:] == [("exit", 4), ("end", None)]
    assert result.code == 4
    with pytest.raises(ValueError):
        stream.add_event_listener("nope", print)

    events = list(sb.exec_stream("echo x; echo y"))
    kinds = [type(e).__name__ for e in events]
    assert kinds[-2:] == ["ExitEvent", "EndEvent"] and set(kinds[:-2]) == {"StdoutEvent"}
    assert "".join(e.text for e in events if isinstance(e, StdoutEvent)) == "x\ny\n"
    exit_event = events[-2]
    assert isinstance(exit_event, ExitEvent) and exit_event.code == 0


def test_exec_stream_is_live(sb: Sandbox) -> None:
    start = time.monotonic()
    with sb.exec_stream("echo first; sleep 1; echo second") as stream:
        for event in stream:
            assert event.type == "stdout" and event.data["data"] == "first\n"
            assert time.monotonic() - start < 0.9
            break
    # leaving the block killed it
    assert not _running(sb, "sleep 1")


def test_processes(sb: Sandbox) -> None:
    pid1 = sb.launch_process("sleep 33.5")
    pid2 = sb.launch_process("sleep 34.5", cwd="/tmp", env={"X": "1"})
    procs = {p.id: p for p in sb.list_processes()}
    assert procs[pid1].status == "running" and "sleep 33.5" in procs[pid1].command
    sb.kill_process(pid1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if {p.id: p for p in sb.list_processes()}[pid1].status != "running":
            break
        time.sleep(0.05)
    assert {p.id: p for p in sb.list_processes()}[pid1].status == "killed"
    sb.launch_process("sleep 35.5")
    assert sb.kill_all_processes() == 2
    assert all(p.status != "running" for p in sb.list_processes())
    assert pid2
    with pytest.raises(SandboxRequestError):
        sb.kill_process("no-such-process")


@pytest.mark.gvisor_default
def test_filesystem(sb: Sandbox, tmp_path: Path) -> None:
    fs = sb.filesystem
    fs.mkdir("/work/a/b", recursive=True)
    assert fs.is_dir("/work/a/b") and not fs.is_file("/work/a/b")
    fs.write_file("/work/a/hello.txt", "héllo\nwörld")
    assert fs.read_file("/work/a/hello.txt").content == "héllo\nwörld"
    blob = bytes(range(256)) * 1000
    fs.write_file("/work/a/blob.bin", blob)
    assert fs.read_bytes("/work/a/blob.bin") == blob
    content = fs.read_file("/work/a/blob.bin", encoding="base64")
    assert content.encoding == "base64" and content.bytes == blob
    fs.write_files(
        [{"path": "/work/x.txt", "content": "x"}, {"path": "/work/y.txt", "content": b"\x00y"}]
    )
    fs.write_files({"/work/z.txt": "z"})
    assert sorted(fs.list_dir("/work")) == ["a", "x.txt", "y.txt", "z.txt"]
    assert fs.exists("/work/y.txt") and fs.is_file("/work/y.txt")
    fs.rename_file("/work/x.txt", "/work/x2.txt")
    assert not fs.exists("/work/x.txt") and fs.read_file("/work/x2.txt").content == "x"
    fs.rm("/work/x2.txt")
    assert not fs.exists("/work/x2.txt")
    with pytest.raises(SandboxRequestError):
        fs.rm("/work/a")  # a directory needs recursive=True
    local = tmp_path / "up.bin"
    local.write_bytes(os.urandom(300_000))
    fs.upload_file(local, "/work/up.bin")
    fs.download_file(tmp_path / "down.bin", "/work/up.bin")
    assert (tmp_path / "down.bin").read_bytes() == local.read_bytes()
    fs.rm("/work/a", recursive=True)
    assert not fs.exists("/work/a")
    fs.mkdir("/work/d")
    fs.delete_dir("/work/d")
    assert not fs.exists("/work/d")
    with pytest.raises(SandboxRequestError):
        fs.read_file("/no/such/file")
    with pytest.raises(SandboxRequestError):
        fs.write_file("/no/such/dir/file", "x")
    with pytest.raises(SandboxRequestError):
        fs.write_file("/work/bad", 123)  # type: ignore[arg-type]
    assert fs.list_dir() is not None


def test_ports_and_tcp_proxy(sb: Sandbox) -> None:
    for bad in ("80", 0, 65536, -1, 8.0, True, None):
        with pytest.raises(InvalidPortError):
            sb.expose_port(bad)  # type: ignore[arg-type]
    exposed = sb.expose_port(8080)
    assert exposed.port == exposed["port"] == 8080  # Koyeb's attributes, and the old mapping
    assert exposed["exposed_at"].endswith(f"/sandboxes/{sb.id}/ports/8080/")
    sb.unexpose_port()
    with pytest.raises(SandboxRequestError) as info:
        sb.unexpose_port(8080)  # no longer exposed
    assert info.value.status_code == 404 and "8080" in str(info.value)
    with pytest.raises(InvalidPortError):
        sb.unexpose_port(0)
    with pytest.raises(SandboxRequestError):
        sb.wait_tcp_proxy_ready(timeout=1)  # created without enable_tcp_proxy
    assert sb.get_tcp_proxy_info() is None
    assert issubclass(InvalidPortError, ValueError)


def test_unknown_registry_secret(api_url: str) -> None:
    with pytest.raises(SandboxRequestError, match="no registry secret named 'creds'"):
        Sandbox.create(image="busybox", registry_secret="creds")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"instance_type": "huge"}, "instance_type"),
        ({"env": "A=1"}, "env"),
        ({"env": {"A": 1}}, "env"),
        ({"timeout": -1}, "timeout"),
        ({"idle_timeout": -1}, "idle_timeout"),
        ({"delete_after_delay": -3}, "delete_after_delay"),
        ({"region": "mars"}, "region"),
        ({"image": "No-Such-Image"}, "unknown image"),  # not a reference: nothing is pulled
        ({"labels": {"a": None}}, "labels"),
    ],
)
def test_invalid_create_options(api_url: str, kwargs: dict[str, Any], needle: str) -> None:
    before = {s.id for s in Sandbox.list()}
    with pytest.raises(SandboxRequestError) as info:
        Sandbox.create(**{"image": "busybox", **kwargs})
    assert info.value.status_code == 400 and needle in str(info.value)
    assert {s.id for s in Sandbox.list()} == before  # nothing half-created


def test_not_found_and_deleted(api_url: str) -> None:
    with pytest.raises(SandboxNotFoundError):
        Sandbox.get_from_id("0123456789abcdef01234567")
    sandbox = Sandbox.create(image="busybox")
    sandbox.delete()
    sandbox.delete()  # idempotent
    with pytest.raises(SandboxNotFoundError):
        Sandbox.get_from_id(sandbox.id)
    with pytest.raises(SandboxNotFoundError):
        sandbox.exec("true")


def test_delete_while_streaming(api_url: str) -> None:
    sandbox = Sandbox.create(image="busybox")
    other = Sandbox.get_from_id(sandbox.id)
    stream = sandbox.exec_stream("echo started; sleep 60")
    with pytest.raises(SandboxServiceError):
        for event in stream:
            if event.type == "stdout":
                other.delete()
    other.close()
    sandbox.close()


def test_context_manager_deletes_on_error(api_url: str) -> None:
    with pytest.raises(RuntimeError), Sandbox.create(image="busybox") as sandbox:
        raise RuntimeError("boom")
    with pytest.raises(SandboxNotFoundError):
        Sandbox.get_from_id(sandbox.id)


def test_tcp_server_needs_token(tcp_api: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    url, token = tcp_api
    monkeypatch.delenv("SANDLOT_API_TOKEN", raising=False)
    with pytest.raises(MissingApiTokenError):
        Sandbox.create(api_url=url)
    assert issubclass(MissingApiTokenError, ValueError)
    with pytest.raises(SandboxRequestError) as info:
        Sandbox.create(api_url=url, api_token="sl_wrong")
    assert info.value.status_code == 401
    monkeypatch.setenv("SANDLOT_URL", url)
    monkeypatch.setenv("SANDLOT_API_TOKEN", token)
    with Sandbox.create(image="busybox") as sandbox:
        assert sandbox.exec("echo tcp").stdout == "tcp\n"
        assert [s.id for s in Sandbox.list()] == [sandbox.id]


def test_server_down(tmp_path: Path) -> None:
    with pytest.raises(SandboxServiceError, match="cannot reach"):
        Sandbox.create(api_url=f"unix:{tmp_path / 'nobody.sock'}")
    with pytest.raises(SandboxServiceError):
        Sandbox.create(api_url="http://127.0.0.1:9", api_token="x")
    assert issubclass(SandboxServiceError, SandboxError)
