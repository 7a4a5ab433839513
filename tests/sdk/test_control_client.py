"""The public control-API client (sandlot.sdk.control) against a real server: tokens, quotas,
registry secrets, a sandbox's history and health, sync and async, with the SDK's errors."""

from __future__ import annotations

import pytest

from sandlot.sdk import AsyncControlClient, ControlClient, Sandbox
from sandlot.sdk.errors import SandboxError, SandboxNotFoundError, SandboxRequestError

pytestmark = pytest.mark.root


def test_health_names_the_serving_process(api_url: str) -> None:
    with ControlClient() as control:
        health = control.health()
    assert health["status"] == "ok"
    assert health["version"] and health["regions"]
    assert isinstance(health.get("pid"), int)  # on the Unix socket


def test_tokens(api_url: str) -> None:
    with ControlClient(api_url=api_url) as control:
        created = control.create_token(project="ctl-proj", name="ci", scope="privileged")
        assert created["token"] and created["scope"] == "privileged"
        listed = control.list_tokens("ctl-proj")
        assert [t["id"] for t in listed] == [created["id"]]
        assert all(t.get("token") is None for t in listed)  # values are shown once
        revoked = control.revoke_token(created["id"])
        assert revoked["id"] == created["id"] and revoked["revoked_at"]


def test_quotas(api_url: str) -> None:
    with ControlClient() as control:
        set_ = control.set_quota("ctl-quota", max_sandboxes=3, memory_mb=4096)
        assert (set_["max_sandboxes"], set_["memory_mb"], set_["vcpu"]) == (3, 4096, None)
        # omitted limits stay; None removes one
        again = control.set_quota("ctl-quota", memory_mb=None, vcpu=1.5)
        assert (again["max_sandboxes"], again["memory_mb"], again["vcpu"]) == (3, None, 1.5)
        assert control.get_quota("ctl-quota")["usage"]["sandboxes"] == 0
        assert "ctl-quota" in {q["project"] for q in control.list_quotas()}
        control.delete_quota("ctl-quota")
        assert "ctl-quota" not in {q["project"] for q in control.list_quotas()}


def test_secrets(api_url: str) -> None:
    with ControlClient() as control:
        made = control.create_secret("ctl-reg", "ghcr.io", "bot", "hunter2")
        assert made == {**made, "name": "ctl-reg", "registry": "ghcr.io", "username": "bot"}
        listed = control.list_secrets()
        assert "ctl-reg" in {s["name"] for s in listed}
        assert all("password" not in s for s in listed)
        assert control.delete_secret("ctl-reg")["name"] == "ctl-reg"
        with pytest.raises(SandboxRequestError) as err:
            control.delete_secret("ctl-reg")
        assert err.value.status_code == 404


def test_sandbox_events(api_url: str) -> None:
    sb = Sandbox.create(image="busybox")
    try:
        with ControlClient() as control:
            assert [e["kind"] for e in control.sandbox_events(sb.id)][:1] == ["created"]
            sb.delete()
            assert "deleted" in [e["kind"] for e in control.sandbox_events(sb.id)]
            with pytest.raises(SandboxNotFoundError):
                control.sandbox_events("no-such-sandbox")
    finally:
        sb.delete()
        sb.close()


def test_ids_stay_in_their_path_segment(api_url: str) -> None:
    """An id with ``/`` or ``..`` is one segment: it cannot reach another route (here
    ``DELETE /v1/tokens/../quotas/x`` would have been ``DELETE /v1/quotas/x``)."""
    with ControlClient() as control:
        control.set_quota("victim", max_sandboxes=1)
        try:
            with pytest.raises(SandboxError):
                control.revoke_token("../quotas/victim")
            assert "victim" in {q["project"] for q in control.list_quotas()}
        finally:
            control.delete_quota("victim")


def test_a_project_token_cannot_manage_tokens(tcp_api: tuple[str, str]) -> None:
    url, token = tcp_api
    with ControlClient(api_url=url, api_token=token) as control:
        assert control.health()["status"] == "ok"
        with pytest.raises(SandboxRequestError) as err:
            control.create_token(project="tcp-project")
        assert err.value.status_code == 403
        # its own project's quota is readable
        assert control.get_quota("tcp-project")["project"] == "tcp-project"


@pytest.mark.anyio
async def test_async_client(api_url: str) -> None:
    async with AsyncControlClient() as control:
        assert (await control.health())["status"] == "ok"
        created = await control.create_token(project="ctl-async")
        assert created["id"] in {t["id"] for t in await control.list_tokens("ctl-async")}
        await control.revoke_token(created["id"])
