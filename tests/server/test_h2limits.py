"""The frame-size guard in front of h2 (both HTTP/2 ends of the gateway)."""

from __future__ import annotations

import pytest

from sandlot.server.h2limits import FrameSizeGuard


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
