"""The start contract other components rely on: listen addresses, secrets, pool mode,
stale sockets, clean exit, start-up time, and the standard-library-only rule."""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from agentlib import SECRET, SRC, start_agent

AGENT_DIR = Path(SRC) / "sandlot" / "agent"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_listener(tmp_path: Path) -> None:
    port = _free_port()
    a = start_agent(tmp_path, listen=f"tcp:127.0.0.1:{port}")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/health").json() == {"status": "ok"}
            r = c.post(
                "/run", json={"cmd": "echo tcp"}, headers={"Authorization": f"Bearer {SECRET}"}
            )
            assert r.json()["stdout"] == "tcp\n"
    finally:
        assert a.stop() == 0


def test_secret_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    a = start_agent(tmp_path, secret=None, env={"SANDBOX_SECRET_FILE": str(secret_file)})
    try:
        with a.client(secret="from-file") as c:
            assert c.post("/run", json={"cmd": "true"}).status_code == 200
        with a.client(secret="from-file\n".strip() + "x") as c:
            assert c.post("/run", json={"cmd": "true"}).status_code == 401
    finally:
        a.stop()


def test_env_file_is_the_commands_environment(tmp_path: Path) -> None:
    """The engine's way: commands get the file's environment, the agent keeps its own (so
    nothing meant for commands, LD_PRELOAD say, reaches the agent's loader)."""
    env_file = tmp_path / "env"
    env_file.write_text(json.dumps({"PATH": os.environ["PATH"], "ONLY_COMMANDS": "file"}))
    a = start_agent(tmp_path, env={"SANDLOT_ENV_FILE": str(env_file), "ONLY_AGENT": "agent"})
    try:
        with a.client() as c:
            out = c.post("/run", json={"cmd": "echo $ONLY_COMMANDS/$ONLY_AGENT/$SANDLOT_ENV_FILE"})
            assert out.json()["stdout"] == "file//\n"
    finally:
        a.stop()


@pytest.mark.parametrize("content", ["not json", "[1]", '{"A": 1}', '{"": "x"}', '{"A=B": "x"}'])
def test_bad_env_file_refuses_to_start(tmp_path: Path, content: str) -> None:
    env_file = tmp_path / "env"
    env_file.write_text(content)
    with pytest.raises(RuntimeError, match="environment file"):
        start_agent(tmp_path, env={"SANDLOT_ENV_FILE": str(env_file)})


def test_no_secret_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no secret"):
        start_agent(tmp_path, secret=None)


def test_pool_mode_first_token_claims(tmp_path: Path) -> None:
    persist = tmp_path / "claimed"
    env = {"SANDBOX_AUTH_MODE": "pool", "SANDBOX_SECRET_PATH": str(persist)}
    a = start_agent(tmp_path, secret=None, env=env)
    try:
        with a.client(secret="") as c:
            assert c.post("/run", json={"cmd": "true"}).status_code == 401  # no token: no claim
            assert c.get("/health").status_code == 200
        with a.client(secret="owner") as c:
            assert c.post("/run", json={"cmd": "true"}).status_code == 200
        with a.client(secret="intruder") as c:
            assert c.post("/run", json={"cmd": "true"}).status_code == 401
        assert persist.read_text() == "owner"
        assert persist.stat().st_mode & 0o777 == 0o600
    finally:
        a.stop()
    # a restarted agent keeps its owner
    a = start_agent(tmp_path, secret=None, env=env)
    try:
        with a.client(secret="intruder") as c:
            assert c.post("/run", json={"cmd": "true"}).status_code == 401
        with a.client(secret="owner") as c:
            assert c.post("/run", json={"cmd": "true"}).status_code == 200
    finally:
        a.stop()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    a = start_agent(tmp_path)
    try:
        with a.client() as c:
            assert c.get("/health").status_code == 200
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        a.stop()
    assert not path.exists()


def test_refuses_a_live_socket_or_a_regular_file(tmp_path: Path) -> None:
    a = start_agent(tmp_path)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sandlot.agent", "--listen", f"unix:{a.sock}"],
            env={**os.environ, "PYTHONPATH": SRC, "SANDBOX_SECRET": "x"},
            capture_output=True,
            timeout=10,
        )
        assert proc.returncode == 1 and b"already listening" in proc.stderr
    finally:
        a.stop()
    regular = tmp_path / "file"
    regular.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "sandlot.agent", "--listen", f"unix:{regular}"],
        env={**os.environ, "PYTHONPATH": SRC, "SANDBOX_SECRET": "x"},
        capture_output=True,
        timeout=10,
    )
    assert proc.returncode == 1 and b"not a socket" in proc.stderr
    assert regular.read_text() == "x"


