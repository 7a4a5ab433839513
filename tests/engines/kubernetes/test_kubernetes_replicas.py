"""Two server replicas on one PostgreSQL store and one namespace: the Lease's holder alone runs
the lifecycle timers (and warm pools, probes, reconcile), either replica serves requests
(waking a sandbox the other put to sleep), and a stopped holder's loops move to the other."""

from __future__ import annotations

import base64
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.loopkubelet import LoopKubelet
from support.postgres import fresh_database
from support.server import RunningServer, start_server

from sandlot import Sandbox
from sandlot.engines.kubernetes.engine import KubernetesEngine
from sandlot.engines.kubernetes.lease import LeaseElector
from sandlot.engines.kubernetes.settings import KubernetesSettings


def _wait_for(pred, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def _replica(
    settings: KubernetesSettings, db: str, key: Path, name: str
) -> tuple[RunningServer, LeaseElector]:
    engine = KubernetesEngine(settings)
    lease = LeaseElector(
        engine.coordination, settings.namespace, identity=name, duration=2, renew_every=0.3
    )
    return start_server(engine, db, tcp=True, leadership=lease, key_file=key), lease


@pytest.fixture
def key_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sl-k8s-key-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_one_replica_runs_the_timers_either_serves_and_the_other_takes_over(
    kube_settings: KubernetesSettings,
    kubelet: LoopKubelet,
    postgres_url: str,
    key_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = fresh_database(postgres_url)
    # One key for both, made beforehand as a Secret's file is (base64 text, read-only)
    key = key_dir / "server.key"
    key.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    key.chmod(0o400)
    a, lease_a = _replica(kube_settings, db, key, "replica-a")
    b: RunningServer | None = None
    try:
        _wait_for(lambda: lease_a.is_leader)
        b, lease_b = _replica(kube_settings, db, key, "replica-b")
        _, token = a.app.state.control.store.create_token("replicas", "test")
        monkeypatch.setenv("SANDLOT_API_TOKEN", token)

        # Created through b; put to sleep by a's timers (b's do not run)
        monkeypatch.setenv("SANDLOT_URL", b.url)
        sb = Sandbox.create(image="debian", idle_timeout=1)
        _wait_for(lambda: Sandbox.get_from_id(sb.id).info["status"] == "sleeping")
        assert not lease_b.is_leader
        assert sb.exec("echo woken by b").stdout == "woken by b\n"  # b serves the wake
        assert [e["kind"] for e in sb.events()][:3] == ["created", "slept (deep)", "woke"]

        # a stops (releasing the Lease): b takes the timers over
        a.stop(keep_sandboxes=True)
        _wait_for(lambda: lease_b.is_leader, timeout=10)
        _wait_for(lambda: Sandbox.get_from_id(sb.id).info["status"] == "sleeping")
        sb.delete()
    finally:
        a.stop(keep_sandboxes=True)
        if b is not None:
            b.stop()
