"""The gateway: /sandboxes/{id}/koyeb-sandbox/... proxied to the sandbox's agent."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from support.agent_engine import AgentProcessEngine
from support.server import RunningServer


def new_sandbox(c: httpx.Client) -> tuple[str, dict[str, str]]:
    sb = c.post("/v1/sandboxes", json={}).json()
    return f"/sandboxes/{sb['id']}/koyeb-sandbox", {"authorization": f"Bearer {sb['secret']}"}


def sse_events(lines: list[str]) -> list[tuple[str, dict]]:
    out, name = [], None
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            out.append((name, json.loads(line[5:])))
    return out


def processes_matching(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and "pytest" not in cmdline:
                pids.append(int(entry.name))
    return pids


def test_run_through_gateway(server: RunningServer) -> None:
    with server.client() as c:
        base, auth = new_sandbox(c)
        assert c.get(base + "/health").json()["status"] == "ok"
        r = c.post(base + "/run", json={"cmd": "echo hello; echo oops >&2; exit 3"}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["stdout"] == "hello\n" and r.json()["stderr"] == "oops\n"
        assert r.json()["code"] == 3
        r = c.post(base + "/run", json={"cmd": "true"}, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = c.post(base + "/run", json={"cmd": "true"})
        assert r.status_code == 401


def test_sse_is_not_buffered(server: RunningServer) -> None:
    with server.client() as c:
        base, auth = new_sandbox(c)
        start = time.monotonic()
        firsts: list[float] = []
        with c.stream(
            "POST",
            base + "/run_streaming",
            headers=auth,
            json={"cmd": "echo one; sleep 1; echo two"},
        ) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data:"):
                    firsts.append(time.monotonic() - start)
        events = sse_events(lines)
        assert [e[1].get("data") for e in events[:2]] == ["one\n", "two\n"]
        assert events[-1][0] == "complete" and events[-1][1]["code"] == 0
        assert firsts[0] < 0.8, f"first event took {firsts[0]:.2f}s: buffered"


def test_client_disconnect_kills_streamed_command(server: RunningServer) -> None:
    marker = "987.654"
    with server.client() as c:
        base, auth = new_sandbox(c)
        with c.stream(
            "POST",
            base + "/run_streaming",
            headers=auth,
            json={"cmd": f"echo started; sleep {marker}"},
        ) as r:
            lines = r.iter_lines()  # kept referenced: a collected iterator closes the response
            for line in lines:
                if "started" in line:
                    break
            deadline = time.monotonic() + 5
            while not processes_matching(marker) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert processes_matching(marker)
        # leaving the block closes the connection
    deadline = time.monotonic() + 10
    while processes_matching(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_matching(marker) == []


def test_unknown_sandbox_is_404(server: RunningServer) -> None:
    with server.client() as c:
        r = c.get("/sandboxes/nope/koyeb-sandbox/health")
        assert r.status_code == 404
        assert r.json() == {"error": "sandbox nope not found", "code": "not_found"}


def test_unreachable_agent_is_502(server: RunningServer, engine: AgentProcessEngine) -> None:
    with server.client() as c:
        sb = c.post("/v1/sandboxes", json={}).json()
        proc = engine.procs[sb["id"]]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        (engine.root / sb["id"] / "agent.sock").unlink()
        r = c.get(f"/sandboxes/{sb['id']}/koyeb-sandbox/health")
        assert r.status_code == 502
        assert sb["id"] in r.json()["error"] and r.json()["code"] == "agent_unreachable"


def test_delete_while_streaming_is_an_error_not_a_clean_end(server: RunningServer) -> None:
    with server.client() as c, server.client() as admin:
        sb = c.post("/v1/sandboxes", json={}).json()
        base = f"/sandboxes/{sb['id']}/koyeb-sandbox"
        lines: list[str] = []
        with (
            pytest.raises(httpx.HTTPError),
            c.stream(
                "POST",
                base + "/run_streaming",
                headers={"authorization": f"Bearer {sb['secret']}"},
                json={"cmd": "echo started; sleep 100"},
            ) as r,
        ):
            for line in r.iter_lines():
                lines.append(line)
                if "started" in line:
                    assert admin.delete(f"/v1/sandboxes/{sb['id']}").status_code == 200
        assert not any(e[0] == "complete" for e in sse_events(lines))


def test_binary_upload_download_roundtrip(server: RunningServer) -> None:
    data = os.urandom(8 * 1024 * 1024) + bytes(range(256))
    with server.client() as c:
        base, auth = new_sandbox(c)
        r = c.put(base + "/files", params={"path": "blob.bin"}, content=data, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["size"] == len(data)
        r = c.get(base + "/files", params={"path": "blob.bin"}, headers=auth)
        assert r.status_code == 200 and r.content == data


def test_streamed_chunked_upload(server: RunningServer) -> None:
    chunks = [os.urandom(100_000) for _ in range(10)]
    with server.client() as c:
        base, auth = new_sandbox(c)
        r = c.put(
            base + "/files", params={"path": "chunked.bin"}, content=iter(chunks), headers=auth
        )
        assert r.status_code == 200, r.text
        r = c.get(base + "/files", params={"path": "chunked.bin"}, headers=auth)
        assert r.content == b"".join(chunks)


def test_api_tokens_are_not_forwarded_into_sandboxes(server: RunningServer) -> None:
    """The sandbox is untrusted: a request to the gateway carrying an API token (sl_...) reaches
    the agent without it (so the agent answers 401), and project headers are dropped too."""
    with server.client() as c:
        base, auth = new_sandbox(c)
        r = c.post(
            base + "/run",
            json={"cmd": "true"},
            headers={"authorization": "Bearer sl_someone-s-api-token"},
        )
        assert r.status_code == 401
        assert c.post(base + "/run", json={"cmd": "true"}, headers=auth).status_code == 200
        sb = c.get("/v1/sandboxes").json()["sandboxes"][0]
        assert not c.get(f"/v1/sandboxes/{sb['id']}").json()["secret"].startswith("sl_")


def test_deleted_by_another_replica_is_404_not_502(
    server: RunningServer, engine: AgentProcessEngine
) -> None:
    """Two servers share a database; one deletes a sandbox the other has a cached route to."""
    with server.client() as c:
        sb = c.post("/v1/sandboxes", json={}).json()
        base = f"/sandboxes/{sb['id']}/koyeb-sandbox"
        assert c.get(base + "/health").status_code == 200  # now cached
        # "the other replica": straight to the engine and the database
        import anyio

        anyio.run(engine.delete, sb["id"])
        store = server.app.state.control.store
        store.update_sandbox(sb["id"], status="deleted")
        r = c.get(base + "/health")
        assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_big_upload_with_wrong_secret_is_401(server: RunningServer) -> None:
    """The agent refuses before reading the body and closes; the gateway passes its 401 on
    (not a 502 for the broken upload)."""
    data = os.urandom(16 * 1024 * 1024)
    with server.client() as c:
        base, _ = new_sandbox(c)
        r = c.put(
            base + "/files",
            params={"path": "x.bin"},
            content=data,
            headers={"authorization": "Bearer wrong"},
        )
        assert r.status_code == 401
        assert c.get(base + "/health").status_code == 200  # and the gateway is fine after
