"""A sandlot server with the kubernetes engine, driven by the SDK: create, exec, files, deep
sleep (scale to zero) and the wake on the next request, light sleep turned deep, warm pools as
pre-created Pods, delete, and reconcile after a restart -- all against the real API server,
with the loopback stand-in kubelet (support/loopkubelet.py) running the agents."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.kube import ControlPlane
from support.loopkubelet import LoopKubelet
from support.server import RunningServer, start_server

from sandlot import Sandbox
from sandlot.engines.kubernetes.engine import KubernetesEngine
from sandlot.engines.kubernetes.settings import KubernetesSettings
from sandlot.server.config import PoolKey


def _wait_for(pred, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


@pytest.fixture
def server_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sl-k8s-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def k8s_server(
    kube_settings: KubernetesSettings,
    kubelet: LoopKubelet,
    server_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[RunningServer]:
    srv = start_server(
        KubernetesEngine(kube_settings),
        f"sqlite:///{server_dir / 'sandlot.db'}",
        unix_path=server_dir / "sandlot.sock",
    )
    monkeypatch.setenv("SANDLOT_URL", srv.url)
    monkeypatch.delenv("SANDLOT_API_TOKEN", raising=False)
    yield srv
    srv.stop()


def _pods(cp: ControlPlane, ns: str) -> dict[str, dict[str, Any]]:
    _, body = cp.request("GET", f"/api/v1/namespaces/{ns}/pods")
    return {p["metadata"]["name"]: p for p in json.loads(body)["items"]}


def test_sdk_through_a_server_on_kubernetes(
    k8s_server: RunningServer, control_plane: ControlPlane, namespace: str
) -> None:
    with Sandbox.create(image="docker.io/library/debian:12", env={"WHO": "pod"}) as sb:
        assert sb.exec("echo hello $WHO").stdout == "hello pod\n"
        sb.filesystem.write_file("/tmp/sandlot-k8s-test-file", "data")
        assert sb.filesystem.read_file("/tmp/sandlot-k8s-test-file").content == "data"
        pod = _pods(control_plane, namespace)[f"sandlot-{sb.id}"]
        spec = json.loads(
            json.loads(
                control_plane.request(
                    "GET", f"/api/v1/namespaces/{namespace}/secrets/sandlot-{sb.id}"
                )[1]
            )["metadata"]["annotations"]["sandlot.dev/spec"]
        )
        assert spec["project"] and spec["image"] == "docker.io/library/debian:12"
        assert pod["spec"]["containers"][0]["image"] == "docker.io/library/debian:12"
        sandbox_id = sb.id
    assert f"sandlot-{sandbox_id}" not in _pods(control_plane, namespace)


def test_idle_sandbox_scales_to_zero_and_wakes_on_the_next_request(
    k8s_server: RunningServer, control_plane: ControlPlane, namespace: str
) -> None:
    # Light sleep asked for: a Pod cannot be frozen, so it sleeps deep.
    with Sandbox.create(
        image="debian", idle_timeout=1, _experimental_enable_light_sleep=True
    ) as sb:
        name = f"sandlot-{sb.id}"
        _wait_for(lambda: Sandbox.get_from_id(sb.id).info["status"] == "sleeping")
        assert Sandbox.get_from_id(sb.id).info.get("sleep_kind") == "deep"
        _wait_for(lambda: name not in _pods(control_plane, namespace))
        assert sb.exec("echo awake").stdout == "awake\n"  # the Pod is made again
        assert name in _pods(control_plane, namespace)
        kinds = [e["kind"] for e in sb.events()]
        assert kinds[:3] == ["created", "slept (deep)", "woke"]


def test_warm_pool_is_pre_created_pods(
    kube_settings: KubernetesSettings,
    kubelet: LoopKubelet,
    server_dir: Path,
    control_plane: ControlPlane,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    srv = start_server(
        KubernetesEngine(kube_settings),
        f"sqlite:///{server_dir / 'sandlot.db'}",
        unix_path=server_dir / "sandlot.sock",
        pools={PoolKey("default", "micro"): 2},
    )
    monkeypatch.setenv("SANDLOT_URL", srv.url)
    monkeypatch.delenv("SANDLOT_API_TOKEN", raising=False)
    try:

        def pooled() -> list[dict[str, Any]]:
            return [
                p
                for p in _pods(control_plane, namespace).values()
                if p["metadata"]["labels"].get("sandlot.dev/pool") == "true"
                and p.get("status", {}).get("podIP")
            ]

        _wait_for(lambda: len(pooled()) == 2)
        before = {p["metadata"]["name"] for p in pooled()}
        with Sandbox.create(image="koyeb/sandbox", instance_type="micro") as sb:
            assert f"sandlot-{sb.id}" in before  # claimed, not made
            assert sb.exec("echo claimed").stdout == "claimed\n"
            _wait_for(lambda: len(pooled()) == 3)  # the pool refills (the claimed Pod keeps
            # its pool label: it was made as one)
    finally:
        srv.stop()


def test_restart_reconciles_pods_and_rows(
    kube_settings: KubernetesSettings,
    kubelet: LoopKubelet,
    server_dir: Path,
    control_plane: ControlPlane,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = f"sqlite:///{server_dir / 'sandlot.db'}"
    srv = start_server(KubernetesEngine(kube_settings), db, unix_path=server_dir / "a.sock")
    monkeypatch.setenv("SANDLOT_URL", srv.url)
    monkeypatch.delenv("SANDLOT_API_TOKEN", raising=False)
    kept = Sandbox.create(image="debian")
    lost = Sandbox.create(image="debian")
    srv.stop(keep_sandboxes=True)
    # While no server runs: one sandbox's Pod and Secret go behind sandlot's back, and a Pod
    # nobody recorded appears (with its Secret: what a create leaves if it dies after them).
    for kind in ("pods", "secrets"):
        control_plane.request("DELETE", f"/api/v1/namespaces/{namespace}/{kind}/sandlot-{lost.id}")

    async def stray() -> None:
        from sandlot.engines.base import SandboxSpec
        from sandlot.instance_types import get_instance_type

        engine = KubernetesEngine(kube_settings)
        try:
            await engine.create(
                SandboxSpec("strayone", "debian", get_instance_type("nano"), secret="x")
            )
        finally:
            await engine.close()

    import asyncio

    asyncio.run(stray())
    _wait_for(lambda: "sandlot-strayone" in _pods(control_plane, namespace))

    srv = start_server(KubernetesEngine(kube_settings), db, unix_path=server_dir / "b.sock")
    monkeypatch.setenv("SANDLOT_URL", srv.url)
    try:
        assert "sandlot-strayone" not in _pods(control_plane, namespace)  # no row: removed
        info = Sandbox.get_from_id(lost.id).info
        assert info["status"] == "error" and "lost" in info["error"]
        again = Sandbox.get_from_id(kept.id)
        assert again.exec("echo still here").stdout == "still here\n"
        again.delete()
    finally:
        srv.stop()


def test_exposed_port_and_tcp_proxy_reach_the_pod_through_the_gateway(
    kube_settings: KubernetesSettings,
    kubelet: LoopKubelet,
    server_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway's path to a port is the agent's tunnel at the Pod IP: as for a local
    sandbox's socket, no Service per sandbox. (The stand-in's "Pod" shares this host's loopback,
    so its server gets a free port.)"""
    import socket as socketmod

    import httpx

    srv = start_server(KubernetesEngine(kube_settings), f"sqlite:///{server_dir / 'db'}", tcp=True)
    _, token = srv.app.state.control.store.create_token("ports", "test")
    monkeypatch.setenv("SANDLOT_URL", srv.url)
    monkeypatch.setenv("SANDLOT_API_TOKEN", token)
    with socketmod.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        with Sandbox.create(image="debian", enable_tcp_proxy=True, idle_timeout=0) as sb:
            sb.exec("mkdir -p web && echo served-from-the-pod > web/index.html")
            sb.launch_process(f"python3 -m http.server {port} --bind 127.0.0.1 -d web")
            exposed = sb.expose_port(port)

            def served() -> bool:
                try:
                    r = httpx.get(exposed["exposed_at"], timeout=5)
                except httpx.TransportError:
                    return False
                return r.status_code == 200 and r.text == "served-from-the-pod\n"

            _wait_for(served)
            sb.wait_tcp_proxy_ready(timeout=30)
            host, proxy_port = sb.get_tcp_proxy_info() or ("", 0)
            with socketmod.create_connection((host, proxy_port), timeout=10) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"served-from-the-pod\n")
    finally:
        srv.stop()
