"""The frame-size guard and the cheap-frame budget in front of h2 (h2limits.py)."""

from __future__ import annotations

import time

import pytest

from sandlot.server.h2limits import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PING,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    FrameMeter,
    FrameSizeGuard,
    H2Limits,
    TokenBucket,
    is_cheap,
)


def frame(length: int, payload: bytes | None = None) -> bytes:
    body = b"x" * length if payload is None else payload
    return length.to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + body


def test_frames_within_the_limit_pass_however_split() -> None:
    stream = b"P" * 24 + frame(0) + frame(16384) + frame(5) + frame(16384)
    for size in (1, 2, 7, 9, 10, 100, 16393, len(stream)):
        guard = FrameSizeGuard(skip=24)
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert all(guard.fits(p, 16384) for p in pieces), size


@pytest.mark.parametrize("split", [1, 3, 9, 10, 50])
def test_an_oversized_header_is_refused_before_its_body(split: int) -> None:
    stream = frame(10) + frame(16385, b"")  # only the header of the big one
    guard = FrameSizeGuard()
    results = [guard.fits(stream[i : i + split], 16384) for i in range(0, len(stream), split)]
    assert results[-1] is False and all(results[:-1])


def test_the_largest_announcement_is_refused() -> None:
    assert FrameSizeGuard().fits(b"\xff" * 9, 1 << 20) is False


# -- the cheap-frame budget ---------------------------------------------------------------------


def typed(kind: int, flags: int = 0, length: int = 0, stream: int = 1) -> bytes:
    return (
        length.to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + b"x" * length
    )


@pytest.mark.parametrize(
    ("kind", "flags", "length", "cheap"),
    [
        (RST_STREAM, 0, 4, True),
        (PRIORITY, 0, 5, True),
        (PING, 0, 8, True),
        (PING, ACK, 8, False),  # our own PING's answer
        (SETTINGS, 0, 6, True),
        (SETTINGS, ACK, 0, False),
        (DATA, 0, 0, True),  # empty and ends nothing
        (DATA, END_STREAM, 0, False),
        (DATA, 0, 10, False),
        (HEADERS, 0, 0, True),
        (HEADERS, END_HEADERS, 20, False),
        (CONTINUATION, 0, 0, True),
        (WINDOW_UPDATE, 0, 4, False),  # every download sends them
        (0x42, 0, 3, True),  # a type nobody knows
    ],
)
def test_what_counts_as_cheap(kind: int, flags: int, length: int, cheap: bool) -> None:
    assert is_cheap(kind, flags, length) is cheap


def test_the_meter_refuses_once_the_budget_is_spent() -> None:
    meter = FrameMeter(H2Limits(frame_burst=10, frame_rate=0.0))
    assert meter.fits(typed(DATA, END_STREAM, 100) * 50, 16384)  # real work costs nothing
    assert meter.fits(typed(RST_STREAM, 0, 4) * 10, 16384)
    assert not meter.abusive
    assert not meter.fits(typed(PING, 0, 8), 16384)
    assert meter.abusive


def test_the_bucket_refills_with_time_and_by_earning() -> None:
    bucket = TokenBucket(3, 1000.0)
    assert all(bucket.spend() for _ in range(3))
    time.sleep(0.01)  # 1000/s: full again (never above the burst)
    assert all(bucket.spend() for _ in range(3))
    still = TokenBucket(2, 0.0)
    assert still.spend() and still.spend() and not still.spend()
    still.earn(2)
    assert still.spend() and not still.spend()
