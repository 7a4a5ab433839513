"""Process extensions: details, signals, group kill, wait, stdin, log ring, several ports."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from agentlib import Agent, sse_events
from test_agent_exactness import _assert_dead


def _start(client: httpx.Client, cmd: str, **extra: object) -> str:
    r = client.post("/start_process", json={"cmd": cmd, **extra})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_details_and_wait(client: httpx.Client) -> None:
    pid = _start(client, "sleep 0.2; exit 5")
    info = client.get("/process", params={"id": pid}).json()
    assert info["status"] == "running" and info["ended_at"] is None
    r = client.post("/wait_process", json={"id": pid, "timeout": 10}).json()
    assert r["wait_timed_out"] is False and r["status"] == "failed" and r["exit_code"] == 5
    assert r["ended_at"] == r["completed_at"] and r["ended_at"] >= r["started_at"]
    pid2 = _start(client, "sleep 30")
    r = client.post("/wait_process", json={"id": pid2, "timeout": 0.2}).json()
    assert r["wait_timed_out"] is True and r["status"] == "running"
    client.post("/kill_process", json={"id": pid2})


def test_kill_reaches_whole_group(client: httpx.Client, tmp_path: Path) -> None:
    marker = tmp_path / "pids"
    pid = _start(client, f"sleep 60 & echo $! > {marker}; sleep 60 & wait")
    deadline = time.monotonic() + 5
    while not marker.exists() or not marker.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = client.post("/kill_process", json={"id": pid})
    assert r.json()["success"] is True and r.json()["status"] == "killed"
    _assert_dead(int(marker.read_text()))


def test_kill_escalates_to_sigkill_after_grace(client: httpx.Client) -> None:
    pid = _start(client, "trap '' TERM; echo ready; while :; do sleep 0.05; done")
    time.sleep(0.2)
    t0 = time.monotonic()
    r = client.post("/kill_process", json={"id": pid, "grace": 0.3})
    assert r.json()["success"] is True
    assert 0.25 < time.monotonic() - t0 < 5
    info = client.get("/process", params={"id": pid}).json()
    assert info["status"] == "killed" and info["signal"] == "SIGKILL" and info["exit_code"] == 137


def test_kill_with_chosen_signal(client: httpx.Client) -> None:
    pid = _start(client, "trap 'echo got-usr1; exit 0' USR1; while :; do sleep 0.05; done")
    time.sleep(0.2)
    assert client.post("/kill_process", json={"id": pid, "signal": "USR1"}).json()["success"]
    client.post("/wait_process", json={"id": pid, "timeout": 5})
    with client.stream("GET", "/process_logs_streaming", params={"id": pid}) as r:
        logs = [d["data"] for n, d in sse_events(r.iter_lines()) if n == "log"]
    assert "got-usr1\n" in "".join(logs)  # (the group's sleep died of USR1 too)
    r = client.post("/kill_process", json={"id": pid, "signal": "NOPE"})
    assert r.status_code == 400


def test_stdin(client: httpx.Client) -> None:
    pid = _start(client, "cat; echo end", stdin=True)
    r = client.post("/write_stdin", json={"id": pid, "data": "hello\n"})
    assert r.json() == {"success": True, "written": 6}
    client.post("/write_stdin", json={"id": pid, "data": "AAE=", "encoding": "base64"})
    client.post("/write_stdin", json={"id": pid, "eof": True})
    r = client.post("/wait_process", json={"id": pid, "timeout": 5}).json()
    assert r["status"] == "completed"
    with client.stream("GET", "/process_logs_streaming", params={"id": pid}) as resp:
        events = sse_events(resp.iter_lines())
    import base64

    data = b"".join(
        base64.b64decode(d["data"]) if d.get("encoding") else d["data"].encode()
        for n, d in events
        if n == "log"
    )
    assert data == b"hello\n\x00\x01end\n"
    r = client.post("/write_stdin", json={"id": pid, "data": "late"})
    assert r.status_code == 409
    no_stdin = _start(client, "true")
    assert client.post("/write_stdin", json={"id": no_stdin, "data": "x"}).status_code == 409


def test_default_stdin_is_devnull(client: httpx.Client) -> None:
    pid = _start(client, "cat; echo eof-seen")
    r = client.post("/wait_process", json={"id": pid, "timeout": 5}).json()
    assert r["status"] == "completed"


def test_log_history_is_bounded(client: httpx.Client) -> None:
    pid = _start(client, "i=0; while [ $i -lt 30000 ]; do echo $i; i=$((i+1)); done")
    client.post("/wait_process", json={"id": pid, "timeout": 30})
    with client.stream(
        "GET", "/process_logs_streaming", params={"id": pid, "follow": "false"}
    ) as r:
        logs = [d for n, d in sse_events(r.iter_lines()) if n == "log"]
    assert 0 < len(logs) <= 10_000
    text = "".join(d["data"] for d in logs)
    assert text.endswith("29999\n")


def test_follow_live_logs(client: httpx.Client) -> None:
    pid = _start(client, "for i in 1 2 3; do echo $i; sleep 0.1; done")
    with client.stream("GET", "/process_logs_streaming", params={"id": pid}) as r:
        events = sse_events(r.iter_lines())
    assert "".join(d["data"] for n, d in events if n == "log") == "1\n2\n3\n"
    assert events[-1][1]["status"] == "completed"


def test_unknown_process(client: httpx.Client) -> None:
    assert client.get("/process", params={"id": "x"}).status_code == 404
    assert client.get("/process_logs_streaming", params={"id": "x"}).status_code == 404
    assert client.get("/process_logs_streaming").status_code == 400
    assert client.post("/wait_process", json={"id": "x"}).status_code == 404


def test_start_process_bad_cwd(client: httpx.Client, tmp_path: Path) -> None:
    r = client.post("/start_process", json={"cmd": "true", "cwd": str(tmp_path / "nope")})
    assert r.status_code == 400 and "Invalid working directory" in r.json()["error"]


def test_several_ports(client: httpx.Client) -> None:
    assert client.post("/bind_port", json={"port": "3000", "multi": True}).status_code == 200
    r = client.post("/bind_port", json={"port": 4000, "multi": True})
    assert r.json()["ports"] == ["3000", "4000"]
    # Koyeb's shape keeps its single-port rule
    r = client.post("/bind_port", json={"port": "5000"})
    assert r.status_code == 409 and r.json()["current_port"] == "3000"
    assert client.get("/bound_ports").json() == {"ports": ["3000", "4000"]}
    assert client.post("/unbind_port", json={"port": "3000"}).json()["ports"] == ["4000"]
    assert client.post("/unbind_port", json={}).json()["ports"] == []
    for bad in ["0", "70000", "http", -1, True]:
        assert client.post("/bind_port", json={"port": bad}).status_code == 400


def test_processes_survive_and_are_killed_on_shutdown(agent: Agent, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    with agent.client() as c:
        _start(c, f"echo $$ > {marker}; exec sleep 60")
    deadline = time.monotonic() + 5
    while not marker.exists() or not marker.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert agent.stop() == 0
    _assert_dead(int(marker.read_text()))
    assert not Path(agent.sock).exists()


def test_output_of_children_outliving_the_shell_is_still_logged(client: httpx.Client) -> None:
    pid = _start(client, "(sleep 0.5; echo late) & echo early")
    r = client.post("/wait_process", json={"id": pid, "timeout": 5}).json()
    assert r["status"] == "completed"  # the shell itself ended at once
    with client.stream("GET", "/process_logs_streaming", params={"id": pid}) as resp:
        events = sse_events(resp.iter_lines())
    assert "".join(d["data"] for n, d in events if n == "log") == "early\nlate\n"


def test_no_thread_for_a_process_means_no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a pids limit, Thread.start() fails: the process must not run on unread."""
    import os
    import threading

    from sandlot.agent.commands import SpawnError
    from sandlot.agent.processes import ProcessManager

    manager = ProcessManager(dict(os.environ), set(), threading.Lock())

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(SpawnError, match="no thread"):
        manager.start("sleep 30", "/", None, stdin=False)
    assert manager.all() == []


