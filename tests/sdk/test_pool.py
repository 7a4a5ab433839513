"""Warm pools over the real LocalEngine: a matching create() claims a ready sandbox (with the
owner's secret, env, name and labels), the pool refills, anything else is created cold."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sdk.conftest import IMAGES_DIR, local_engine_unavailable
from support.server import RunningServer, start_server

from sandlot import Sandbox, SandboxRequestError
from sandlot.server.config import PoolKey
from sandlot.server.control.pools import POOL_PROJECT


@pytest.fixture
def pooled_server() -> Iterator[RunningServer]:
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore

    tmp = Path(tempfile.mkdtemp(prefix="sl-pool-"))
    engine = LocalEngine(tmp / "state", images=ImageStore(IMAGES_DIR))
    srv = start_server(
        engine,
        f"sqlite:///{tmp / 'db'}",
        unix_path=tmp / "s.sock",
        pools={PoolKey("busybox", "nano"): 2},
    )
    yield srv
    srv.stop()
    import asyncio

    for info in asyncio.run(engine.list()):
        asyncio.run(engine.delete(info.id))
    shutil.rmtree(tmp, ignore_errors=True)


def _ready(srv: RunningServer) -> int:
    store = srv.app.state.control.store
    return int(store.count_pooled(POOL_PROJECT, "busybox", "nano")) - len(
        [r for r in store.sandboxes_with_status(["pooling"])]
    )


def _wait_ready(srv: RunningServer, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _ready(srv) < n:
        assert time.monotonic() < deadline, "pool did not fill"
        time.sleep(0.1)


def test_claim_from_pool_then_refill(pooled_server: RunningServer) -> None:
    srv = pooled_server
    _wait_ready(srv, 2)
    assert Sandbox.list(api_url=srv.url) == []  # pooled sandboxes belong to nobody
    t0 = time.perf_counter()
    sb = Sandbox.create(
        image="busybox",
        instance_type="nano",
        env={"OWNER": "alice"},
        name="claimed",
        labels={"team": "a"},
        api_url=srv.url,
    )
    claim_s = time.perf_counter() - t0
    try:
        assert sb.name == "claimed" and sb.labels == {"team": "a"}
        assert sb.exec("echo $OWNER").stdout == "alice\n"
        deadline = time.monotonic() + 10  # the history is written just after the create
        while not sb.events():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "from the warm pool" in sb.events()[0]["detail"]
        assert claim_s < 5
        _wait_ready(srv, 2)  # refilled in the background
        # the sandbox's agent answers only its owner's secret
        intruder = Sandbox.get_from_id(sb.id, api_url=srv.url)
        intruder._info["secret"] = "not-the-secret"
        with pytest.raises(SandboxRequestError) as denied:
            intruder.exec("true")
        assert denied.value.status_code == 401
    finally:
        sb.delete()


def test_non_matching_create_is_cold(pooled_server: RunningServer) -> None:
    srv = pooled_server
    _wait_ready(srv, 2)
    with Sandbox.create(image="busybox", instance_type="micro", api_url=srv.url) as sb:
        assert "warm pool" not in sb.events()[0]["detail"]
        assert sb.exec("echo cold").stdout == "cold\n"
    assert _ready(srv) == 2  # untouched


def test_pool_spec_parsing() -> None:
    assert PoolKey.parse("default:micro=3") == (PoolKey("default", "micro"), 3)
    for bad in ("default:micro", "default=3", "default:huge=1", ":micro=1", "a:micro=x"):
        with pytest.raises(ValueError):
            PoolKey.parse(bad)
