"""A server answer the SDK cannot read is a SandboxServiceError with what was asked, never a
KeyError or TypeError from inside the SDK (found for fork's and list's ``sandboxes``)."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandlot import AsyncSandbox, SandboxServiceError
from sandlot.sdk._connection import Connection, resolve_connection


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sock() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sl-bad-"))
    yield d / "s.sock"
    shutil.rmtree(d, ignore_errors=True)


async def _answering(path: Path, body: object) -> asyncio.Server:
    """A server that answers every request 200 with ``body`` as JSON."""
    data = json.dumps(body).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(data), data)
                )
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, str(path))


MALFORMED = {
    "not-a-list": {"sandboxes": "x"},
    "no-key": {"items": []},
    "not-an-object": [1, 2],
    "item-without-id": {"sandboxes": [{"name": "x"}]},
    "item-not-an-object": {"sandboxes": ["sb-1"]},
}


@pytest.mark.anyio
@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
async def test_list_of_a_malformed_answer(sock: Path, body: object) -> None:
    async with await _answering(sock, body):
        with pytest.raises(SandboxServiceError, match="list sandboxes: the server's answer"):
            await AsyncSandbox.list(api_url=f"unix:{sock}")


@pytest.mark.anyio
@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
async def test_fork_of_a_malformed_answer(sock: Path, body: object) -> None:
    async with await _answering(sock, body):
        handle = AsyncSandbox({"id": "sb-1", "secret": "s"}, _connection(sock))
        with pytest.raises(SandboxServiceError, match="fork sandbox sb-1: the server's answer"):
            await handle.fork(2)


def _connection(sock: Path) -> Connection:
    return resolve_connection(f"unix:{sock}", None)
