"""Relay processes (sandlot.server.gateway.relay): real processes copying between real sockets on
loopback and socketpairs; no sandbox needed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator

import pytest

from sandlot.server.gateway.relay import RelayError, Relays, Spliced


@pytest.fixture
async def relays() -> AsyncIterator[Relays]:
    r = Relays()
    yield r
    await r.close()


async def _relayed(relays: Relays, count: int) -> None:
    """Wait until the relays hold ``count`` connections (a busy machine starts one slowly)."""
    deadline = time.monotonic() + 30
    while relays.open_connections != count:
        assert time.monotonic() < deadline, f"{relays.open_connections} relayed, not {count}"
        await asyncio.sleep(0.01)


def _pairs() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """(client, client's far end handed to the relay, sandbox's far end, sandbox)."""
    client, client_far = socket.socketpair()
    sandbox_far, sandbox = socket.socketpair()
    return client, client_far, sandbox_far, sandbox


def _read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    return bytes(out)


@pytest.mark.anyio
async def test_both_ways_half_closes_and_counts(relays: Relays) -> None:
    client, client_far, sandbox_far, sandbox = _pairs()
    sandbox.sendall(b"banner")  # the server speaks first: kept for the client
    spliced = asyncio.ensure_future(relays.splice(client_far, sandbox_far))
    payload = os.urandom(20 << 20)

    def sandbox_side() -> bytes:
        got = _read_all(sandbox)  # until the client's half-close arrives
        sandbox.sendall(b"|" + str(len(got)).encode())
        sandbox.shutdown(socket.SHUT_WR)
        return got

    def client_side() -> bytes:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return _read_all(client)

    got_sandbox, got_client = await asyncio.gather(
        asyncio.to_thread(sandbox_side), asyncio.to_thread(client_side)
    )
    assert got_sandbox == payload
    assert got_client == b"banner|" + str(len(payload)).encode()
    result = await asyncio.wait_for(spliced, 10)
    assert result == Spliced(len(payload), len(got_client))
    assert client_far.fileno() == -1 and sandbox_far.fileno() == -1  # ours were closed
    assert relays.open_connections == 0


@pytest.mark.anyio
async def test_backpressure_holds_memory_flat(relays: Relays) -> None:
    """A sandbox that does not read: the relay stops reading the client instead of buffering."""
    client, client_far, sandbox_far, sandbox = _pairs()
    spliced = asyncio.ensure_future(relays.splice(client_far, sandbox_far))
    client.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sent += client.send(b"x" * 65536)
        except BlockingIOError:
            await asyncio.sleep(0.2)
            try:
                sent += client.send(b"x" * 65536)
            except BlockingIOError:
                break  # the relay stopped reading: pressure reached the client
    assert time.monotonic() < deadline, "the relay kept reading a client nobody drains"
    assert sent < 64 << 20
    client.close()
    sandbox.close()
    await asyncio.wait_for(spliced, 10)


@pytest.mark.anyio
async def test_cancelling_closes_the_pair(relays: Relays) -> None:
    client, client_far, sandbox_far, sandbox = _pairs()
    spliced = asyncio.ensure_future(relays.splice(client_far, sandbox_far))
    await _relayed(relays, 1)
    spliced.cancel()
    client.settimeout(10)
    sandbox.settimeout(10)
    assert await asyncio.to_thread(client.recv, 10) == b""
    assert await asyncio.to_thread(sandbox.recv, 10) == b""


@pytest.mark.anyio
async def test_a_dead_relay_ends_its_connections_and_a_new_one_starts(relays: Relays) -> None:
    client, client_far, sandbox_far, _sandbox = _pairs()
    spliced = asyncio.ensure_future(relays.splice(client_far, sandbox_far))
    await _relayed(relays, 1)
    (worker,) = relays._workers
    os.kill(worker.process.pid, signal.SIGKILL)
    with pytest.raises(RelayError, match="ended"):
        await asyncio.wait_for(spliced, 10)
    client.settimeout(10)
    assert await asyncio.to_thread(client.recv, 10) == b""
    # the next connection gets a new relay
    c2, c2_far, s2_far, s2 = _pairs()
    again = asyncio.ensure_future(relays.splice(c2_far, s2_far))
    c2.sendall(b"ping")
    s2.settimeout(10)
    assert await asyncio.to_thread(s2.recv, 10) == b"ping"
    assert relays.processes == 1 and relays._workers[0] is not worker
    c2.close()
    s2.close()
    await asyncio.wait_for(again, 10)


_SCRIPT = textwrap.dedent(
    """
    import asyncio, socket, sys
    from sandlot.server.gateway.relay import Relays

    async def main():
        relays = Relays(connections_per_worker=10)
        kept, tasks = [], []
        for _ in range(int(sys.argv[1])):
            a, a_far = socket.socketpair()
            b_far, b = socket.socketpair()
            kept += [a, b]
            tasks.append(asyncio.ensure_future(relays.splice(a_far, b_far)))
            await asyncio.sleep(0)
        for i in range(0, len(kept), 2):
            kept[i].sendall(b"%d" % i)
            got = await asyncio.to_thread(kept[i + 1].recv, 10)  # the loop runs the splices
            assert got == b"%d" % i, got
        print(relays.processes, " ".join(str(w.process.pid) for w in relays._workers),
              flush=True)
        if sys.argv[2] == "die":
            import os
            os._exit(9)  # no cleanup at all, as under SIGKILL
        await relays.close()

    asyncio.run(main())
    """
)


def test_a_full_relay_makes_the_next_one_start() -> None:
    """Ten connections per relay: 25 need three."""
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "25", "close"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "3"


def test_relays_end_with_a_killed_server() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "3", "die"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 9, out.stderr
    pids = [int(p) for p in out.stdout.split()[1:]]
    assert pids
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "relay outlived its server"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.anyio
async def test_close_tagged_ends_only_those(relays: Relays) -> None:
    kept = []
    waits = []
    for tag in ("a", "a", "b"):
        client, client_far, sandbox_far, sandbox = _pairs()
        kept.append((client, sandbox))
        waits.append(asyncio.ensure_future(relays.splice(client_far, sandbox_far, ("sb", tag))))
    kept[0][0].sendall(b"x")  # the pairs are in the relay once data flows
    kept[0][1].settimeout(10)
    assert await asyncio.to_thread(kept[0][1].recv, 1) == b"x"
    await _relayed(relays, 3)
    assert relays.close_tagged(("sb", "a")) == 2
    await asyncio.wait_for(asyncio.gather(waits[0], waits[1]), 10)
    for client, _ in kept[:2]:
        client.settimeout(10)
        assert await asyncio.to_thread(client.recv, 10) == b""
    assert not waits[2].done() and relays.close_tagged(("sb", "zzz")) == 0
    kept[2][0].sendall(b"still")
    kept[2][1].settimeout(10)
    assert await asyncio.to_thread(kept[2][1].recv, 10) == b"still"
    for client, sandbox in kept:
        client.close()
        sandbox.close()
    await asyncio.wait_for(waits[2], 10)


def test_a_relay_exits_when_its_server_goes_mid_attach() -> None:
    """The control socket closing while pairs are still being attached: the relay still exits
    (an orphan relay would hold its connections for ever)."""
    from sandlot.server.gateway.relay import WORKER
    from sandlot.server.gateway.relay_worker import ADD, ID

    for _ in range(5):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = subprocess.Popen(
            [sys.executable, "-P", str(WORKER), str(theirs.fileno()), "0"],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        assert ours.recv(64)[:1] == b"H"  # started
        kept = []
        for n in range(50):
            a, a_far = socket.socketpair()
            b_far, b = socket.socketpair()
            a.sendall(b"x" * 1000)  # data waiting on both sides as they are attached
            b.sendall(b"y" * 1000)
            socket.send_fds(ours, [ADD + ID.pack(n)], [a_far.fileno(), b_far.fileno()])
            a_far.close()
            b_far.close()
            kept += [a, b]
        ours.close()  # the server is gone
        try:
            assert proc.wait(10) == 0
        finally:
            proc.kill()
            for s in kept:
                s.close()


def test_a_relay_whose_server_is_gone_exits_even_without_eof() -> None:
    """Something else keeps the control socket open (no EOF), but the server that started the
    relay is gone: the relay notices it was re-parented and exits."""
    from sandlot.server.gateway.relay import WORKER

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    starter = (
        "import subprocess, sys\n"
        "import os\n"
        f"p = subprocess.Popen([sys.executable, '-P', {str(WORKER)!r}, '{theirs.fileno()}', '0',"
        " str(os.getpid())],"
        f" pass_fds=[{theirs.fileno()}], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", starter],
        pass_fds=[theirs.fileno()],
        capture_output=True,
        text=True,
        timeout=30,
    )
    theirs.close()
    relay = int(out.stdout.split()[0])
    try:
        assert ours.recv(64)[:1] == b"H"
        deadline = time.monotonic() + 15
        while _alive(relay):  # `ours` stays open here: only the parent check can end it
            assert time.monotonic() < deadline, "an orphaned relay kept running"
            time.sleep(0.1)
    finally:
        ours.close()
        if _alive(relay):
            os.kill(relay, signal.SIGKILL)
