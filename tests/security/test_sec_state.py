"""State at rest: someone who reads the server's files (a backup, a stolen disk, a local user on
a host where the state directory was 0755) must not find a usable secret there.

Before: ``sandlot.db`` and its WAL were 0644 in a 0755 directory, and held every sandbox's agent
secret and every registry password in clear. Now the state directory is 0700, the database
files 0600, agent secrets are derived from a server key and registry passwords sealed with it
(``server/serverkey.py``); an older installation is tightened and sealed on start, and its
running sandboxes keep working.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.agent_engine import AgentProcessEngine
from support.server import start_server

from sandlot.sdk import Sandbox
from sandlot.server.control.store import Store, hash_token

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"

#: The tables as sandlot wrote them before scopes and sealing (column types per dialect).
OLD_SCHEMA = """
CREATE TABLE api_tokens (
    id VARCHAR(32) NOT NULL PRIMARY KEY, project VARCHAR(128) NOT NULL,
    name VARCHAR(128) NOT NULL, token_hash VARCHAR(64) NOT NULL UNIQUE,
    created_at {ts} NOT NULL, revoked_at {ts});
CREATE TABLE sandboxes (
    id VARCHAR(64) NOT NULL PRIMARY KEY, project VARCHAR(128) NOT NULL,
    name VARCHAR(128) NOT NULL, status VARCHAR(32) NOT NULL, image TEXT NOT NULL,
    instance_type VARCHAR(32) NOT NULL, region VARCHAR(64) NOT NULL, labels JSON NOT NULL,
    env JSON NOT NULL, secret VARCHAR(128) NOT NULL, privileged BOOLEAN NOT NULL,
    exposed_port_protocol VARCHAR(16) NOT NULL, enable_tcp_proxy BOOLEAN NOT NULL,
    exposed_ports JSON, protect_ports BOOLEAN, registry_secret VARCHAR(256),
    idle_timeout INTEGER NOT NULL, delete_after_delay INTEGER,
    delete_after_inactivity_delay INTEGER, light_sleep BOOLEAN NOT NULL,
    last_activity_at {ts}, slept_at {ts}, sleep_kind VARCHAR(16), network VARCHAR(16),
    outbound_allowlist JSON, agent_unix_path TEXT, agent_host VARCHAR(256), agent_port INTEGER,
    error TEXT NOT NULL, created_at {ts} NOT NULL, updated_at {ts} NOT NULL, deleted_at {ts});
CREATE TABLE registry_secrets (
    id INTEGER NOT NULL PRIMARY KEY, project VARCHAR(128) NOT NULL, name VARCHAR(64) NOT NULL,
    host VARCHAR(255) NOT NULL, username VARCHAR(255) NOT NULL, password TEXT NOT NULL,
    created_at {ts} NOT NULL, UNIQUE (project, name));
