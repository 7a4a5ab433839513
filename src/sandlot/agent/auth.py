"""Bearer-secret authentication, including Koyeb's pool mode.

Normal mode: the secret comes from ``SANDBOX_SECRET`` or the file named by
``SANDBOX_SECRET_FILE``. Pool mode (``SANDBOX_AUTH_MODE=pool``): the sandbox starts unclaimed
and the first request carrying a bearer token claims it -- that token becomes the secret, and
is persisted to ``SANDBOX_SECRET_PATH`` (if set) so that a restarted agent keeps it.
Comparison is constant-time.
"""

from __future__ import annotations

import os
import threading

# compare_digest is this very function; importing hmac would load OpenSSL's _hashlib.
from _operator import _compare_digest as compare_digest
from collections.abc import Mapping


class ConfigError(Exception):
    pass


def _read_secret_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror or exc}") from None


class Authenticator:
    def __init__(self, secret: bytes | None, *, pool: bool, persist_path: str | None) -> None:
        self._secret = secret or None
        self.pool = pool
        self._persist_path = persist_path
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Authenticator:
        pool = env.get("SANDBOX_AUTH_MODE", "").lower() == "pool"
        persist = env.get("SANDBOX_SECRET_PATH") or None
        secret: bytes | None = None
        if env.get("SANDBOX_SECRET"):
            secret = env["SANDBOX_SECRET"].encode()
        elif env.get("SANDBOX_SECRET_FILE"):
            secret = _read_secret_file(env["SANDBOX_SECRET_FILE"])
            if not secret:
                raise ConfigError(f"secret file {env['SANDBOX_SECRET_FILE']} is empty")
        if pool:
            if secret is not None:
                raise ConfigError("SANDBOX_SECRET(_FILE) cannot be set when SANDBOX_AUTH_MODE=pool")
            # A claimed sandbox keeps its owner across agent restarts.
            if persist and os.path.exists(persist):
                secret = _read_secret_file(persist)
                if not secret:
                    raise ConfigError(f"persisted secret {persist} is empty")
        elif secret is None:
            raise ConfigError(
                "no secret: set SANDBOX_SECRET or SANDBOX_SECRET_FILE (or SANDBOX_AUTH_MODE=pool)"
            )
        return cls(secret, pool=pool, persist_path=persist)

    @property
    def claimed(self) -> bool:
        return self._secret is not None

    def check(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        presented = token.encode()
        secret = self._secret
        if secret is None:
            return self._claim(presented)
        return compare_digest(presented, secret)

    def _claim(self, token: bytes) -> bool:
        with self._lock:
            if self._secret is None:
                if self._persist_path:
                    _persist(self._persist_path, token)
                self._secret = token
                return True
        return compare_digest(token, self._secret)


def _persist(path: str, token: bytes) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, 0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, token)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
