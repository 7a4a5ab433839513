"""A guard both HTTP/2 ends of the gateway put in front of ``h2``: frame sizes checked as soon as
a frame's header arrives.

``h2`` checks a frame's length against the negotiated maximum only once the whole frame has been
received, so a peer announcing a 16 MiB frame (the 24-bit maximum) would have up to 16 MiB
buffered per connection before being refused. The guard follows the byte stream's frame
boundaries itself (nine-byte headers, a length in the first three bytes) and refuses at the
header.
"""

from __future__ import annotations


class FrameSizeGuard:
    """Feed it every byte the peer sends, in order; :meth:`fits` answers False at the first
    frame header announcing more than the limit the caller gives."""

    __slots__ = ("_partial", "_skip")

    def __init__(self, skip: int = 0) -> None:
        #: Bytes before the next frame header (the client's 24-byte preface, then frame bodies).
        self._skip = skip
        #: The first bytes of a frame header split across reads.
        self._partial = b""

    def fits(self, data: bytes, limit: int) -> bool:
        i, n = 0, len(data)
        while True:
            step = min(self._skip, n - i)
            self._skip -= step
            i += step
            if self._skip:
                return True
            need = 9 - len(self._partial)
            if n - i < need:
                self._partial += data[i:]
                return True
            header = self._partial + data[i : i + need]
            i += need
            self._partial = b""
            self._skip = int.from_bytes(header[:3], "big")
            if self._skip > limit:
                return False
