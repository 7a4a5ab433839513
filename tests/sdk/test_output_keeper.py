"""The SDK's bounded buffers on their own: what ``exec`` keeps of a stream, and how event
lines are split (the end-to-end attacks are in tests/security/test_sec_sdk_memory.py)."""

from __future__ import annotations

import pytest

from sandlot.sdk import SandboxServiceError
from sandlot.sdk._output import OutputKeeper
from sandlot.sdk._sse import LineSplitter


@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])
@pytest.mark.parametrize("limit", range(0, 9))
def test_kept_text_ends_on_a_whole_character_and_the_counts_add_up(char: str, limit: int) -> None:
    data = (char * 5).encode()
    keeper = OutputKeeper(limit)
    for i in range(len(data)):  # byte by byte: the worst split
        keeper.add(data[i : i + 1])
    text, dropped = keeper.take()
    assert text == char * (min(limit, len(data)) // len(char.encode()))
    assert len(text.encode()) + dropped == len(data)


def test_a_keeper_under_its_limit_keeps_invalid_bytes_as_replacement() -> None:
    keeper = OutputKeeper(100)
    keeper.add(b"ok\xff")
    assert keeper.take() == ("ok\ufffd", 0)


def test_lines_split_across_reads_and_bounded() -> None:
    lines = LineSplitter(limit=10)
    assert lines.feed(b"event: o") == []
    assert lines.feed(b"\r\ndata: 1\n\nda") == ["event: o", "data: 1", ""]
    assert lines.feed(b"ta: 2\n") == ["data: 2"]
    with pytest.raises(SandboxServiceError, match="longer than 10 bytes"):
        lines.feed(b"x" * 11)
    with pytest.raises(SandboxServiceError, match="longer than 10 bytes"):
        LineSplitter(limit=10).feed(b"y" * 11 + b"\n")
