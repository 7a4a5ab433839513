"""Attacks on the SDK's memory (issue 12, item 5): output, files and pseudo-files of any size
from a sandbox must not grow the client without bound.

Found before: ``exec("yes | head -c 2G")`` grew the client to 6.4 GiB (``exec_stream`` kept
every chunk too); ``read_bytes``, ``download_file`` and ``sandlot cp`` loaded whole files; a
symlink to ``/proc/self/pagemap`` streamed until ``sandlot cp`` died with MemoryError.

Each memory attack runs the SDK in a fresh Python process (:data:`PROBE`): it warms the same
code paths up on small inputs, resets its peak RSS (``/proc/self/clear_refs``), runs the
attack, and reports its peak RSS above that idle level (``VmHWM``). The bounds are several
times what the fixed SDK uses and far below what the old one needed, so a busy machine does
not fail them. A real server (a thread of this process) and a real sandbox take part.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.server import RunningServer, start_server

from sandlot.paths import state_dir
from sandlot.sdk import (
    Sandbox,
    SandboxFileTooLargeError,
    SandboxRequestError,
    SandboxServiceError,
)
from sandlot.sdk._limits import (
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MAX_READ_BYTES,
    MAX_ANSWER_BYTES,
    MAX_EVENT_LINE,
)

pytestmark = pytest.mark.root

MiB = 1 << 20
IMAGES_DIR = Path(os.environ.get("SANDLOT_TEST_IMAGES_DIR") or state_dir() / "images")
#: Moved through each attack: a few times more than any bound below.
BIG = 192 * MiB


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    if os.geteuid() != 0:
        pytest.skip("the local engine needs root (CI runs as root)")
    if not (shutil.which("crun") or shutil.which("runc")):
        pytest.skip("needs crun or runc")
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore

    tmp = Path(tempfile.mkdtemp(prefix="sl-sdkmem-"))
    engine = LocalEngine(tmp / "state", images=ImageStore(IMAGES_DIR))
    srv = start_server(engine, f"sqlite:///{tmp / 'sandlot.db'}", unix_path=tmp / "s.sock")
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def sb(server: RunningServer) -> Iterator[Sandbox]:
    with Sandbox.create(api_url=server.url) as sandbox:
        # A big file, an endless one behind a symlink, and /dev/zero behind another.
        sandbox.exec(
            f"head -c {BIG} /dev/urandom > /root/big && ln -s /proc/self/pagemap /root/endless"
            " && ln -s /dev/zero /root/zero",
            raise_on_error=True,
            timeout=120,
        )
        yield sandbox


def _sha256_in(sb: Sandbox, path: str) -> str:
    return sb.exec(f"sha256sum {path}", raise_on_error=True, timeout=120).stdout.split()[0]


#: Run in a fresh interpreter: ``WARM`` then ``ATTACK`` (both Python, with ``sb`` the sandbox
#: and ``out`` a dict to report in), and print ``{"above_idle", "out"}`` as JSON.
PROBE = textwrap.dedent(
    """
    import json, os, resource, sys
    from sandlot.sdk import Sandbox

    # A regression must end in MemoryError here, not in the host's memory running out.
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    sb = Sandbox.get_from_id(os.environ["PROBE_SANDBOX"])
    out = {}
    exec(os.environ["PROBE_WARM"])
    idle = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    exec(os.environ["PROBE_ATTACK"])
    peak = status("VmHWM")
    sb.close()
    print(json.dumps({"above_idle": peak - idle, "out": out}))
    """
)
#: Every path the attacks take, on small inputs: their code and imports count as idle.
WARM = textwrap.dedent(
    """
    import tempfile
    from sandlot.cli.main import main as cli
    tmpdir = tempfile.mkdtemp()
    warm = tmpdir + "/warm"
    for step in (
        lambda: sb.exec("echo warm; echo warm >&2"),
        lambda: list(sb.exec_stream("echo warm")),
        lambda: sb.filesystem.read_bytes("/etc/hostname"),
        lambda: sb.filesystem.download_file(warm, "/etc/hostname"),
        lambda: sb.filesystem.upload_file(warm, "/root/warm"),
        lambda: sb.filesystem.write_file("/root/warm", open(warm, "rb")),
        lambda: sb.filesystem.read_bytes("/root/endless", max_bytes=1),
    ):
        try:
            step()
        except Exception:
            pass  # a step the SDK under test lacks (the same attacks run against old SDKs)
    """
)


def probe(server: RunningServer, sb: Sandbox, attack: str, timeout: float = 300) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(
        SANDLOT_URL=server.url,
        PROBE_SANDBOX=sb.id,
        PROBE_WARM=WARM,
        PROBE_ATTACK=textwrap.dedent(attack),
    )
    env.pop("SANDLOT_API_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return answer


# -- exec -----------------------------------------------------------------------------------------


def test_exec_keeps_a_bounded_output_and_reports_what_it_dropped(
    server: RunningServer, sb: Sandbox
) -> None:
    """192 MiB of stdout with an 8 MiB limit per handle: the result holds 8 MiB, says exactly
    how much it dropped, and the command ran to its end (its exit code and its last words on
    stderr arrive). The old SDK held all of it, three times over (~600 MiB)."""
    answer = probe(
        server,
        sb,
        f"""
        sb.max_output_bytes = {8 * MiB}
        r = sb.exec("yes | head -c {BIG}; echo finished >&2; exit 3", timeout=300)
        out.update(code=r.exit_code, n=len(r.stdout), head=r.stdout[:4], err=r.stderr,
                   dropped=r.stdout_dropped_bytes, err_dropped=r.stderr_dropped_bytes,
                   truncated=r.truncated)
        """,
    )
    out = answer["out"]
    assert out == {
        "code": 3,
        "n": 8 * MiB,
        "head": "y\ny\n",
        "err": "finished\n",
        "dropped": BIG - 8 * MiB,
        "err_dropped": 0,
        "truncated": True,
    }
    assert answer["above_idle"] < 96 * MiB, answer


def test_exec_stream_holds_nothing_it_delivered(server: RunningServer, sb: Sandbox) -> None:
    """192 MiB through ``exec_stream``: every byte is delivered, none is kept (the old stream
    kept every chunk for its result)."""
    answer = probe(
        server,
        sb,
        f"""
        from sandlot.sdk import StdoutEvent
        stream = sb.exec_stream("yes | head -c {BIG}", timeout=300)
        n = 0
        for event in stream:
            if isinstance(event, StdoutEvent):
                n += len(event.text)
        r = stream.result
        out.update(n=n, code=r.exit_code, kept=len(r.stdout), dropped=r.stdout_dropped_bytes)
        """,
    )
    assert answer["out"] == {"n": BIG, "code": 0, "kept": 0, "dropped": BIG}
    assert answer["above_idle"] < 64 * MiB, answer


def test_exec_truncation_is_exact_per_call_and_cuts_whole_characters(sb: Sandbox) -> None:
    r = sb.exec("printf 'ab'; printf 'ccc' >&2", max_output_bytes=1)
    assert (r.stdout, r.stdout_dropped_bytes, r.stderr, r.stderr_dropped_bytes) == ("a", 1, "c", 2)
    # 'é' is two bytes: a limit of 3 keeps one whole character, and the cut byte counts as dropped
    r = sb.exec("printf 'éééé'", max_output_bytes=3)
    assert (r.stdout, r.stdout_dropped_bytes, r.truncated) == ("é", 6, True)
    r = sb.exec("printf 'abc'", max_output_bytes=3)
    assert (r.stdout, r.stdout_dropped_bytes, r.truncated) == ("abc", 0, False)
    assert Sandbox.max_output_bytes == DEFAULT_MAX_OUTPUT_BYTES == 64 * MiB
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(SandboxRequestError, match="max_output_bytes"):
            sb.exec("true", max_output_bytes=bad)  # type: ignore[arg-type]


# -- reads and downloads --------------------------------------------------------------------------


def test_read_of_an_endless_file_stops_at_the_limit(server: RunningServer, sb: Sandbox) -> None:
    """A symlink to /proc/self/pagemap (256 GiB of zeros, announced as 0 bytes): read_bytes
    and read_file stop at the default limit with a clear error. The old SDK read until it
    died; the agent's own /read_file route stops at its body limit too."""
    answer = probe(
        server,
        sb,
        """
        from sandlot.sdk import SandboxFileTooLargeError
        for read in (sb.filesystem.read_bytes, sb.filesystem.read_file):
            try:
                read("/root/endless")
            except SandboxFileTooLargeError as exc:
                out.setdefault("errors", []).append([str(exc), exc.status_code, exc.limit])
        """,
        timeout=180,
    )
    errors = answer["out"]["errors"]
    assert len(errors) == 2
    for message, status, limit in errors:
        assert status == 413 and limit == DEFAULT_MAX_READ_BYTES
        assert "/root/endless" in message and "max_bytes" in message
    assert answer["above_idle"] < 160 * MiB, answer
    # The client's leaving reaches the agent through the server: it stops reading the file.
    agent_reads = "grep rchar /proc/$(cut -d' ' -f1 /proc/1/task/1/children)/io | cut -d' ' -f2"
    before = int(sb.exec(agent_reads, raise_on_error=True).stdout)
    deadline = time.monotonic() + 60
    while True:
        now = int(sb.exec(agent_reads, raise_on_error=True).stdout)
        if now - before < MiB:
            break
        assert time.monotonic() < deadline, f"the agent still reads: {before} -> {now} bytes"
        before = now


