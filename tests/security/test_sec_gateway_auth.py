"""Who the gateway lets count as a sandbox's activity, and what it passes on to a sandbox.

- Before: any request to ``/sandboxes/ID/koyeb-sandbox/health`` -- no secret needed -- kept a
  sandbox awake and woke a sleeping one, so anyone who knew an id could keep it running.
  Only requests with the sandbox's secret (and traffic to exposed ports) count now.
- Before: the port token's cookie reached the sandbox's app when written ``name =value`` (the
  lenient parser that read the token did not match the one that stripped it), and on ports
  without protection at all.
- Before: ``enable_tcp_proxy`` with ``protect_ports`` gave a TCP port serving the protected app
  to anyone; the combination is refused now.

The sandboxes are agents run as host processes (``support.agent_engine``), frozen with SIGSTOP
for light sleep; the sandbox's "app" is an HTTP server on this host's loopback, reached through
the agent's tunnel as a real sandbox's would be.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.agent_engine import AgentProcessEngine
from support.server import RunningServer, start_server


class SleepyEngine(AgentProcessEngine):
    """Light sleep for agent processes: the process group is stopped and continued."""

    async def pause(self, sandbox_id: str) -> None:
        os.killpg(self.procs[sandbox_id].pid, signal.SIGSTOP)

    async def resume(self, sandbox_id: str) -> None:
        os.killpg(self.procs[sandbox_id].pid, signal.SIGCONT)

    async def delete(self, sandbox_id: str) -> None:
        proc = self.procs.get(sandbox_id)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
        await super().delete(sandbox_id)


class _Echo(http.server.BaseHTTPRequestHandler):
    """The sandbox's app: answers with the headers it was sent."""

    def do_GET(self) -> None:
        body = json.dumps({"headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[RunningServer, int]]:
    root = Path(tempfile.mkdtemp(prefix="sl-ga-"))
    app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    engine = SleepyEngine(root / "sb")
    srv = start_server(engine, f"sqlite:///{root / 'db'}", unix_path=root / "s.sock")
    try:
        yield srv, app.server_address[1]
    finally:
        srv.stop()
        app.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def sandbox(srv: RunningServer, **create: object) -> Iterator[tuple[httpx.Client, dict[str, str]]]:
    with srv.client() as client:
        r = client.post("/v1/sandboxes", json=create)
        assert r.status_code == 201, r.text
        info = r.json()
        try:
            yield client, info
        finally:
            client.delete(f"/v1/sandboxes/{info['id']}")


def _status(client: httpx.Client, sandbox_id: str) -> str:
    return str(client.get(f"/v1/sandboxes/{sandbox_id}").json()["status"])


def _wakes(client: httpx.Client, sandbox_id: str) -> int:
    events = client.get(f"/v1/sandboxes/{sandbox_id}/events").json()["events"]
    return sum(1 for e in events if e["kind"] == "woke")


def _wait_asleep(client: httpx.Client, sandbox_id: str, poke: object = None) -> None:
    """Until the sandbox sleeps; ``poke()`` runs meanwhile (and must not keep it awake)."""
    deadline = time.monotonic() + 30
    while _status(client, sandbox_id) != "sleeping":
        assert time.monotonic() < deadline, "the sandbox never fell asleep"
        if callable(poke):
            poke()
        time.sleep(0.1)


# -- activity -------------------------------------------------------------------------------------


def test_unauthenticated_requests_do_not_keep_a_sandbox_awake(
    env: tuple[RunningServer, int],
) -> None:
    srv, _ = env
    with sandbox(srv, idle_timeout=1, enable_light_sleep=True) as (client, info):
        health = f"/sandboxes/{info['id']}/koyeb-sandbox/health"
        assert client.get(health).status_code == 200  # public while awake

        def poke() -> None:
            assert client.get(health).status_code in (200, 503)
            wrong = {"authorization": "Bearer wrong"}
            assert client.get(f"/sandboxes/{info['id']}/koyeb-sandbox/list_dir", headers=wrong)
            client.post(f"/sandboxes/{info['id']}/koyeb-sandbox/run", json={"cmd": "true"})

        _wait_asleep(client, info["id"], poke)


def test_unauthenticated_requests_do_not_wake_a_sleeping_sandbox(
    env: tuple[RunningServer, int],
) -> None:
    srv, _ = env
    with sandbox(srv, idle_timeout=1, enable_light_sleep=True) as (client, info):
        base = f"/sandboxes/{info['id']}/koyeb-sandbox"
        _wait_asleep(client, info["id"])
        r = client.get(f"{base}/health")
        assert r.status_code == 503 and r.json()["code"] == "sandbox_sleeping", r.text
        assert client.get(f"{base}/openapi.json").status_code == 503
        assert client.get(f"{base}/health", headers={"authorization": "Bearer x"}).is_error
        r = client.post(f"{base}/run", json={"cmd": "true"}, headers={"authorization": "Bearer"})
        assert r.status_code == 401
        assert _status(client, info["id"]) == "sleeping"
        assert _wakes(client, info["id"]) == 0
        # the secret wakes it, as before (its status may already say "sleeping" again: its
        # idle timeout is a second, so the history is what tells)
        auth = {"authorization": f"Bearer {info['secret']}"}
        r = client.get(f"{base}/health", headers=auth)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        # (a light wake is written to the history just after the answer)
        deadline = time.monotonic() + 30
        while _wakes(client, info["id"]) != 1:
            assert time.monotonic() < deadline, "the authenticated request did not wake it"
            time.sleep(0.05)


def test_exposed_port_traffic_still_wakes(env: tuple[RunningServer, int]) -> None:
    srv, app_port = env
    with sandbox(srv, idle_timeout=1, enable_light_sleep=True) as (client, info):
        r = client.post(f"/v1/sandboxes/{info['id']}/ports", json={"port": app_port})
        assert r.status_code == 200, r.text
        _wait_asleep(client, info["id"])
        r = client.get(f"/sandboxes/{info['id']}/ports/{app_port}/")
        assert r.status_code == 200, r.text
        assert _status(client, info["id"]) == "running"


# -- what reaches the sandbox's app ---------------------------------------------------------------


@pytest.mark.parametrize("protect", [True, False])
@pytest.mark.parametrize(
    "cookie",
    [
        "sandlot_port_token={t}; app=1",
        "app=1; sandlot_port_token={t}",
        "sandlot_port_token ={t}; app=1",
        'app=1;sandlot_port_token = "{t}"',
    ],
)
def test_port_token_cookie_never_reaches_the_app(
    env: tuple[RunningServer, int], protect: bool, cookie: str
) -> None:
    srv, app_port = env
    with sandbox(srv, protect_ports=protect) as (client, info):
        r = client.post(f"/v1/sandboxes/{info['id']}/ports", json={"port": app_port})
        assert r.status_code == 200, r.text
        token = r.json()["token"] or "not-a-token"
        url = f"/sandboxes/{info['id']}/ports/{app_port}/"
        r = client.get(url, headers={"cookie": cookie.format(t=token)})
        assert r.status_code == 200, r.text
        seen = r.json()["headers"]
        assert "sandlot_port_token" not in seen.get("cookie", "")
        assert seen["cookie"] == "app=1"


def test_port_token_header_never_reaches_the_app(env: tuple[RunningServer, int]) -> None:
    srv, app_port = env
    with sandbox(srv, protect_ports=True) as (client, info):
        token = client.post(f"/v1/sandboxes/{info['id']}/ports", json={"port": app_port}).json()[
            "token"
        ]
        url = f"/sandboxes/{info['id']}/ports/{app_port}/"
        r = client.get(url, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert "authorization" not in r.json()["headers"]
        r = client.get(url, params={"sandlot_token": token, "a": "b"})
        assert r.status_code == 200, r.text
        assert token not in json.dumps(r.json())


# -- the TCP proxy --------------------------------------------------------------------------------


def test_tcp_proxy_with_protected_ports_is_refused(env: tuple[RunningServer, int]) -> None:
    srv, _ = env
    with srv.client() as client:
        r = client.post("/v1/sandboxes", json={"enable_tcp_proxy": True, "protect_ports": True})
        if r.status_code == 201:
            client.delete(f"/v1/sandboxes/{r.json()['id']}")
        assert r.status_code == 400, r.text
        assert "protect_ports" in r.json()["error"] and "token" in r.json()["error"]
