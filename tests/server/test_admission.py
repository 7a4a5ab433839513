"""The bounded queue in front of each exposed port (admission.py): slots, order, refusals."""

from __future__ import annotations

import asyncio

import pytest

from sandlot.server.admission import Admission, Busy


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