def test_read_limits_are_per_call_and_per_handle(sb: Sandbox) -> None:
    with pytest.raises(SandboxFileTooLargeError, match="max_bytes=4096"):
        sb.filesystem.read_bytes("/root/endless", max_bytes=4096)
    # a regular file announces its size: refused before a byte is read
    with pytest.raises(SandboxFileTooLargeError, match="max_bytes=1000"):
        sb.filesystem.read_bytes("/root/big", max_bytes=1000)
    assert sb.filesystem.read_bytes("/etc/hostname", max_bytes=1000)
    handle = Sandbox.get_from_id(sb.id, api_url=sb._conn.description)
    try:
        handle.max_read_bytes = 100
        with pytest.raises(SandboxFileTooLargeError, match="max_bytes=100"):
            handle.filesystem.read_file("/root/big")
        assert len(handle.filesystem.read_bytes("/root/big", max_bytes=BIG)) == BIG
    finally:
        handle.close()
    with pytest.raises(SandboxRequestError, match="max_bytes"):
        sb.filesystem.read_bytes("/etc/hostname", max_bytes=-1)
    # /dev/zero behind a symlink is not a file at all: a clear 400, at once
    with pytest.raises(SandboxRequestError, match="Not a regular file") as info:
        sb.filesystem.read_bytes("/root/zero")
    assert info.value.status_code == 400


