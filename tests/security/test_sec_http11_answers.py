"""Hostile HTTP/1.1 answers, sent to both users of the shared client wire
(``sandlot.http11client``): the server's hop to an agent (``AgentPool``) and the async SDK's
hop to the local server (``AsyncUnixTransport``). An agent is inside its sandbox and the SDK
reads what the server relays from agents, so each answer here is one a root process in a
sandbox can send.

On the old SDK transport (its own parser) a negative chunk size made it read the rest of the
connection into one buffer (``read(-1)`` reads to the end: unbounded memory), a non-ASCII digit
in ``Content-Length`` escaped as a bare ``ValueError`` instead of a protocol error, and a bare
CR in a header value was passed on; the gateway's parser already refused them. Now one parser
refuses them on both hops.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandlot.engines.base import AgentAddress
from sandlot.sdk._uds import AsyncUnixTransport
from sandlot.server.upstream import AgentPool, UpstreamError


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sock() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sl-h11-"))
    yield d / "s.sock"
    shutil.rmtree(d, ignore_errors=True)


HOSTILE = {
    "negative-chunk": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-1\r\n" + b"x" * 4096,
    "huge-chunk-size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"1" * 16
    + b"\r\nabc",
    "spaced-chunk-size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1 2\r\nabc",
    "hex-prefix-chunk": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0x10\r\n",
    "unicode-length": "HTTP/1.1 200 OK\r\ncontent-length: ٣\r\n\r\nabc".encode(),
    "signed-length": b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\nabc",
    "two-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
    "cr-in-value": b"HTTP/1.1 200 OK\r\nx-a: 1\rset-cookie: owned\r\ncontent-length: 0\r\n\r\n",
    "bad-name": b"HTTP/1.1 200 OK\r\nx a: 1\r\ncontent-length: 0\r\n\r\n",
    "folded": b"HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\ncontent-length: 0\r\n\r\n",
    "status-word": b"HTTP/1.1 OK 200\r\ncontent-length: 0\r\n\r\n",
    "status-range": b"HTTP/1.1 999 No\r\ncontent-length: 0\r\n\r\n",
    "not-http": b"SSH-2.0-OpenSSH\r\n\r\n",
    "huge-head": b"HTTP/1.1 200 OK\r\nx-a: " + b"a" * 70000 + b"\r\n\r\n",
    "bad-chunk-end": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n",
}
HOSTILE["endless-trailers"] = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n"
    + b"".join(b"x-t%d: %s\r\n" % (i, b"t" * 1000) for i in range(100))
    + b"\r\n"
)


#: A guard against a client that hangs (the old SDK transport, reading a chunk of size -1 to
#: the connection's end): generous, it never fires when the client behaves.
HANG = 30.0


async def _serving(path: Path, answer: bytes) -> asyncio.Server:
    """Answer ``answer`` and keep the connection open until the client closes it: a client
    that reads "to the end" on a hostile answer would wait (and buffer) forever."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            while await reader.read(65536):
                pass
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, str(path))


@pytest.mark.anyio
@pytest.mark.parametrize("answer", HOSTILE.values(), ids=HOSTILE.keys())
async def test_the_sdk_transport_refuses(sock: Path, answer: bytes) -> None:
    async with await _serving(sock, answer):
        transport = AsyncUnixTransport(str(sock))
        async with httpx.AsyncClient(transport=transport, base_url="http://sandlot") as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await asyncio.wait_for(client.get("/v1/health"), HANG)


async def _read_whole(pool: AgentPool) -> bytes:
    response = await pool.request("GET", "/health", [], b"")
    try:
        return await response.read(1 << 20)
    finally:
        response.close()


@pytest.mark.anyio
@pytest.mark.parametrize("answer", HOSTILE.values(), ids=HOSTILE.keys())
async def test_the_gateway_refuses(sock: Path, answer: bytes) -> None:
    pool = AgentPool(AgentAddress(unix_path=str(sock)), b"s")
    try:
        async with await _serving(sock, answer):
            with pytest.raises(UpstreamError):
                await asyncio.wait_for(_read_whole(pool), HANG)
    finally:
        pool.close()


@pytest.mark.anyio
async def test_good_answers_still_pass_on_both_hops(sock: Path) -> None:
    """Chunked with an extension and trailers, and a plain length: read whole on both."""
    answers = [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabcde",
    ]
    for answer in answers:
        async with await _serving(sock, answer):
            transport = AsyncUnixTransport(str(sock))
            async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
                assert (await client.get("/")).content == b"abcde"
            pool = AgentPool(AgentAddress(unix_path=str(sock)), b"s")
            assert await _read_whole(pool) == b"abcde"
            pool.close()
