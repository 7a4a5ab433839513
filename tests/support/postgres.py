"""A throw-away PostgreSQL cluster for tests: initdb + pg_ctl in a temporary directory, as an
unprivileged user (PostgreSQL refuses to run as root), listening on a Unix socket only.

Needs Debian's ``postgresql`` package (``/usr/lib/postgresql/*/bin``)."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

APT_PACKAGE = "postgresql"


def find_bin_dir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _as_user(cmd: list[str]) -> tuple[list[str], int | None]:
    if os.geteuid() != 0:
        return cmd, None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return (
            ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *cmd],
            pw.pw_uid,
        )
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a cluster; yield its SQLAlchemy URL; stop and remove it."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError(f"PostgreSQL binaries not found (apt-get install {APT_PACKAGE})")
    tmp = Path(tempfile.mkdtemp(prefix="sandlot-pg-"))
    data, sock = tmp / "data", tmp / "sock"
    sock.mkdir()
    _, uid = _as_user([])
    if uid is not None:
        for p in (tmp, sock):
            os.chown(p, uid, -1)
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}

    def run(args: list[str]) -> None:
        cmd, _ = _as_user(args)
        subprocess.run(
            cmd, check=True, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    try:
        run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        opts = f"-c listen_addresses='' -c unix_socket_directories={sock} -c fsync=off"
        run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                opts,
                "-l",
                str(tmp / "log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        try:
            yield f"postgresql+psycopg://postgres@/postgres?host={sock}"
        finally:
            run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_database_counter = itertools.count()


def fresh_database(cluster_url: str) -> str:
    """A new, empty database in the cluster ``postgres_cluster()`` yielded; its URL."""
    import psycopg

    name = f"t{os.getpid()}_{next(_database_counter)}"
    host = cluster_url.split("host=", 1)[1]
    with psycopg.connect(f"host={host} user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return cluster_url.replace("/postgres?", f"/{name}?")
