"""Bringing a database made by an older sandlot up to date, at every start: new columns added
(all nullable or defaulted), the server key checked against the one that sealed the database,
and what older versions stored in clear sealed (then the tables rewritten)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from sqlalchemy import inspect, select, text, update
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from sandlot.server.control.serverkey import ServerKey, ServerKeyError
from sandlot.server.control.tables import (
    PORT_TOKEN_COLUMN,
    REGISTRY_PASSWORD_COLUMN,
    SANDBOX_SECRET_COLUMN,
    SEALED_ENV_KEY,
    ApiToken,
    Base,
    RegistrySecret,
    SandboxRow,
    ServerMeta,
)

log = logging.getLogger("sandlot.server")


def upgrade(
    engine: SAEngine,
    session: Callable[[], Session],
    key: ServerKey,
    seal_env: Callable[[Mapping[str, str]], dict[str, str]],
) -> None:
    add_missing_columns(engine)
    check_key(session, key)
    migrate_secrets(engine, session, key, seal_env)


def add_missing_columns(engine: SAEngine) -> None:
    """Bring a database made by an older sandlot up to date: new columns are all nullable
    or defaulted, so adding them is the whole migration."""
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:
                    kind = column.type.compile(dialect=engine.dialect)
                    conn.execute(
                        text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
                    )
        # Tokens made before scopes existed keep what they could do: normal.
        conn.execute(update(ApiToken).where(ApiToken.scope.is_(None)).values(scope="normal"))


def check_key(session: Callable[[], Session], key: ServerKey) -> None:
    """The database remembers which key sealed it; another key is refused, not used."""
    name = "server_key_fingerprint"
    with session() as s, s.begin():
        row = s.get(ServerMeta, name, with_for_update=True)
        if row is None:
            s.add(ServerMeta(name=name, value=key.fingerprint))
        elif row.value != key.fingerprint:
            raise ServerKeyError(
                "this database's secrets were sealed with another server key: give this "
                "server the same key file as the others (--key-file)"
            )


def migrate_secrets(
    engine: SAEngine,
    session: Callable[[], Session],
    key: ServerKey,
    seal_env: Callable[[Mapping[str, str]], dict[str, str]],
) -> None:
    """Seal what an older sandlot stored in clear: agent secrets and port tokens (their
    holders keep them, so they cannot become derived), registry passwords and sandboxes'
    environments. Then rewrite the tables so the clear values do not linger in freed space,
    the WAL or (PostgreSQL) dead row versions."""
    sealed = 0
    with session() as s, s.begin():
        for table, key_column, column, name in (
            (SandboxRow, SandboxRow.id, SandboxRow.secret_sealed, SANDBOX_SECRET_COLUMN),
            (
                RegistrySecret,
                RegistrySecret.id,
                RegistrySecret.password_sealed,
                REGISTRY_PASSWORD_COLUMN,
            ),
        ):
            rows = s.execute(select(key_column, column).where(column != "")).all()
            for row_id, value in rows:
                if key.is_sealed(value, name):
                    continue
                s.execute(
                    update(table)
                    .where(key_column == row_id, column == value)
                    .values({column: key.seal(value, name)})
                )
                sealed += 1
        sealed += _seal_port_tokens(s, key)
        sealed += _seal_envs(s, seal_env)
    if not sealed:
        return
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("VACUUM")
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            elif engine.dialect.name == "postgresql":
                conn.exec_driver_sql("VACUUM FULL sandboxes, registry_secrets")
    except DBAPIError as exc:  # e.g. not the tables' owner: sealed anyway, said loudly
        log.warning("sealed %d secrets; rewriting the tables failed: %s", sealed, exc)


def _seal_port_tokens(s: Session, key: ServerKey) -> int:
    """Port tokens an older sandlot stored in clear in ``exposed_ports``."""
    sealed = 0
    query = select(SandboxRow.id, SandboxRow.exposed_ports)
    for sandbox_id, ports in s.execute(query.where(SandboxRow.exposed_ports.is_not(None))):
        if not isinstance(ports, dict):
            continue  # JSON null
        clear = {p for p, v in ports.items() if isinstance(v, dict) and v.get("token")}
        if not clear:
            continue
        new = {p: dict(v) for p, v in ports.items()}
        for p in clear:
            token = new[p].pop("token")
            new[p]["token_sealed"] = key.seal(token, PORT_TOKEN_COLUMN)
        s.execute(update(SandboxRow).where(SandboxRow.id == sandbox_id).values(exposed_ports=new))
        sealed += len(clear)
    return sealed


def _seal_envs(s: Session, seal_env: Callable[[Mapping[str, str]], dict[str, str]]) -> int:
    """Environments an older sandlot stored in clear."""
    sealed = 0
    for sandbox_id, env in s.execute(select(SandboxRow.id, SandboxRow.env)):
        if isinstance(env, dict) and env and SEALED_ENV_KEY not in env:
            row = update(SandboxRow).where(SandboxRow.id == sandbox_id)
            s.execute(row.values(env=seal_env(env)))
            sealed += 1
    return sealed
