"""``sandlot server --engine kubernetes`` as an operator runs it outside the cluster: its own
process, a kubeconfig and a namespace, driven by the SDK over its socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.kube import ControlPlane
from support.loopkubelet import LoopKubelet

from sandlot import Sandbox


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="slk-", dir="/tmp"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _server(short_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SANDLOT_STATE_DIR": str(short_dir / "state"),
        "XDG_RUNTIME_DIR": str(short_dir / "xdg"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "sandlot.cli", "server", "--log-level", "warning", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_sandlot_server_engine_kubernetes(
    control_plane: ControlPlane,
    namespace: str,
    kubelet: LoopKubelet,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sock = short_dir / "s.sock"
    proc = _server(
        short_dir,
        "--engine=kubernetes",
        f"--kubeconfig={control_plane.kubeconfig()}",
        f"--namespace={namespace}",
        "--runtime-class=gvisor=runsc-class",
        f"--listen=unix:{sock}",
        f"--database=sqlite:///{short_dir / 'db'}",
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        monkeypatch.setenv("SANDLOT_URL", f"unix:{sock}")
        monkeypatch.delenv("SANDLOT_API_TOKEN", raising=False)
        with Sandbox.create(image="debian") as sb:
            assert sb.exec("echo from a pod").stdout == "from a pod\n"
            status, _ = control_plane.request(
                "GET", f"/api/v1/namespaces/{namespace}/pods/sandlot-{sb.id}"
            )
            assert status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_a_bad_runtime_class_is_refused_with_a_message(short_dir: Path) -> None:
    proc = _server(short_dir, "--engine=kubernetes", "--runtime-class=kata")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert b"--runtime-class must be RUNTIME=CLASS" in out
