"""admission.py: the bounded queue in front of each exposed port (slots, order, refusals) and
the cap on requests in flight per API token."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sandlot.server.gateway.admission import Admission, Busy, TokenRequestLimit


@pytest.mark.anyio
async def test_slots_queue_in_order_then_refuse() -> None:
    gate = Admission(limit=2, queue=2, timeout=30)
    order: list[int] = []
    release = asyncio.Event()

    async def hold(n: int) -> None:
        async with gate.slot():
            order.append(n)
            await release.wait()

    holders = [asyncio.ensure_future(hold(n)) for n in range(4)]
    while gate.held < 2 or gate.waiting < 2:
        await asyncio.sleep(0)
    assert order == [0, 1]
    with pytest.raises(Busy, match="2 requests in flight and 2 waiting"):
        async with gate.slot():
            pass
    release.set()
    await asyncio.gather(*holders)
    assert order == [0, 1, 2, 3]  # first come, first served
    assert gate.held == 0 and gate.waiting == 0


@pytest.mark.anyio
async def test_a_wait_too_long_is_busy() -> None:
    gate = Admission(limit=1, queue=5, timeout=0.05)
    async with gate.slot():
        with pytest.raises(Busy, match=r"waited 0\.05s"):
            async with gate.slot():
                pass
        assert gate.waiting == 0
    assert gate.held == 0


@pytest.mark.anyio
async def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    gate = Admission(limit=1, queue=5, timeout=30)
    got = asyncio.Event()

    async def third() -> None:
        async with gate.slot():
            got.set()

    async with gate.slot():
        second = asyncio.ensure_future(gate.slot().__aenter__())
        waiter = asyncio.ensure_future(third())
        while gate.waiting < 2:
            await asyncio.sleep(0)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
    await asyncio.wait_for(got.wait(), 5)
    await waiter
    assert gate.held == 0 and gate.waiting == 0


# -- requests in flight per API token -----------------------------------------------------------


@pytest.mark.anyio
async def test_requests_per_token_are_capped() -> None:
    release = asyncio.Event()
    served: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        served.append(scope["path"])
        await release.wait()

    limited = TokenRequestLimit(app, limit=2, prefix="sl_")

    def scope(token: str | None, path: str = "/") -> dict[str, Any]:
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        return {"type": "http", "path": path, "headers": headers}

    answers: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    held = [asyncio.ensure_future(limited(scope("sl_a"), receive, send)) for _ in range(2)]
    others = [
        asyncio.ensure_future(limited(scope(t), receive, send)) for t in ("sl_b", None, "secret")
    ]
    while len(served) < 5:
        await asyncio.sleep(0)
    await limited(scope("sl_a", "/third"), receive, send)  # refused at once
    assert answers[0]["status"] == 429
    body = json.loads(answers[1]["body"])
    assert body["code"] == "too_many_requests" and "--max-requests-per-token" in body["error"]
    assert "/third" not in served
    release.set()
    await asyncio.gather(*held, *others)
    assert limited.held == {}  # nothing kept once the requests ended