def test_finished_histories_share_a_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import threading

    from sandlot.agent import processes

    monkeypatch.setattr(processes, "FINISHED_LOG_BUDGET", 2_500_000)
    manager = processes.ProcessManager(dict(os.environ), set(), threading.Lock())
    started = []
    for _ in range(3):
        p = manager.start("head -c 1000000 /dev/zero | tr '\\0' x", "/", None, stdin=False)
        p.wait(10)
        while not p.logs.closed:
            time.sleep(0.01)
        started.append(p)
    manager.start("true", "/", None, stdin=False).wait(10)
    sizes = [p.logs.size for p in started]
    assert sizes[0] == 0 and sizes[1] == sizes[2] == 1_000_000
    assert started[0].details()["log_dropped_chunks"] > 0
    assert started[0].status == "completed"  # the process itself is still listed


def test_process_timeout(client: httpx.Client) -> None:
    pid = _start(client, "echo started; sleep 30", timeout=0.3)
    r = client.post("/wait_process", json={"id": pid, "timeout": 10}).json()
    assert r["status"] == "killed" and r["timed_out"] is True and r["timeout"] == 0.3
    assert r["signal"] == "SIGKILL"
    quick = _start(client, "true", timeout=5)
    r = client.post("/wait_process", json={"id": quick, "timeout": 10}).json()
    assert r["status"] == "completed" and r["timed_out"] is False
