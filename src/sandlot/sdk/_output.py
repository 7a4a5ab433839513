"""What ``exec`` keeps of a command's output: the first bytes of each stream, the rest
counted (a command printing 2 GiB once grew the client to 6.4 GiB)."""

from __future__ import annotations


class OutputKeeper:
    """The first ``limit`` bytes of one output stream, and a count of the rest.

    What was kept grows to ``limit`` and no further whatever the command prints; the text is
    cut at a UTF-8 character boundary so it never ends in half a character, and the bytes cut
    are counted as dropped, so ``len(kept) + dropped`` is exactly what the command wrote."""

    __slots__ = ("_buf", "dropped", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self._buf = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.limit - len(self._buf)
        if len(data) <= room:
            self._buf += data
            return
        if room > 0:
            self._buf += data[:room]
        self.dropped += len(data) - max(0, room)

    def take(self) -> tuple[str, int]:
        """``(text, dropped)``; the keeper is empty afterwards."""
        buf, self._buf = self._buf, bytearray()
        dropped = self.dropped
        if dropped:
            cut = _utf8_incomplete_tail(buf)
            if cut:
                del buf[len(buf) - cut :]
                dropped += cut
        return buf.decode("utf-8", "replace"), dropped


def _utf8_incomplete_tail(buf: bytearray) -> int:
    """How many bytes at the end of ``buf`` start a UTF-8 character they do not finish."""
    for back in range(1, min(4, len(buf)) + 1):
        byte = buf[-back]
        if byte < 0x80:
            return 0
        if byte >= 0xC0:  # a lead byte: how long is its character?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if need > back else 0
    return 0
