"""The agent's journal of background processes (agent/journal.py): a new agent started on the
journal of one that died lists the old one's processes; a journal the sandbox wrote itself is
read as hostile input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from agentlib import start_agent

from sandlot.agent.journal import READ_LIMIT, start_time


def _listed(agent_client: object) -> dict[str, dict[str, object]]:
    r = agent_client.get("/list_processes")  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    return {p["id"]: p for p in r.json()["processes"]}


def test_a_new_agent_lists_the_dead_ones_processes(tmp_path: Path) -> None:
    journal = tmp_path / "processes"
    env = {"SANDLOT_PROCESS_JOURNAL": str(journal)}
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    first = start_agent(tmp_path / "a", env=env)
    try:
        with first.client() as c:
            running = c.post("/start_process", json={"cmd": "sleep 300"}).json()
            done = c.post("/start_process", json={"cmd": "exit 3"}).json()
            assert c.post("/wait_process", json={"id": done["id"]}).json()["exit_code"] == 3
    finally:
        first.proc.send_signal(signal.SIGKILL)  # no clean-up: its processes live on
        first.proc.wait()
    second = start_agent(tmp_path / "b", env=env)
    try:
        with second.client() as c:
            listed = _listed(c)
            assert listed[running["id"]]["status"] == "running"
            assert listed[done["id"]]["status"] == "failed"
            assert listed[done["id"]]["exit_code"] == 3
            logs = c.get("/process_logs_streaming", params={"id": running["id"]})
            assert logs.status_code == 410, logs.text
            stdin = c.post("/write_stdin", json={"id": running["id"], "data": "x"})
            assert stdin.status_code == 409 and "lost" in stdin.json()["error"]
            killed = c.post("/kill_process", json={"id": running["id"]})
            assert killed.json()["status"] == "killed", killed.text
    finally:
        second.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(running["pid"]), signal.SIGKILL)


def test_a_forged_journal_is_read_safely(tmp_path: Path) -> None:
    """Garbage, wrong types, pid 1, a reused pid (start time differs): skipped or never
    taken for a live process. The real one is still found."""
    journal = tmp_path / "processes"
    me = os.getpid()
    real = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        lines = [
            b"not json",
            b"[1, 2]",
            b'{"id": 5, "pid": 3}',
            json.dumps(
                {"id": "pid1", "pid": 1, "ticks": 1, "command": "x", "cwd": "/", "started_at": 0}
            ).encode(),
            json.dumps(
                {"id": "reused", "pid": me, "ticks": 1, "command": "x", "cwd": "/", "started_at": 0}
            ).encode(),
            json.dumps(
                {
                    "id": "badtime",
                    "pid": me,
                    "ticks": None,
                    "command": "x",
                    "cwd": "/",
                    "started_at": "yesterday",
                }
            ).encode(),
            json.dumps(
                {
                    "id": "real",
                    "pid": real.pid,
                    "ticks": start_time(real.pid),
                    "command": "sleep 300",
                    "cwd": "/",
                    "started_at": time.time(),
                }
            ).encode(),
            b'{"id": "real", "status": "bogus"}',
            b"{" * 100_000,
        ]
        journal.write_bytes(b"\n".join(lines) + b"\n" + b"x" * READ_LIMIT)
        (tmp_path / "a").mkdir()
        agent = start_agent(tmp_path / "a", env={"SANDLOT_PROCESS_JOURNAL": str(journal)})
        try:
            with agent.client() as c:
                listed = _listed(c)
                assert set(listed) == {"reused", "real"}, listed
                assert listed["reused"]["status"] == "lost"  # pid alive, start time differs
                assert listed["real"]["status"] == "running"
                killed = c.post("/kill_process", json={"id": "reused"})
                assert killed.status_code == 400  # not running: never signalled
                assert c.post("/kill_process", json={"id": "real"}).status_code == 200
                assert real.wait(30) == -signal.SIGTERM
        finally:
            agent.stop()
    finally:
        real.kill()
        real.wait()


def test_a_rewritten_journal_keeps_every_listed_process(tmp_path: Path) -> None:
    """Past JOURNAL_MAX_BYTES the journal is rewritten with what the agent still lists."""
    journal = tmp_path / "processes"
    env = {"SANDLOT_PROCESS_JOURNAL": str(journal)}
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    first = start_agent(tmp_path / "a", env=env)
    ids = []
    try:
        with first.client() as c:
            for i in range(150):  # 150 x ~4.2 KiB start records: past 512 KiB once
                r = c.post("/start_process", json={"cmd": f"exit {i % 2} # " + "x" * 4000})
                ids.append(r.json()["id"])
                if i == 0:
                    inode = journal.stat().st_ino
            for process_id in ids:
                c.post("/wait_process", json={"id": process_id, "timeout": 30})
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    assert journal.stat().st_ino != inode, "never rewritten (a rewrite renames a new file in)"
    second = start_agent(tmp_path / "b", env=env)
    try:
        with second.client() as c:
            listed = _listed(c)
            assert set(ids) <= listed.keys()
            assert [listed[i]["exit_code"] for i in ids] == [i % 2 for i in range(150)]
    finally:
        second.stop()