"""


OLD_PORT_TOKEN = "portTokenChosenAtRandom_0123456789"
OLD_ENV = '{"OPENAI_API_KEY": "sk-oldEnvValueInClear0123"}'


def old_rows(secret: str, password: str, token: str, agent_socket: str) -> list[str]:
    now = "'2026-01-01 00:00:00'"
    ports = json.dumps({"8000": {"since": "2026-01-01T00:00:00", "token": OLD_PORT_TOKEN}})
    return [
        f"INSERT INTO api_tokens VALUES ('tok_old', 'alpha', 'ci', '{hash_token(token)}', "
        f"{now}, NULL)",
        "INSERT INTO sandboxes (id, project, name, status, image, instance_type, region, labels,"
        " env, secret, privileged, exposed_port_protocol, enable_tcp_proxy, idle_timeout,"
        " light_sleep, network, agent_unix_path, error, created_at, updated_at, exposed_ports,"
        " protect_ports) VALUES"
        f" ('0ld5andb0x0000000000cafe', 'default', 'old', 'running', 'default', 'micro', 'local',"
        f" '{{}}', '{OLD_ENV}', '{secret}', false, 'http', false, 0, false, 'none',"
        f" '{agent_socket}',"
        f" '', {now}, {now}, '{ports}', true)",
        "INSERT INTO registry_secrets VALUES (1, 'default', 'hub', 'docker.io', 'me', "
        f"'{password}', {now})",
    ]


def make_old_sqlite(db: Path, statements: list[str]) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(OLD_SCHEMA.format(ts="DATETIME"))
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    os.chmod(db, 0o644)  # as sandlot (and the umask) left it


def file_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def agent_process(directory: Path, secret: str) -> Iterator[Path]:
    """An agent that already holds ``secret``: a sandbox made by an older sandlot."""
    sock = directory / "agent.sock"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SANDBOX_SECRET": secret}
    env |= {"PYTHONPATH": str(SRC), "HOME": str(directory)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandlot.agent", "--listen", f"unix:{sock}"],
        env=env,
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "agent did not start"
            time.sleep(0.01)
        yield sock
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def sandlot_server(state: Path, sock: Path) -> Iterator[httpx.Client]:
    """``sandlot server`` as users start it (a process, the state directory from the
    environment), with the test engine (agents as plain processes)."""
    agents = state.parent / "agents"
    env = {**os.environ, "SANDLOT_STATE_DIR": str(state), "SANDLOT_TEST_AGENTS": str(agents)}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(SRC)])
    env.pop("SANDLOT_DATABASE_URL", None)
    env.pop("SANDLOT_SERVER_KEY_FILE", None)
    argv = [sys.executable, "-m", "sandlot.cli", "server", "--listen", f"unix:{sock}"]
    argv += ["--engine", "support.agent_engine:from_env", "--log-level", "warning"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://sandlot", timeout=60
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stdout.read()!r}")  # type: ignore[union-attr]
            with contextlib.suppress(httpx.TransportError):
                if client.get("/v1/health").status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield client
    finally:
        with contextlib.suppress(httpx.TransportError):
            for sb in client.get("/v1/sandboxes").json().get("sandboxes", []):
                client.delete(f"/v1/sandboxes/{sb['id']}")
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sl-st-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- a new installation -------------------------------------------------------------------------


def test_new_install_keeps_its_files_private(short_dir: Path) -> None:
    state = short_dir / "state"
    password = "pw-" + secrets.token_hex(16)
    with sandlot_server(state, short_dir / "s.sock") as c:
        r = c.post("/v1/sandboxes", json={"name": "a"})
        assert r.status_code == 201, r.text
        secret = r.json()["secret"]
        body = {"name": "hub", "registry": "docker.io", "username": "me", "password": password}
        assert c.post("/v1/secrets", json=body).status_code == 201
        db = state / "sandlot.db"
        assert mode(state) == 0o700
        for path in [db, Path(f"{db}-wal"), Path(f"{db}-shm"), state / "server.key"]:
            assert mode(path) == 0o600, path
        # Neither the agent secret nor the password is anywhere in the database's files.
        raw = file_bytes(db)
        assert secret.encode() not in raw and password.encode() not in raw
        assert b"docker.io" in raw  # (the files were read: the registry itself is there)


def test_no_secret_of_a_sandbox_is_stored_in_clear(database_url: str, short_dir: Path) -> None:
    engine = AgentProcessEngine(short_dir / "agents")
    srv = start_server(engine, database_url, unix_path=short_dir / "run" / "s.sock")
    try:
        with srv.client() as c:
            env = {"OPENAI_API_KEY": "sk-" + secrets.token_hex(16)}
            sb = c.post("/v1/sandboxes", json={"protect_ports": True, "env": env}).json()
            assert sb["env"] == env == c.get(f"/v1/sandboxes/{sb['id']}").json()["env"]
            port = c.post(f"/v1/sandboxes/{sb['id']}/ports", json={"port": 8000}).json()
            assert port["token"]
            store = srv.app.state.control.store
            row = store.get_sandbox(sb["id"])
            assert row.secret_sealed == ""  # nothing stored: recomputed from the server key
            assert store.sandbox_secret(row) == sb["secret"] == engine.specs[sb["id"]].secret
            with store.engine.connect() as conn:
                dump = repr(conn.exec_driver_sql("SELECT * FROM sandboxes").all())
            assert sb["secret"] not in dump and port["token"] not in dump
            assert env["OPENAI_API_KEY"] not in dump
            # The derived port token is the one the gateway checks.
            url = f"/sandboxes/{sb['id']}/ports/8000/"
            assert c.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
            answer = c.get(url, headers={"authorization": f"Bearer {port['token']}"})
            assert answer.status_code == 502  # past the check: nothing listens on 8000
            listed = c.get(f"/v1/sandboxes/{sb['id']}/ports").json()["ports"]
            assert [p["token"] for p in listed] == [port["token"]]
            c.delete(f"/v1/sandboxes/{sb['id']}")
    finally:
        srv.stop()


# -- an installation made by an older sandlot ---------------------------------------------------


def test_old_install_is_tightened_and_sealed_and_keeps_working(short_dir: Path) -> None:
    state = short_dir / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    secret, password, token = secrets.token_urlsafe(32), "pw-" + secrets.token_hex(16), "sl_x"
    db = state / "sandlot.db"
    with agent_process(short_dir, secret) as agent:
        make_old_sqlite(db, old_rows(secret, password, token, str(agent)))
        assert secret.encode() in file_bytes(db)  # the attack worked on the old layout
        sock = short_dir / "s.sock"
        with sandlot_server(state, sock) as c:
            assert mode(state) == 0o700
            for path in [db, Path(f"{db}-wal"), Path(f"{db}-shm")]:
                assert mode(path) == 0o600, path
            raw = file_bytes(db)
            assert secret.encode() not in raw and password.encode() not in raw
            # Existing tokens became normal ones.
            tokens = c.get("/v1/tokens").json()["tokens"]
            assert [(t["id"], t["scope"]) for t in tokens] == [("tok_old", "normal")]
            # The old sandbox keeps its secret (its agent holds it) and keeps working.
            sb = Sandbox.get_from_id("0ld5andb0x0000000000cafe", api_url=f"unix:{sock}")
            try:
                assert sb.secret == secret
                assert sb.exec("echo still here").stdout.strip() == "still here"
            finally:
                sb.close()
            c.delete("/v1/sandboxes/0ld5andb0x0000000000cafe")


def test_old_database_migrates_on_both_backends(database_url: str, short_dir: Path) -> None:
    secret, password, token = secrets.token_urlsafe(32), "pw-" + secrets.token_hex(16), "sl_y"
    from sqlalchemy import create_engine

    url = database_url.replace("postgresql://", "postgresql+psycopg://")
    ts = "DATETIME" if url.startswith("sqlite") else "TIMESTAMP WITH TIME ZONE"
    old = create_engine(url)
    with old.begin() as conn:
        for statement in OLD_SCHEMA.format(ts=ts).split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
        for statement in old_rows(secret, password, token, "/nowhere"):
            conn.exec_driver_sql(statement)
    old.dispose()
    store = Store(database_url, None)
    try:
        with store.engine.connect() as conn:
            dump = repr(conn.exec_driver_sql("SELECT * FROM sandboxes").all())
            dump += repr(conn.exec_driver_sql("SELECT * FROM registry_secrets").all())
        assert secret not in dump and password not in dump and OLD_PORT_TOKEN not in dump
        row = store.get_sandbox("0ld5andb0x0000000000cafe")
        assert store.sandbox_secret(row) == secret
        assert store.port_token(row.id, 8000, row.exposed_ports["8000"]) == OLD_PORT_TOKEN
        assert "sk-oldEnvValueInClear0123" not in dump
        assert store.sandbox_env(row) == json.loads(OLD_ENV)
        found = store.get_registry_secret("default", "hub")
        assert store.registry_password(found) == password
        assert store.token_row(token).scope == "normal"
    finally:
        store.close()
    Store(database_url, None).close()  # a second start changes nothing and still opens them


def test_named_key_file_missing_or_wrong_is_a_clear_start_error(short_dir: Path) -> None:
    """Replicas name a shared key file; a missing one, or one that is not the key the database
    was sealed with, stops the server with a message (never a new key, never a double seal)."""
    state = short_dir / "state"
    env = {**os.environ, "SANDLOT_STATE_DIR": str(state), "SANDLOT_TEST_AGENTS": str(short_dir)}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(SRC)])
    argv = [sys.executable, "-m", "sandlot.cli", "server", "--listen", f"unix:{short_dir}/s"]
    argv += ["--engine", "support.agent_engine:from_env"]
    missing = subprocess.run(
        [*argv, "--key-file", str(short_dir / "nope.key")], env=env, capture_output=True, timeout=60
    )
    assert missing.returncode != 0
    assert b"server key file 'nope.key' not found" in missing.stderr
    assert b"Traceback" not in missing.stderr
    Store(f"sqlite:///{state / 'sandlot.db'}").close()  # sealed with state/server.key
    other = short_dir / "other.key"
    other.write_text(base64.b64encode(os.urandom(32)).decode())
    argv += ["--key-file", str(other)]
    wrong = subprocess.run(argv, env=env, capture_output=True, timeout=60)
    assert wrong.returncode != 0 and b"sealed with another server key" in wrong.stderr
