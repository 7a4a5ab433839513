"""POST /configure: environment set for every later command (used when a warm-pool sandbox is
claimed), with bad input refused."""

from __future__ import annotations

import httpx
import pytest


def test_configure_env_applies_to_later_commands_and_processes(client: httpx.Client) -> None:
    r = client.post("/configure", json={"env": {"OWNER": "alice", "MODE": "a b"}})
    assert r.status_code == 200
    assert r.json() == {"success": True, "env": ["MODE", "OWNER"]}
    out = client.post("/run", json={"cmd": 'echo "$OWNER/$MODE"'}).json()
    assert out["stdout"] == "alice/a b\n"
    # the request's own env still wins
    out = client.post("/run", json={"cmd": "echo $OWNER", "env": {"OWNER": "bob"}}).json()
    assert out["stdout"] == "bob\n"
    started = client.post("/start_process", json={"cmd": "echo $OWNER"}).json()
    done = client.post("/wait_process", json={"id": started["id"], "timeout": 10}).json()
    assert done["exit_code"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"env": "X=1"},
        {"env": {"X": 1}},
        {"env": {"": "v"}},
        {"env": {"A=B": "v"}},
        {"env": {"SANDBOX_SECRET": "steal"}},
    ],
)
def test_configure_bad_input(client: httpx.Client, body: dict[str, object]) -> None:
    r = client.post("/configure", json=body)
    assert r.status_code == 400
    assert r.json()["success"] is False