@pytest.mark.parametrize("args", [[], ["--listen"], ["--listen", "http:x"], ["--bogus"]])
def test_bad_arguments(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sandlot.agent", *args],
        env={**os.environ, "PYTHONPATH": SRC, "SANDBOX_SECRET": "x"},
        capture_output=True,
        timeout=10,
    )
    assert proc.returncode in (1, 2)
    assert b"usage" in proc.stderr or b"listen" in proc.stderr


def test_sigint_is_a_clean_exit_too(tmp_path: Path) -> None:
    a = start_agent(tmp_path)
    a.proc.send_signal(signal.SIGINT)
    assert a.proc.wait(10) == 0
    assert not Path(a.sock).exists()


def test_first_health_answer_is_fast(tmp_path: Path) -> None:
    """Not a benchmark (those live in bench/), a guard against regressions of 10x."""
    sock = tmp_path / "agent.sock"
    env = {**os.environ, "PYTHONPATH": SRC, "SANDBOX_SECRET": "x"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandlot.agent", "--listen", f"unix:{sock}"], env=env
    )
    try:
        while not sock.exists():
            time.sleep(0.001)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
            assert c.get("http://agent/health").status_code == 200
        assert time.perf_counter() - t0 < 1.0
    finally:
        proc.terminate()
        proc.wait(10)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_agent_imports_only_stdlib_and_itself() -> None:
    for path in AGENT_DIR.glob("*.py"):
        for name in _imported_modules(path):
            top = name.split(".")[0]
            if top == "sandlot":
                assert name.startswith("sandlot.agent"), (path.name, name)
            else:
                assert top in sys.stdlib_module_names or top == "__future__", (path.name, name)


def test_agent_runs_without_site_packages(tmp_path: Path) -> None:
    """-S -I: no site-packages, no user paths -- the agent's runtime in a sandbox."""
    sock = tmp_path / "agent.sock"
    code = (
        "import sys; sys.path.insert(0, {!r}); sys.argv = ['sandlot.agent', '--listen', {!r}];"
        "import runpy; runpy.run_module('sandlot.agent', run_name='__main__')"
    ).format(SRC, f"unix:{sock}")
    proc = subprocess.Popen(
        [sys.executable, "-S", "-I", "-c", code],
        env={"SANDBOX_SECRET": "x", "PATH": "/usr/bin:/bin"},
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
            r = c.post(
                "http://a/run", json={"cmd": "echo ok"}, headers={"Authorization": "Bearer x"}
            )
            assert r.json()["stdout"] == "ok\n"
        heavy = {"asyncio", "ssl", "email", "http.server", "http.client", "uuid", "argparse"}
        r = subprocess.run(
            [
                sys.executable,
                "-S",
                "-I",
                "-c",
                f"import sys; sys.path.insert(0, {SRC!r}); import sandlot.agent.app, "
                "sandlot.agent.__main__; print(','.join(sorted(sys.modules)))",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert not heavy & set(r.stdout.strip().split(",")), r.stdout
    finally:
        proc.terminate()
        proc.wait(10)


def test_sigterm_during_a_stream_kills_the_command_and_exits(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    a = start_agent(tmp_path)
    with (
        a.client() as c,
        c.stream(
            "POST", "/run_streaming", json={"cmd": f"echo $$ > {marker}; echo go; exec sleep 60"}
        ) as r,
    ):
        lines = r.iter_lines()
        while "go" not in next(lines):
            pass
        t0 = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
    pid = int(marker.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.02)
    else:
        assert not os.path.exists(f"/proc/{pid}")
    assert not Path(a.sock).exists()


def test_pool_mode_config_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="cannot be set"):
        start_agent(tmp_path, env={"SANDBOX_AUTH_MODE": "pool"})  # with SANDBOX_SECRET
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(RuntimeError, match="empty"):
        start_agent(
            tmp_path,
            secret=None,
            env={"SANDBOX_AUTH_MODE": "pool", "SANDBOX_SECRET_PATH": str(empty)},
        )


def test_pool_mode_creates_the_secret_directory(tmp_path: Path) -> None:
    persist = tmp_path / "state" / "sub" / "secret"
    a = start_agent(
        tmp_path,
        secret=None,
        env={"SANDBOX_AUTH_MODE": "pool", "SANDBOX_SECRET_PATH": str(persist)},
    )
    try:
        with a.client(secret="claimer") as c:
            assert c.post("/run", json={"cmd": "true"}).status_code == 200
        assert persist.read_text() == "claimer"
        assert persist.parent.stat().st_mode & 0o777 == 0o700
    finally:
        a.stop()
