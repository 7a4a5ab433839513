"""Exposed ports on the embedded default (no ``SANDLOT_URL``: the SDK starts the local server on
its Unix socket): the URL ``expose_port`` answers opens with urllib, as a user's browser or curl
would open it. Before, it was ``http+unix://%2F...sock/sandboxes/ID/ports/8080/``, which nothing
opens, and ``get_domain()`` answered the URL-encoded socket path.

Real parts throughout: the SDK's own autostart in a fresh process (its own runtime and state
directories), the local engine, a real sandbox serving HTTP, urllib as the client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.local import IMAGES_DIR, local_engine_unavailable

from sandlot.engines.local.mounts import mounts_under, unmount

SCRIPT = textwrap.dedent(
    """
    import json, time, urllib.error, urllib.request
    from sandlot import Sandbox

    def fetch(url):
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    out = {}
    with Sandbox.create() as sb:
        sb.filesystem.write_file("/srv/index.html", "hello from the sandbox\\n")
        sb.launch_process("python3 -m http.server 8080 --directory /srv")
        exposed = sb.expose_port(8080)
        url = exposed["exposed_at"]
        out["exposed_at"] = url
        out["domain"] = sb.get_domain()
        deadline = time.monotonic() + 60
        while True:  # until the server in the sandbox listens
            status, body = fetch(url)
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        out["status"], out["body"] = status, body
        base = url.split("/sandboxes/")[0]
        # the ports-only listener serves nothing else: not the API, not the agent
        out["api"] = fetch(base + "/v1/sandboxes")[0]
        out["health"] = fetch(base + "/v1/health")[0]
        out["agent"] = fetch(f"{base}/sandboxes/{sb.id}/koyeb-sandbox/health")[0]
        out["other_port"] = fetch(f"{base}/sandboxes/{sb.id}/ports/9999/")[0]
    with Sandbox.create(protect_ports=True) as sb:  # still asks for the port's token
        sb.launch_process("python3 -m http.server 8080")
        exposed = sb.expose_port(8080)
        out["protected_without"] = fetch(exposed["exposed_at"])[0]
        deadline = time.monotonic() + 60
        while True:
            status = fetch(exposed["exposed_at"] + "?sandlot_token=" + exposed["token"])[0]
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        out["protected_with"] = status
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture
def embedded_env() -> Iterator[dict[str, str]]:
    """A fresh user's environment: no SANDLOT_URL, private runtime and state directories, the
    host's built images. The server the SDK starts is stopped and its mounts undone after."""
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="sl-emb-"))
    (root / "xdg").mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDLOT_")}
    env |= {
        "XDG_RUNTIME_DIR": str(root / "xdg"),
        "SANDLOT_STATE_DIR": str(root / "state"),
        "SANDLOT_IMAGES_DIR": str(IMAGES_DIR),
    }
    try:
        yield env
    finally:
        _stop_server(root / "xdg")
        for point in mounts_under(root / "state"):
            unmount(point)
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def _stop_server(xdg: Path) -> None:
    for sock in (xdg / "sandlot").glob("*.sock"):
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=10) as c:
                pid = c.get("http://x/v1/health").json()["pid"]
        except (httpx.HTTPError, ValueError, KeyError):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def test_exposed_port_on_the_embedded_default_opens_with_urllib(
    embedded_env: dict[str, str],
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=embedded_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    out = json.loads(lines[0].removeprefix("RESULT "))
    assert out["exposed_at"].startswith("http://127.0.0.1:"), out
    assert out["exposed_at"].endswith("/ports/8080/"), out
    assert (out["status"], out["body"]) == (200, "hello from the sandbox\n"), out
    assert out["domain"] == out["exposed_at"].split("/")[2], out
    assert out["api"] == out["health"] == out["agent"] == 404, out
    assert out["other_port"] == 404, out
    assert out["protected_without"] == 401 and out["protected_with"] == 200, out