def test_download_streams_to_disk(server: RunningServer, sb: Sandbox, tmp_path: Path) -> None:
    """192 MiB downloaded in a few MiB of memory (the old SDK held it whole, twice)."""
    dest = tmp_path / "big"
    answer = probe(server, sb, f'sb.filesystem.download_file("{dest}", "/root/big")')
    assert dest.stat().st_size == BIG
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == _sha256_in(sb, "/root/big")
    assert answer["above_idle"] < 48 * MiB, answer


def test_download_limits_leave_nothing_behind(sb: Sandbox, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.write_bytes(b"kept")
    with pytest.raises(SandboxFileTooLargeError, match="max_bytes=1024"):
        sb.filesystem.download_file(dest, "/root/big", max_bytes=1024)
    # an endless file has no announced size: it stops at the handle's read limit
    handle = Sandbox.get_from_id(sb.id, api_url=sb._conn.description)
    try:
        handle.max_read_bytes = 3 * MiB
        with pytest.raises(SandboxFileTooLargeError, match=f"max_bytes={3 * MiB}"):
            handle.filesystem.download_file(dest, "/root/endless")
    finally:
        handle.close()
    assert dest.read_bytes() == b"kept"  # the old file is untouched
    assert os.listdir(tmp_path) == ["out"]  # and no partial file is left
    sb.filesystem.download_file(dest, "/etc/hostname", max_bytes=1000)
    assert dest.read_bytes() == sb.filesystem.read_bytes("/etc/hostname")


# -- uploads --------------------------------------------------------------------------------------


def test_uploads_stream_from_disk(server: RunningServer, sb: Sandbox, tmp_path: Path) -> None:
    """``upload_file`` and ``write_file`` of an open file send 192 MiB in a few MiB of memory
    (write_file took only str or bytes: a big local file had to be read whole first)."""
    src = tmp_path / "src"
    with open(src, "wb") as f:
        for _ in range(BIG // MiB):
            f.write(os.urandom(MiB))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    answer = probe(
        server,
        sb,
        f"""
        sb.filesystem.upload_file("{src}", "/root/up1")
        with open("{src}", "rb") as f:
            f.seek(1)
            sb.filesystem.write_file("/root/up2", f)
        """,
    )
    assert _sha256_in(sb, "/root/up1") == digest
    assert sb.exec("stat -c %s /root/up2").stdout.strip() == str(BIG - 1)
    assert answer["above_idle"] < 48 * MiB, answer
    sb.exec("rm -f /root/up1 /root/up2")


# -- sandlot cp -----------------------------------------------------------------------------------


def test_cp_streams_both_ways(server: RunningServer, sb: Sandbox, tmp_path: Path) -> None:
    """``sandlot cp`` out of and into a sandbox in constant memory; from an endless file it
    stops with a clear message (it died with MemoryError) and leaves no file."""
    got, endless = tmp_path / "got", tmp_path / "endless"
    answer = probe(
        server,
        sb,
        f"""
        for args in (["cp", "{sb.id}:/root/big", "{got}"], ["cp", "{got}", "{sb.id}:/root/back"]):
            try:
                cli(args, standalone_mode=False)
            except SystemExit as exc:
                assert not exc.code, exc.code
        """,
    )
    assert got.stat().st_size == BIG
    assert _sha256_in(sb, "/root/back") == _sha256_in(sb, "/root/big")
    assert answer["above_idle"] < 48 * MiB, answer
    sb.exec("rm -f /root/back")
    env = {**os.environ, "SANDLOT_URL": server.url}
    proc = subprocess.run(
        [sys.executable, "-m", "sandlot.cli", "cp", f"{sb.id}:/root/endless", str(endless)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stderr
    assert "larger than max_bytes" in proc.stderr and "Traceback" not in proc.stderr
    assert not endless.exists()


# -- a hostile agent ------------------------------------------------------------------------------
#
# Code in a sandbox that takes its agent's place answers the SDK through the server. A real
# server on a Unix socket plays that part here, answering every sandbox call with an endless
# body: the SDK stops reading at its limits instead of growing without end.

ENDLESS = b"a" * 65536
SANDBOX_INFO = {
    "id": "evil",
    "name": "evil",
    "status": "running",
    "secret": "s",
    "image": "default",
    "instance_type": "micro",
    "region": "local",
    "created_at": "",
    "sandbox_url": "",
}


def _answer(conn: socket.socket) -> None:
    with conn, conn.makefile("rb") as reader:
        request_line = reader.readline().decode()
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        reader.read(length)
        route = request_line.split()[1].split("?")[0].rsplit("/", 1)[-1]
        if route == "evil":
            body = json.dumps(SANDBOX_INFO).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            return
        status, kind, start = {
            "run_streaming": (b"200 OK", b"text/event-stream", b"event: output\ndata: "),
            "files": (b"404 Not Found", b"application/json", b'{"error": "'),
        }.get(route, (b"200 OK", b"application/json", b'{"entries": ["'))
        with contextlib.suppress(OSError):
            conn.sendall(
                b"HTTP/1.1 %s\r\ncontent-type: %s\r\nconnection: close\r\n\r\n%s"
                % (status, kind, start)
            )
            while True:  # until the client hangs up
                conn.sendall(ENDLESS)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "evil.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            threading.Thread(target=_answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"unix:{path}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


def test_a_hostile_agent_cannot_send_endless_answers(hostile: str) -> None:
    """Endless JSON, error bodies and event lines end in clear errors at the SDK's limits
    (the old SDK read all of them until its memory ran out)."""
    sb = Sandbox.get_from_id("evil", api_url=hostile)
    try:
        with pytest.raises(SandboxServiceError, match=f"larger than {MAX_ANSWER_BYTES} bytes"):
            sb.filesystem.list_dir("/")
        with pytest.raises(SandboxServiceError, match=f"larger than {MAX_ANSWER_BYTES} bytes"):
            sb.filesystem.read_bytes("/x")  # a 404 whose message never ends
        with pytest.raises(SandboxServiceError, match=f"longer than {MAX_EVENT_LINE} bytes"):
            sb.exec("true")
        assert sb.is_healthy() is False
    finally:
        sb.close()


@pytest.mark.anyio
async def test_the_async_sdk_has_the_same_limits(sb: Sandbox, tmp_path: Path) -> None:
    from sandlot.sdk import AsyncSandbox

    handle = await AsyncSandbox.get_from_id(sb.id, api_url=sb._conn.description)
    try:
        r = await handle.exec("printf abcdef; exit 2", max_output_bytes=2)
        assert (r.stdout, r.stdout_dropped_bytes, r.exit_code) == ("ab", 4, 2)
        with pytest.raises(SandboxFileTooLargeError):
            await handle.filesystem.read_bytes("/root/endless", max_bytes=MiB)
        dest = tmp_path / "big"
        with pytest.raises(SandboxFileTooLargeError):
            await handle.filesystem.download_file(dest, "/root/big", max_bytes=MiB)
        assert not os.listdir(tmp_path)
        await handle.filesystem.download_file(dest, "/root/big")
        assert dest.stat().st_size == BIG
        with open(dest, "rb") as f:
            await handle.filesystem.write_file("/root/back", f)
        # (async calls only: a sync call here would block the event loop under the handle)
        sums = await handle.exec("sha256sum /root/back /root/big; rm -f /root/back", timeout=120)
        back, big = (line.split()[0] for line in sums.stdout.splitlines())
        assert back == big
    finally:
        await handle.close()
