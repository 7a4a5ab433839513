"""Local trust: what another user of the host, or a second server, can do to sandlot.

The attacker is a real process running as ``nobody`` (uid 65534); the victim is the SDK in this
process, as root. With ``XDG_RUNTIME_DIR`` unset the SDK's socket lives in
``$TMPDIR/sandlot-$UID`` -- a name anyone can create first. Here ``$TMPDIR`` is a fresh
world-writable sticky directory (like ``/tmp``), so this machine's real ``/tmp/sandlot-0`` is
never touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandlot import Sandbox, SandboxError

NOBODY = 65534

#: The attacker: stdlib only, run by the system python as ``nobody``. It creates the runtime
#: directory (optionally with ``autostart.lock`` a symlink to a victim's file), listens on a Unix
#: socket, records every byte it receives, and answers every request with ``health``
#: (``"pid": "self"`` becomes its own pid).
ATTACKER = r"""
import json, os, socket, sys
directory, sock_name, health, lock_target = sys.argv[1:5]
os.makedirs(directory, exist_ok=True)
os.chmod(directory, 0o755)
if lock_target:
    os.symlink(lock_target, os.path.join(directory, "autostart.lock"))
data = json.loads(health)
if data.get("pid") == "self":
    data["pid"] = os.getpid()
body = json.dumps(data).encode()
path = os.path.join(directory, sock_name)
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
os.chmod(path, 0o777)
srv.listen(16)
log = open(os.path.join(directory, "received"), "ab", buffering=0)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += chunk
    head, _, rest = got.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    log.write(got[: len(head) + 4] + rest)
    if got:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body
        )
    conn.close()
"""


class Attacker:
    def __init__(self, directory: Path, proc: subprocess.Popen[str]) -> None:
        self.directory = directory
        self.proc = proc

    @property
    def received(self) -> bytes:
        try:
            return (self.directory / "received").read_bytes()
        except FileNotFoundError:
            return b""


@pytest.fixture
def tmpdir_base(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A fresh ``/tmp`` stand-in (1777, root's) as the SDK's temporary directory, with no
    XDG_RUNTIME_DIR and no SANDLOT_URL. The state dir is a file: should a server be started
    anyway (the old code did), it exits at once instead of running sandboxes."""
    if os.geteuid() != 0:
        pytest.skip("the attacker runs as another uid: needs root")
    base = Path(tempfile.mkdtemp(prefix="sl-lt-", dir="/tmp"))
    base.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    monkeypatch.setenv("TMPDIR", str(base))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("SANDLOT_URL", raising=False)
    monkeypatch.delenv("SANDLOT_API_TOKEN", raising=False)
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("SANDLOT_STATE_DIR", str(tmp_path / "not-a-dir"))
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


