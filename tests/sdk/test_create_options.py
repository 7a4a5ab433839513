"""Koyeb 1.5.5's create options: config_files, sandbox_secret, the deep sleep value, the
cloud-only ones (refused), update_network_policy."""

from __future__ import annotations

import pytest
from support.server import RunningServer

from sandlot import ConfigFile, Sandbox, SandboxRequestError, UnsupportedFeatureError


def test_config_files_and_own_secret(api_url: str, local_server: RunningServer) -> None:
    secret = "my-own-secret-0123456789"
    with Sandbox.create(
        image="busybox",
        config_files={
            "/etc/app/conf.yaml": "key: value\n",
            "/root/.ssh/id": ConfigFile(content=b"\x00key", permissions="0600"),
        },
        sandbox_secret=secret,
        _experimental_enable_light_sleep=True,
        _experimental_deep_sleep_value=120,
        poll_interval=0.05,
        cleanup_on_failure=False,
        enable_mesh=False,
    ) as sb:
        assert sb.secret == secret
        assert Sandbox.get_from_id(sb.id).secret == secret
        out = sb.exec("cat /etc/app/conf.yaml; stat -c '%a %s' /etc/app/conf.yaml /root/.ssh/id")
        assert out.stdout == "key: value\n644 11\n600 4\n"
        row = local_server.app.state.control.store.get_sandbox(sb.id)
        assert row.deep_sleep_after == 120
        sb.update_network_policy(block_network=True)
        assert sb.refresh().info["network"] == "none"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"app_id": "app-123"}, UnsupportedFeatureError, "app_id"),
        ({"enable_mesh": True}, UnsupportedFeatureError, "mesh"),
        ({"sandbox_secret": "short"}, SandboxRequestError, "sandbox_secret"),
        ({"sandbox_secret": "has spaces in it, sixteen+"}, SandboxRequestError, "sandbox_secret"),
        ({"config_files": {"relative": "x"}}, SandboxRequestError, "absolute"),
        ({"config_files": {"/x": ConfigFile("x", "rwx")}}, SandboxRequestError, "octal"),
        ({"_experimental_deep_sleep_value": -1}, SandboxRequestError, "deep_sleep_value"),
    ],
)
def test_bad_create_options(
    api_url: str, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    before = {s.id for s in Sandbox.list()}
    with pytest.raises(error, match=message):
        Sandbox.create(image="busybox", **kwargs)  # type: ignore[arg-type]
    assert {s.id for s in Sandbox.list()} == before
