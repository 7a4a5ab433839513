"""The server's own calls to agents (``server/agentcalls.py``): answers bounded in size and time,
their shapes validated. The attacks themselves are in ``tests/security/test_sec_gateway_agent.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandlot.engines.base import AgentAddress
from sandlot.server.control import agentcalls
from sandlot.server.control.agentcalls import AgentAnswerError, AgentReply, BoundPorts
from sandlot.server.upstream import AgentPool, BodyTooLarge


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _serving(path: Path, answer: bytes, hold: float = 0.0) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(hold)
        writer.close()

    return await asyncio.start_unix_server(handle, str(path))


@pytest.fixture
async def agent_at(short_dir: Path) -> AsyncIterator[tuple[Path, AgentPool]]:
    sock = short_dir / "a.sock"
    pool = AgentPool(AgentAddress(unix_path=str(sock)), b"s")
    yield sock, pool
    pool.close()


@pytest.mark.anyio
async def test_a_good_answer(agent_at: tuple[Path, AgentPool]) -> None:
    sock, pool = agent_at
    body = b'{"ports": [8080, "8081"]}'
    server = await _serving(
        sock, b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    )
    async with server:
        status, answer = await agentcalls.call(pool, "GET", "/bound_ports")
    assert status == 200
    assert agentcalls.validate(BoundPorts, answer, "/bound_ports").ports == [8080, 8081]


@pytest.mark.anyio
async def test_an_answer_over_the_limit(agent_at: tuple[Path, AgentPool]) -> None:
    sock, pool = agent_at
    big = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b" " * 100000
    async with await _serving(sock, big):
        with pytest.raises(BodyTooLarge):
            await agentcalls.call(pool, "GET", "/bound_ports", limit=1000)


@pytest.mark.anyio
async def test_a_slow_answer(agent_at: tuple[Path, AgentPool]) -> None:
    sock, pool = agent_at
    async with await _serving(sock, b"HTTP/1.1 200 OK\r\n", hold=30):
        with pytest.raises(AgentAnswerError, match="within"):
            await agentcalls.call(pool, "GET", "/bound_ports", timeout=0.3)


@pytest.mark.parametrize(
    "answer",
    [[1], {"ports": "8080"}, {"ports": [0]}, {"ports": [70000]}, {"ports": [{}]}, "x", None],
)
def test_bound_ports_shapes(answer: object) -> None:
    with pytest.raises(AgentAnswerError, match="malformed"):
        agentcalls.validate(BoundPorts, answer, "/bound_ports")


def test_replies() -> None:
    reply = agentcalls.validate(AgentReply, {"error": "x" * 1000, "current_port": "80"}, "/r")
    assert len(reply.message(500)) < 310 and reply.current_port == "80"
    assert agentcalls.validate(AgentReply, {}, "/r").message(418) == "HTTP 418"
    for bad in ({"error": 5}, {"current_port": "eighty"}, []):
        with pytest.raises(AgentAnswerError):
            agentcalls.validate(AgentReply, bad, "/r")