def start_attacker(
    directory: Path, health: dict[str, object], lock_target: Path | None = None
) -> Attacker:
    proc = subprocess.Popen(
        [
            "/usr/bin/python3",
            "-I",
            "-c",
            ATTACKER,
            str(directory),
            "sandlot.sock",
            json.dumps(health),
            str(lock_target or ""),
        ],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", "the attacker did not start"
    return Attacker(directory, proc)


@pytest.fixture
def attackers() -> Iterator[list[Attacker]]:
    started: list[Attacker] = []
    yield started
    for a in started:
        a.proc.kill()
        a.proc.wait()


def create_error(**kwargs: object) -> SandboxError | None:
    """``Sandbox.create(**kwargs)``'s error (None if it succeeded: the attacker's answer was
    taken for a server's), so that each test checks the harm first, then the message."""
    try:
        Sandbox.create(**kwargs).close()  # type: ignore[arg-type]
    except SandboxError as exc:
        return exc
    return None


def _outdated_health(pid: object) -> dict[str, object]:
    """What makes the SDK restart a server: this installation, another build."""
    from sandlot._build import PACKAGE_DIR

    return {"status": "ok", "build": "an-older-build", "package": str(PACKAGE_DIR), "pid": pid}


@pytest.mark.root
def test_symlinked_autostart_lock_truncates_nothing(
    tmpdir_base: Path, tmp_path: Path, attackers: list[Attacker]
) -> None:
    """``autostart.lock`` planted as a symlink to root's file: opening it used to truncate the
    file (``open(..., "w")`` as root). Now the directory is refused before anything in it is
    opened."""
    precious = tmp_path / "precious"
    precious.write_text("root's data\n")
    runtime = tmpdir_base / "sandlot-0"
    attackers.append(start_attacker(runtime, {"status": "ok"}, lock_target=precious))
    error = create_error()
    assert precious.read_text() == "root's data\n"
    assert "belongs to uid 65534" in str(error)


@pytest.mark.root
def test_fake_health_cannot_make_root_kill_a_pid(
    tmpdir_base: Path, attackers: list[Attacker]
) -> None:
    """A fake server whose ``/v1/health`` names an outdated build of this installation and
    another process's pid: root used to SIGTERM that pid."""
    victim = subprocess.Popen(["sleep", "300"])
    try:
        runtime = tmpdir_base / "sandlot-0"
        attackers.append(start_attacker(runtime, _outdated_health(victim.pid)))
        error = create_error()
        assert victim.poll() is None, "root signalled a pid named by another user's server"
        assert "belongs to uid 65534" in str(error)
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.root
def test_fake_default_socket_receives_nothing(tmpdir_base: Path, attackers: list[Attacker]) -> None:
    """A fake server on the default socket used to receive root's create request, with the
    sandbox's env secrets in it. Now not one byte is sent; the error says what to do."""
    runtime = tmpdir_base / "sandlot-0"
    attacker = start_attacker(runtime, {"status": "ok"})
    attackers.append(attacker)
    error = create_error(env={"API_KEY": "s3cret-value"})
    assert attacker.received == b""
    assert "belongs to uid 65534" in str(error) and "XDG_RUNTIME_DIR" in str(error)


@pytest.mark.root
def test_socket_of_another_uid_gets_nothing(tmpdir_base: Path, attackers: list[Attacker]) -> None:
    """A Unix socket given explicitly (``unix:PATH``) but served by another user: the server's
    identity is checked through the socket's peer credentials before anything is sent."""
    attacker = start_attacker(tmpdir_base / "shared", {"status": "ok"})
    attackers.append(attacker)
    sock = tmpdir_base / "shared" / "sandlot.sock"
    error = create_error(api_url=f"unix:{sock}", env={"API_KEY": "s3cret-value"})
    assert attacker.received == b""
    assert "runs as uid 65534" in str(error)
    with pytest.raises(SandboxError, match="runs as uid 65534"):
        Sandbox.list(api_url=f"unix:{sock}")
    assert attacker.received == b""


@pytest.mark.root
@pytest.mark.anyio
async def test_async_sdk_checks_the_peer_too(tmpdir_base: Path, attackers: list[Attacker]) -> None:
    from sandlot import AsyncSandbox

    attacker = start_attacker(tmpdir_base / "shared", {"status": "ok"})
    attackers.append(attacker)
    sock = tmpdir_base / "shared" / "sandlot.sock"
    with pytest.raises(SandboxError, match="runs as uid 65534"):
        await AsyncSandbox.create(api_url=f"unix:{sock}", env={"API_KEY": "s3cret-value"})
    assert attacker.received == b"", attacker.received


@pytest.mark.root
def test_runtime_dir_with_loose_mode_is_refused(tmpdir_base: Path) -> None:
    """Ours but 0755 (someone chmod'ed it, or made it with a loose umask): refused, with the
    fix in the message; the SDK never loosens or tightens it behind the user's back."""
    runtime = tmpdir_base / "sandlot-0"
    runtime.mkdir(mode=0o755)
    runtime.chmod(0o755)
    with pytest.raises(SandboxError, match="chmod 700"):
        Sandbox.create()
    assert not (runtime / "autostart.lock").exists()


@pytest.mark.root
def test_runtime_dir_that_is_a_symlink_is_refused(tmpdir_base: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmpdir_base / "sandlot-0").symlink_to(target)
    with pytest.raises(SandboxError, match="not a directory"):
        Sandbox.create()
    assert list(target.iterdir()) == []


_SELF_SERVER = r"""
import json, os, socket, sys
path, health = sys.argv[1:3]
data = json.loads(health)
if data.get("pid") == "self":
    data["pid"] = os.getpid()
body = json.dumps(data).encode()
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(16)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    if conn.recv(65536):
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    conn.close()
"""


def _same_uid_server(path: Path, health: dict[str, object]) -> subprocess.Popen[str]:
    """A server of our own uid answering ``health`` (started as ``python -c ... server``)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SELF_SERVER, str(path), json.dumps(health), "server"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_health_naming_another_pid_is_not_signalled(tmp_path: Path) -> None:
    """Even a server of our own uid is only signalled when the pid it names is the process
    behind the socket (its SO_PEERCRED pid): a health answer naming another pid is ignored."""
    from sandlot.sdk._autostart import _stop_if_outdated

    victim = subprocess.Popen(["sleep", "300"])
    server = _same_uid_server(tmp_path / "s.sock", _outdated_health(victim.pid))
    try:
        _stop_if_outdated(str(tmp_path / "s.sock"))
        assert victim.poll() is None
        assert server.poll() is None
    finally:
        for p in (victim, server):
            p.kill()
            p.wait()


def test_outdated_server_behind_the_socket_is_stopped(tmp_path: Path) -> None:
    """The legitimate case still works: the process behind the socket names itself."""
    from sandlot.sdk._autostart import _stop_if_outdated

    server = _same_uid_server(tmp_path / "s.sock", _outdated_health("self"))
    try:
        _stop_if_outdated(str(tmp_path / "s.sock"))
        assert server.wait(10) == -signal.SIGTERM
    finally:
        server.kill()
        server.wait()


# -- two servers on one host ----------------------------------------------------------------------

TESTS = Path(__file__).resolve().parents[1]


class ServerProc:
    """``sandlot server`` in its own process over the test agent engine, with its own state
    dir and runtime dir (``XDG_RUNTIME_DIR``) under ``root``."""

    def __init__(self, root: Path, listen: str, state: Path | None = None) -> None:
        self.root = root
        self.state = state or root / "state"
        self.env = {
            **os.environ,
            "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "SANDLOT_TEST_AGENTS": str(root / "agents"),
            "SANDLOT_STATE_DIR": str(self.state),
            "XDG_RUNTIME_DIR": str(root / "xdg"),
        }
        for name in ("SANDLOT_URL", "SANDLOT_API_TOKEN"):
            self.env.pop(name, None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sandlot.cli",
                "server",
                "--engine",
                "support.agent_engine:from_env",
                "--database",
                f"sqlite:///{root / 'db'}",
                "--log-level",
                "warning",
                "--listen",
                listen,
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def admin_socket(self) -> Path:
        from sandlot.paths import default_server_socket

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("XDG_RUNTIME_DIR", self.env["XDG_RUNTIME_DIR"])
            return default_server_socket(self.state)

    def wait_up(self, probe: object) -> None:
        while not probe():  # type: ignore[operator]
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stdout.read() if self.proc.stdout else "died")
            import time

            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def _server_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "sandlot.cli server" in cmd and marker in cmd:
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def short_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="sl-lt2-", dir="/tmp"))
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=False)


def _tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_server_serves_admin_commands_on_its_socket(short_root: Path) -> None:
    """``sandlot server --listen tcp:...`` then ``sandlot token create`` (as the README says):
    the CLI used to autostart a second server on the Unix socket, over the same database and
    state. Now the TCP server answers on its state dir's socket, and no second server starts."""
    import httpx

    port = _tcp_port()
    server = ServerProc(short_root, f"tcp:127.0.0.1:{port}")
    runtime = str(short_root / "xdg")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as tcp:

            def up() -> bool:
                try:
                    return tcp.get("/v1/health").status_code == 200
                except httpx.TransportError:
                    return False

            server.wait_up(up)
            created = subprocess.run(
                [sys.executable, "-m", "sandlot.cli", "token", "create", "--project", "p"],
                env=server.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert _server_pids(runtime) == [], "the CLI started a second server"
            assert created.returncode == 0, created.stderr
            admin = server.admin_socket()
            # HTTP/2 with prior knowledge on the admin socket is the owner too (h2serve)
            h2 = httpx.HTTPTransport(uds=str(admin), http1=False, http2=True)
            with httpx.Client(transport=h2, base_url="http://sandlot") as owner:
                made = owner.post("/v1/tokens", json={"project": "q"})
                assert made.status_code == 201 and made.http_version == "HTTP/2"
            token = created.stdout.strip()
            # the token is the TCP server's: it works there
            ok = tcp.get("/v1/sandboxes", headers={"authorization": f"Bearer {token}"})
            assert ok.status_code == 200
            # TCP clients are still not the socket's owner
            assert tcp.post("/v1/tokens", json={"project": "p"}).status_code == 401
            assert tcp.get("/v1/health").json().get("pid") is None
            assert stat_mode(admin) == 0o600
    finally:
        server.stop()
        for pid in _server_pids(runtime):
            os.kill(pid, signal.SIGTERM)
    assert not server.admin_socket().exists()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_second_server_on_one_state_dir_is_refused(short_root: Path) -> None:
    """Two servers on one state dir would both run lifecycle timers and recovery over the same
    sandboxes: the second is refused, naming the first's pid."""
    import httpx

    port = _tcp_port()
    first = ServerProc(short_root, f"tcp:127.0.0.1:{port}")
    second: ServerProc | None = None
    try:

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v1/health").status_code == 200
            except httpx.TransportError:
                return False

        first.wait_up(up)
        second = ServerProc(short_root, f"unix:{short_root / 'other.sock'}", state=first.state)
        try:
            out, _ = second.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("a second server started on the same state dir")
        assert second.proc.returncode == 1, out
        assert f"another sandlot server (pid {first.proc.pid}) is already running" in out
        assert "Traceback" not in out
        assert first.proc.poll() is None
    finally:
        if second is not None:
            second.stop()
        first.stop()


# -- two local engines on one host ----------------------------------------------------------------


def _host_uid_base(pid: int) -> int:
    """The host uid that root inside the sandbox whose init is ``pid`` maps to."""
    first = Path(f"/proc/{pid}/uid_map").read_text().split()
    return int(first[1])


@pytest.fixture
def two_engine_states() -> Iterator[tuple[Path, Path]]:
    from support.local import local_engine_unavailable

    from sandlot.engines.local.mounts import mounts_under, unmount

    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    roots = (
        Path(tempfile.mkdtemp(prefix="sl-ea-", dir="/tmp")),
        Path(tempfile.mkdtemp(prefix="sl-eb-", dir="/tmp")),
    )
    yield roots
    for root in roots:
        for point in mounts_under(root):
            unmount(point)
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.mark.root
@pytest.mark.anyio
async def test_two_engines_get_disjoint_uid_ranges_and_recover_only_their_own(
    two_engine_states: tuple[Path, Path],
) -> None:
    """Two servers on one host (different state dirs): their sandboxes used to get the same
    host uid range (slots counted per state dir, from 1000000), and one server's start-up
    recovery deleted the other's cgroups (here: the empty cgroup of a sandbox being created)."""
    from support.local import IMAGES_DIR

    from sandlot.engines.base import SandboxSpec, SandboxState
    from sandlot.engines.local import LocalEngine, cgroups, new_sandbox_id
    from sandlot.images.store import ImageStore
    from sandlot.instance_types import get_instance_type

    engines = [LocalEngine(root, images=ImageStore(IMAGES_DIR)) for root in two_engine_states]
    made: list[tuple[LocalEngine, str]] = []
    half_made: list[Path] = []
    try:
        pids = []
        for eng in engines:
            spec = SandboxSpec(
                id=new_sandbox_id(),
                image="busybox",
                instance_type=get_instance_type("nano"),
                secret="s-" + new_sandbox_id(),
            )
            info = await eng.create(spec)
            made.append((eng, spec.id))
            assert info.pid is not None
            pids.append(info.pid)
        bases = [_host_uid_base(pid) for pid in pids]
        assert abs(bases[0] - bases[1]) >= 65536, f"overlapping uid ranges: {bases}"

        # Engine A is creating a sandbox: its directory and (still empty) cgroup exist.
        a, b = engines
        creating = new_sandbox_id()
        (a.sandboxes_dir / creating).mkdir(mode=0o700)
        (a.sandboxes_dir / creating / "meta.json").write_text(json.dumps({"ready": False}))
        half_made = cgroups.sandbox_cgroup_dirs(a.layout, creating)
        for d in half_made:
            d.mkdir(parents=True)

        assert await b.recover() == []
        assert all(d.is_dir() for d in half_made), "B's recovery removed A's cgroup"
        for eng, sandbox_id in made:
            assert (await eng.inspect(sandbox_id)).state is SandboxState.RUNNING
            assert all(d.is_dir() for d in cgroups.sandbox_cgroup_dirs(eng.layout, sandbox_id))

        # A's own recovery does remove its half-made sandbox, cgroup included.
        assert await a.recover() == [creating]
        assert not any(d.exists() for d in half_made)
        assert (await a.inspect(made[0][1])).state is SandboxState.RUNNING
    finally:
        for eng, sandbox_id in made:
            await eng.delete(sandbox_id)
        cgroups.remove_cgroup_dirs(half_made)
    # deleted sandboxes give their ranges back
    for eng in engines:
        assert eng.slots.owned() == {}


@pytest.mark.anyio
async def test_admin_is_told_by_the_accepting_socket_not_by_the_client(tmp_path: Path) -> None:
    """On a TCP server with an admin socket, only a connection accepted on that socket is the
    socket's owner. A client cannot choose the ASGI ``server`` address; one that merely looks
    like a Unix socket's (``(name, None)``) but is not the admin socket's path stays a token
    client."""
    import httpx
    from support.agent_engine import AgentProcessEngine

    from sandlot.server.api.app import create_app
    from sandlot.server.config import ServerConfig

    config = ServerConfig(
        database_url=f"sqlite:///{tmp_path / 'db'}",
        engines={"local": AgentProcessEngine(tmp_path / "agents")},
        default_region="local",
        auth="token",
        admin_socket=str(tmp_path / "admin.sock"),
    )
    app = create_app(config)
    # httpx's ASGI transport reports the server as ("testserver", None)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        r = await client.post("/v1/tokens", json={"project": "p"})
        assert r.status_code == 401
        assert (await client.get("/v1/health")).json().get("pid") is None
