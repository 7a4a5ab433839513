"""``Sandbox.create(runtime="gvisor")`` end to end: a real server (TCP on 127.0.0.1) in front
of a real LocalEngine on a closed (0700) state directory, the server's default; skipped where
runsc is not built. Traffic goes only to loopback and Unix sockets."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.server import RunningServer, start_server

from sandlot import Sandbox, SandboxRequestError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        shutil.which("runsc") is None,
        reason="runsc is not installed (scripts/setup.sh builds it; SANDLOT_SKIP_RUNSC skips it)",
    ),
]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[RunningServer, str]]:
    from support.local import IMAGES_DIR, local_engine_unavailable

    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    from sandlot.engines.local import LocalEngine
    from sandlot.engines.local.mounts import mounts_under, unmount
    from sandlot.images.store import ImageStore

    tmp = Path(tempfile.mkdtemp(prefix="sl-gvisor-"))  # 0700, as a server's own
    engine = LocalEngine(tmp / "state", images=ImageStore(IMAGES_DIR))
    srv = start_server(engine, f"sqlite:///{tmp / 'db'}", tcp=True)
    _, token = srv.app.state.control.store.create_token("gvisor", "test")
    try:
        yield srv, token
    finally:
        srv.stop()
        for point in mounts_under(tmp):
            unmount(point)
        shutil.rmtree(tmp, ignore_errors=True)


def test_exec_files_and_an_exposed_port_on_gvisor(server: tuple[RunningServer, str]) -> None:
    srv, token = server
    start = time.perf_counter()
    sb = Sandbox.create(api_url=srv.url, api_token=token, runtime="gvisor", idle_timeout=0)
    try:
        created = time.perf_counter() - start
        assert "gvisor" in sb.exec("cat /proc/version").stdout
        sb.filesystem.mkdir("/srv/www", recursive=True)
        sb.filesystem.write_file("/srv/www/hello.txt", "hi from gVisor")
        assert sb.filesystem.read_file("/srv/www/hello.txt").content == "hi from gVisor"
        sb.launch_process("python3 -m http.server 8001 --bind 127.0.0.1 --directory /srv/www")
        waited = sb.exec(
            "python3 -c 'import socket,time\n"
            "for _ in range(600):\n"
            '    try: socket.create_connection(("127.0.0.1", 8001)).close(); break\n'
            "    except OSError: time.sleep(0.05)'"
        )
        assert waited.exit_code == 0, waited.stderr
        exposed = sb.expose_port(8001)
        r = httpx.get(exposed["exposed_at"] + "hello.txt", timeout=30)
        assert r.status_code == 200 and r.text == "hi from gVisor"
        info = httpx.get(
            f"{srv.url}/v1/sandboxes/{sb.id}", headers={"authorization": f"Bearer {token}"}
        ).json()
        assert info["runtime"] == "gvisor"
        print(f"gvisor create {created * 1000:.0f} ms")
    finally:
        sb.delete()


def test_unknown_runtime_is_a_400(server: tuple[RunningServer, str]) -> None:
    srv, token = server
    r = httpx.post(
        f"{srv.url}/v1/sandboxes",
        json={"runtime": "kata"},
        headers={"authorization": f"Bearer {token}"},
    )
    assert r.status_code == 400, r.text
    assert "unknown runtime 'kata'" in r.text
    with pytest.raises(SandboxRequestError, match="unknown runtime"):
        Sandbox.create(api_url=srv.url, api_token=token, runtime="kata")


def test_light_sleep_on_gvisor_keeps_processes(server: tuple[RunningServer, str]) -> None:
    """Light sleep after idle_timeout (runsc pause), then a transparent wake (runsc resume):
    the background process is still there. Refused with a 400 before."""
    srv, token = server
    with Sandbox.create(
        api_url=srv.url,
        api_token=token,
        image="busybox",
        runtime="gvisor",
        idle_timeout=1,
        _experimental_enable_light_sleep=True,
    ) as sb:
        sb.exec("sleep 600 >/dev/null 2>&1 &")
        deadline = time.monotonic() + 30
        while True:
            info = httpx.get(
                f"{srv.url}/v1/sandboxes/{sb.id}", headers={"authorization": f"Bearer {token}"}
            ).json()
            if (info["status"], info.get("sleep_kind")) == ("sleeping", "light"):
                break
            assert time.monotonic() < deadline, f"never slept: {info['status']}"
            time.sleep(0.2)
        assert sb.exec("pidof sleep").code == 0
