"""The Koyeb executor routes, driven over the agent's Unix socket."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from agentlib import SECRET, Agent, sse_events, start_agent


def test_health_needs_no_auth(agent: Agent) -> None:
    with agent.client(secret="") as c:
        r = c.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong", "Basic " + SECRET, "Bearer x" + SECRET, "bearer", SECRET]
)
def test_auth_rejects_bad_credentials(agent: Agent, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    with agent.client(secret="") as c:
        r = c.post("/run", json={"cmd": "touch /tmp/never"}, headers=headers)
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("text/plain")


def test_run_buffered(client: httpx.Client) -> None:
    r = client.post("/run", json={"cmd": "echo out; echo err >&2"})
    assert r.status_code == 200
    assert r.json() == {"stdout": "out\n", "stderr": "err\n", "code": 0}


def test_run_nonzero_exit(client: httpx.Client) -> None:
    r = client.post("/run", json={"cmd": "exit 7"})
    assert r.json() == {"stdout": "", "stderr": "", "code": 7, "error": "Non-zero exit code"}


def test_run_env_and_cwd(client: httpx.Client, agent: Agent, tmp_path: Path) -> None:
    r = client.post(
        "/run", json={"cmd": 'echo "$FOO:$(pwd)"', "cwd": str(tmp_path), "env": {"FOO": "bar"}}
    )
    assert r.json()["stdout"] == f"bar:{tmp_path}\n"
    # default cwd: the agent's own
    r = client.post("/run", json={"cmd": "pwd"})
    assert r.json()["stdout"] == f"{agent.workdir}\n"


def test_run_hides_agent_secrets(tmp_path: Path) -> None:
    a = start_agent(tmp_path, env={"SANDBOX_SECRET_PATH": "/x", "KEEP_ME": "yes"})
    try:
        with a.client() as c:
            out = c.post("/run", json={"cmd": "env"}).json()["stdout"]
    finally:
        a.stop()
    assert "SANDBOX_SECRET" not in out
    assert "KEEP_ME=yes" in out


def test_run_bad_cwd(client: httpx.Client, tmp_path: Path) -> None:
    for cwd in [str(tmp_path / "missing"), __file__]:
        r = client.post("/run", json={"cmd": "true", "cwd": cwd})
        assert r.status_code == 400
        assert "Invalid working directory" in r.json()["error"]


def test_run_streaming_events(client: httpx.Client) -> None:
    with client.stream(
        "POST", "/run_streaming", json={"cmd": "echo a; echo b >&2; printf c; exit 2"}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        events = sse_events(r.iter_lines())
    outputs = [e for e in events if e[0] == "output"]
    assert "".join(d["data"] for _, d in outputs if d["stream"] == "stdout") == "a\nc"
    assert "".join(d["data"] for _, d in outputs if d["stream"] == "stderr") == "b\n"
    assert events[-1] == ("complete", {"code": 2, "error": True})


def test_file_roundtrip(client: httpx.Client, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    path = str(tmp_path / "d" / "f.txt")
    r = client.post("/write_file", json={"path": path, "content": "héllo\n"})
    assert r.json() == {"success": True}
    assert Path(path).read_text() == "héllo\n"
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert client.post("/read_file", json={"path": path}).json() == {"content": "héllo\n"}
    r = client.post("/list_dir", json={"path": str(tmp_path / "d")})
    assert r.json() == {"entries": ["f.txt"]}
    assert client.post("/delete_file", json={"path": path}).json() == {"success": True}
    assert not os.path.exists(path)


def test_write_file_does_not_create_parents_by_default(client: httpx.Client, tmp_path: Path):
    r = client.post("/write_file", json={"path": str(tmp_path / "a/b/c"), "content": "x"})
    assert r.status_code == 404
    assert r.json()["success"] is False
    assert "No such file or directory" in r.json()["error"]


def test_dirs(client: httpx.Client, tmp_path: Path) -> None:
    d = tmp_path / "x" / "y"
    assert client.post("/make_dir", json={"path": str(d)}).json() == {"success": True}
    assert d.is_dir() and oct(d.stat().st_mode & 0o777) == "0o755"
    # mkdir -p semantics: again is fine
    assert client.post("/make_dir", json={"path": str(d)}).json() == {"success": True}
    (d / "f").write_text("1")
    r = client.post("/delete_dir", json={"path": str(tmp_path / "x")})
    assert r.json() == {"success": True}
    assert not (tmp_path / "x").exists()


def test_processes_lifecycle(client: httpx.Client) -> None:
    r = client.post("/start_process", json={"cmd": "echo started; sleep 30"})
    assert r.status_code == 201
    started = r.json()
    assert set(started) == {"id", "pid", "status"} and started["status"] == "running"
    procs = client.get("/list_processes").json()["processes"]
    mine = next(p for p in procs if p["id"] == started["id"])
    assert mine["status"] == "running" and mine["pid"] == started["pid"]
    assert set(mine) == {
        "id",
        "command",
        "status",
        "pid",
        "exit_code",
        "started_at",
        "completed_at",
    }
    r = client.post("/kill_process", json={"id": started["id"]})
    assert r.status_code == 200 and r.json()["success"] is True
    mine = next(
        p for p in client.get("/list_processes").json()["processes"] if p["id"] == started["id"]
    )
    assert mine["status"] == "killed"
    assert mine["completed_at"] is not None
    r = client.post("/kill_process", json={"id": started["id"]})
    assert r.status_code == 400
    assert r.json() == {"success": False, "error": "process is not running (status: killed)"}
    r = client.post("/kill_process", json={"id": "nope"})
    assert r.status_code == 400 and r.json()["success"] is False


def test_process_statuses(client: httpx.Client) -> None:
    ok = client.post("/start_process", json={"cmd": "true"}).json()["id"]
    bad = client.post("/start_process", json={"cmd": "exit 3"}).json()["id"]
    for pid in (ok, bad):
        client.post("/wait_process", json={"id": pid, "timeout": 10})
    procs = {p["id"]: p for p in client.get("/list_processes").json()["processes"]}
    assert procs[ok]["status"] == "completed" and procs[ok]["exit_code"] == 0
    assert procs[bad]["status"] == "failed" and procs[bad]["exit_code"] == 3


def test_process_logs_streaming(client: httpx.Client) -> None:
    pid = client.post(
        "/start_process", json={"cmd": "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three"}
    ).json()["id"]
    with client.stream("GET", "/process_logs_streaming", params={"id": pid}) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    logs = [d for name, d in events if name == "log"]
    assert "".join(d["data"] for d in logs) == "one\ntwo\nthree\n"
    assert [d["stream"] for d in logs] == ["stdout", "stderr", "stdout"]
    assert all(d["timestamp"].endswith("Z") for d in logs)
    assert events[-1][0] == "complete"
    assert events[-1][1]["message"] == "stream ended"
    # Koyeb's documented POST {id} form works too and replays the history
    with client.stream("POST", "/process_logs_streaming", json={"id": pid}) as r:
        again = sse_events(r.iter_lines())
    assert [d for n, d in again if n == "log"] == logs


def test_bind_unbind_port(client: httpx.Client) -> None:
    r = client.post("/bind_port", json={"port": "8080"})
    assert r.status_code == 200
    assert r.json()["success"] is True and r.json()["port"] == "8080"
    assert r.json()["message"] == "Port binding configured"
    r = client.post("/bind_port", json={"port": "9090"})
    assert r.status_code == 409
    assert r.json() == {"success": False, "error": "Port already bound", "current_port": "8080"}
    r = client.post("/unbind_port")
    assert r.status_code == 200 and r.json()["success"] is True
    assert client.post("/bind_port", json={"port": "9090"}).status_code == 200
    assert client.post("/unbind_port", json={}).json()["message"] == "Port binding removed"


def test_keep_alive_reuses_connection(client: httpx.Client, agent: Agent) -> None:
    for _ in range(5):
        assert client.post("/run", json={"cmd": "true"}).json()["code"] == 0
    time.sleep(0.05)
    assert agent.zombies() == []


def test_run_round_trip_is_not_stuck_in_polling(client: httpx.Client) -> None:
    """Regression: the exit of `true` was noticed only by a 250 ms waitpid() poll."""
    client.post("/run", json={"cmd": "true"})
    t0 = time.monotonic()
    for _ in range(20):
        assert client.post("/run", json={"cmd": "true"}).json()["code"] == 0
    assert time.monotonic() - t0 < 2.0


def test_concurrent_clients(agent: Agent) -> None:
    import threading

    errors: list[str] = []

    def worker(i: int) -> None:
        try:
            with agent.client() as c:
                for j in range(5):
                    r = c.post("/run", json={"cmd": f"echo {i}-{j}"})
                    assert r.json()["stdout"] == f"{i}-{j}\n"
                    with c.stream("POST", "/run_streaming", json={"cmd": "seq 1 500"}) as s:
                        events = sse_events(s.iter_lines())
                    joined = "".join(d["data"] for n, d in events if n == "output")
                    assert joined == "".join(f"{k}\n" for k in range(1, 501))
        except Exception as exc:  # collected: assertion errors in threads are otherwise lost
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    time.sleep(0.2)
    assert agent.zombies() == [] and agent.children() == []


def test_commands_inherit_only_stdio(client: httpx.Client) -> None:
    for body in ({}, {"input": "x"}):
        r = client.post("/run", json={"cmd": "ls /proc/$$/fd", **body}).json()
        assert r["stdout"].split() == ["0", "1", "2"], r
    pid = client.post("/start_process", json={"cmd": "ls /proc/$$/fd", "stdin": True}).json()["id"]
    client.post("/write_stdin", json={"id": pid, "eof": True})
    client.post("/wait_process", json={"id": pid, "timeout": 5})
    with client.stream("GET", "/process_logs_streaming", params={"id": pid}) as s:
        logs = "".join(d["data"] for n, d in sse_events(s.iter_lines()) if n == "log")
    assert logs.split() == ["0", "1", "2"]
