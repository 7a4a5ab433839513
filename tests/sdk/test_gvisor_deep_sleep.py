"""Deep sleep that keeps memory, end to end: a gVisor sandbox idles into deep sleep (a
checkpoint), the server restarts, and the next exec wakes it with its counter process counting
on from where it was; deleting it removes its checkpoint. A real server (TCP on 127.0.0.1) on a
real LocalEngine; skipped without runsc."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from support.server import start_server

from sandlot import Sandbox

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        shutil.which("runsc") is None,
        reason="runsc is not installed (scripts/setup.sh builds it; SANDLOT_SKIP_RUNSC skips it)",
    ),
]

FETCH = (
    "python3 -c 'import urllib.request as u\n"
    'try: print(u.urlopen("http://127.0.0.1:8001/hello.txt").read().decode(), end="")\n'
    "except OSError: pass'"
)
COUNTER = "i=0; while :; do i=$((i+1)); echo $i >> /tmp/count; sleep 0.1; done"


def _wait_for(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def _counts(sb: Sandbox) -> list[int]:
    return [int(x) for x in sb.exec("cat /tmp/count").stdout.split()]


def test_a_counter_wakes_counting_after_deep_sleep_and_a_server_restart() -> None:
    from support.local import IMAGES_DIR, local_engine_unavailable

    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    from sandlot.engines.local import LocalEngine
    from sandlot.engines.local.mounts import mounts_under, unmount
    from sandlot.images.store import ImageStore

    tmp = Path(tempfile.mkdtemp(prefix="sl-gvckpt-", dir="/var/tmp"))
    tmp.chmod(0o711)  # runsc's gofer reaches the sandbox's files as the sandbox's uid
    db = f"sqlite:///{tmp / 'db'}"
    srv = start_server(LocalEngine(tmp / "state", images=ImageStore(IMAGES_DIR)), db, tcp=True)
    try:
        _, token = srv.app.state.control.store.create_token("gvckpt", "test")
        sb = Sandbox.create(api_url=srv.url, api_token=token, runtime="gvisor", idle_timeout=0)
        sb.launch_process(COUNTER)
        sb.filesystem.write_file("/srv/hello.txt", "served from memory")
        sb.launch_process("python3 -m http.server 8001 --bind 127.0.0.1 --directory /srv")
        _wait_for(lambda: sb.exec(FETCH).stdout == "served from memory")
        exposed = sb.expose_port(8001)["exposed_at"] + "hello.txt"
        processes = sorted((p.id, p.status) for p in sb.list_processes())
        _wait_for(lambda: len(_counts(sb)) >= 3)
        directory = tmp / "state" / "sandboxes" / sb.id

        def asleep() -> bool:
            info = Sandbox.get_from_id(sb.id, api_url=srv.url, api_token=token).info
            return (info["status"], info.get("sleep_kind")) == ("sleeping", "deep")

        sb.update_lifecycle(idle_timeout=1)
        _wait_for(asleep)
        assert (directory / "checkpoint" / "checkpoint.img").exists()
        slept = [e for e in sb.events() if e["kind"] == "slept (deep)"][-1]
        assert "memory kept" in slept["detail"], slept
        # Traffic to the exposed port wakes it: the same server process answers.
        r = httpx.get(exposed, timeout=60)
        assert (r.status_code, r.text) == (200, "served from memory")
        assert sorted((p.id, p.status) for p in sb.list_processes()) == processes
        _wait_for(asleep)  # and back to sleep, for the restart

        srv.stop(keep_sandboxes=True)
        srv = start_server(LocalEngine(tmp / "state", images=ImageStore(IMAGES_DIR)), db, tcp=True)
        sb = Sandbox.get_from_id(sb.id, api_url=srv.url, api_token=token)
        before = _counts(sb)  # this exec woke it
        _wait_for(lambda: _counts(sb)[-1] > before[-1])
        values = _counts(sb)
        assert values == list(range(1, len(values) + 1)), values[-10:]  # one shell, counting on
        assert sorted((p.id, p.status) for p in sb.list_processes()) == processes
        assert not (directory / "checkpoint").exists()
        sb.update_lifecycle(idle_timeout=0)
        sb.delete()
        assert not directory.exists()
    finally:
        srv.stop()
        for point in mounts_under(tmp):
            unmount(point)
        shutil.rmtree(tmp, ignore_errors=True)
