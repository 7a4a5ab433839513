"""Lifecycle over the real LocalEngine: sleep after idle_timeout, transparent wake, deletion
timers, update_lifecycle, events. Timers are a few seconds; the server checks every 0.5 s."""

from __future__ import annotations

import time

import pytest
from support.server import RunningServer

from sandlot import Sandbox, SandboxNotFoundError, SandboxRequestError

pytestmark = [pytest.mark.usefixtures("api_url"), pytest.mark.runtimes]


def _status(sb: Sandbox) -> tuple[str, str | None]:
    info = Sandbox.get_from_id(sb.id).info
    return info["status"], info.get("sleep_kind")


def _wait_for(pred, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.2)


def _events(sb: Sandbox) -> list[str]:
    return [e["kind"] for e in sb.events()]


@pytest.mark.gvisor_default
def test_deep_sleep_after_idle_then_transparent_wake(sdk_runtime: str) -> None:
    with Sandbox.create(image="busybox", idle_timeout=1) as sb:
        sb.exec("echo kept > /root/f; sleep 600 >/dev/null 2>&1 &")
        _wait_for(lambda: _status(sb) == ("sleeping", "deep"))
        result = sb.exec("cat /root/f; pidof sleep || echo no-sleep")
        assert result.stdout.splitlines()[0] == "kept"  # files survive deep sleep
        if sdk_runtime == "gvisor":  # checkpointed: its processes come back with their memory
            assert result.stdout.splitlines()[1].isdigit()
        else:  # background processes do not
            assert result.stdout.splitlines()[1] == "no-sleep"
        assert _status(sb)[0] == "running"
        kinds = _events(sb)
        assert kinds[:3] == ["created", "slept (deep)", "woke"]


def test_light_sleep_keeps_processes() -> None:
    with Sandbox.create(
        image="busybox", idle_timeout=1, _experimental_enable_light_sleep=True
    ) as sb:
        sb.exec("sleep 600 >/dev/null 2>&1 &")
        _wait_for(lambda: _status(sb) == ("sleeping", "light"))
        assert sb.exec("pidof sleep").code == 0
        # the request goes through first; "woke" is recorded just after it
        _wait_for(lambda: "woke" in _events(sb))


def test_idle_timeout_zero_never_sleeps_and_update_lifecycle_applies() -> None:
    with Sandbox.create(image="busybox", idle_timeout=0) as sb:
        time.sleep(2)
        assert _status(sb)[0] == "running"
        sb.update_lifecycle(idle_timeout=1)
        _wait_for(lambda: _status(sb)[0] == "sleeping")


def test_open_stream_keeps_the_sandbox_awake() -> None:
    with Sandbox.create(image="busybox", idle_timeout=1) as sb:
        result = sb.exec("sleep 3; echo done", timeout=20)
        assert result.stdout == "done\n"
        assert "slept (deep)" not in _events(sb)[:2]


def test_delete_after_delay() -> None:
    sb = Sandbox.create(image="busybox", delete_after_delay=2, idle_timeout=0)
    _wait_for(lambda: _gone(sb))
    kinds = _events_of_deleted(sb)
    assert kinds[-1] == "deleted"


def test_delete_after_inactivity_delay() -> None:
    sb = Sandbox.create(image="busybox", idle_timeout=1, delete_after_inactivity_delay=1)
    _wait_for(lambda: _gone(sb))
    assert "slept (deep)" in _events_of_deleted(sb)


def test_wait_ready_and_is_healthy_wake_a_sleeping_sandbox() -> None:
    with Sandbox.create(image="busybox", idle_timeout=1) as sb:
        _wait_for(lambda: _status(sb)[0] == "sleeping")
        assert sb.is_healthy()
        _wait_for(lambda: _status(sb)[0] == "sleeping")
        assert sb.wait_ready(timeout=20)


def test_bad_lifecycle_values() -> None:
    with Sandbox.create(image="busybox") as sb:
        for bad in ({"idle_timeout": -1}, {"delete_after_delay": 10**12}):
            with pytest.raises(SandboxRequestError):
                sb.update_lifecycle(**bad)
    with pytest.raises(SandboxNotFoundError):
        sb.update_lifecycle(idle_timeout=5)
    with pytest.raises(SandboxRequestError):
        Sandbox.create(image="busybox", delete_after_inactivity_delay=-5)


def _gone(sb: Sandbox) -> bool:
    try:
        Sandbox.get_from_id(sb.id)
    except SandboxNotFoundError:
        return True
    return False


def _events_of_deleted(sb: Sandbox) -> list[str]:
    return _events(sb)


def test_a_wrong_secret_does_not_wake_a_sleeping_sandbox() -> None:
    with Sandbox.create(image="busybox", idle_timeout=1) as sb:
        _wait_for(lambda: _status(sb)[0] == "sleeping")
        intruder = Sandbox.get_from_id(sb.id)
        intruder._info["secret"] = "wrong"
        with pytest.raises(SandboxRequestError) as denied:
            intruder.exec("true")
        assert denied.value.status_code == 401
        assert _status(sb)[0] == "sleeping"


def test_a_failed_wake_is_a_clear_error_not_a_hang(local_server: RunningServer) -> None:
    """Fault injection standing in for a wake that cannot succeed (e.g. no memory left on the
    host): the sandbox's bundle is made unusable while it is in deep sleep."""
    from sandlot import SandboxServiceError

    with Sandbox.create(image="busybox", idle_timeout=1) as sb:
        _wait_for(lambda: _status(sb) == ("sleeping", "deep"))
        bundle = local_server.engine.sandboxes_dir / sb.id / "bundle" / "config.json"
        bundle.write_text("{ not json")
        t0 = time.monotonic()
        with pytest.raises(SandboxServiceError) as failed:
            sb.exec("true", timeout=30)
        assert time.monotonic() - t0 < 20
        assert "could not wake" in str(failed.value)
        info = Sandbox.get_from_id(sb.id).info
        assert info["status"] == "error" and "waking from deep sleep failed" in info["error"]
        assert "error" in _events(sb)
