"""The server key: the one secret from which every other secret at rest is derived or sealed.

A copy of the database (a backup, a stolen disk, a ``pg_dump`` shared for debugging) must not
hand out a sandbox's agent secret or a registry password. So nothing recoverable is stored in
clear:

- secrets that are ours to choose (each sandbox's agent secret) are *derived*: an HMAC-SHA256 of
  the sandbox id under a key derived from the server key, recomputed when needed and never
  stored;
- secrets we are given and must send on (registry credentials, a user-chosen secret) are
  *sealed* with AES-256-GCM (a random 96-bit nonce per value; the column's name as associated
  data, so a sealed value moved to another column does not open) and stored as
  ``v1:<base64url(nonce || ciphertext || tag)>``.

The key is 32 random bytes in a 0600 file: by default ``server.key`` beside a SQLite database
(in the state directory), created at first start. Replicas sharing one PostgreSQL database must
share one key: point each at the same file (``--key-file`` or ``SANDLOT_SERVER_KEY_FILE``, e.g.
a mounted Kubernetes Secret). The database remembers a fingerprint of its key, and a server
with another key refuses to start rather than hand out wrong secrets or seal twice.

Primitives come from ``cryptography`` (AESGCM, HKDF): nothing here is hand-rolled crypto.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_FILE_ENV = "SANDLOT_SERVER_KEY_FILE"
KEY_FILE_NAME = "server.key"
KEY_BYTES = 32
SEALED_PREFIX = "v1:"
_NONCE_BYTES = 12


class ServerKeyError(Exception):
    """The key file is missing, unreadable, malformed or not the database's key."""


class ServerKey:
    """Seals, opens and derives secrets with one 256-bit key (subkeys by HKDF, one per use)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ServerKeyError(f"a server key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(_subkey(key, b"sandlot seal v1"))
        self._derive = _subkey(key, b"sandlot derive v1")
        #: Identifies the key without revealing it (stored in the database to catch a mix-up).
        self.fingerprint = _subkey(key, b"sandlot fingerprint v1").hex()[:32]

    # -- sealing --

    def seal(self, value: str, column: str) -> str:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        box = self._aead.encrypt(nonce, value.encode(), column.encode())
        return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + box).decode()

    def open(self, sealed: str, column: str) -> str:
        """The value ``seal(value, column)`` sealed; ServerKeyError if it is not one."""
        if not sealed.startswith(SEALED_PREFIX):
            raise ServerKeyError(f"{column}: not a sealed value")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(SEALED_PREFIX) :])
            plain = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], column.encode())
        except (ValueError, InvalidTag):
            raise ServerKeyError(f"{column}: sealed with another key, or damaged") from None
        return plain.decode()

    def is_sealed(self, value: str, column: str) -> bool:
        try:
            self.open(value, column)
        except ServerKeyError:
            return False
        return True

    # -- derivation --

    def derive(self, purpose: str, subject: str) -> str:
        """A 256-bit secret for ``subject``, as 64 hex digits (hex never starts with the API
        tokens' ``sl_`` prefix, which the gateway uses to refuse forwarding a token)."""
        message = f"{purpose}\0{subject}".encode()
        return hmac.new(self._derive, message, hashlib.sha256).hexdigest()

    # -- the key file --

    @classmethod
    def load(cls, path: Path, create: bool) -> ServerKey:
        """The key in ``path`` (raw 32 bytes, or their base64/hex text as a Kubernetes Secret
        holds it). With ``create``, a missing file is made: 0600, written once, never
        replaced."""
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                pass  # another process made it first: read theirs
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW if create else os.O_RDONLY)
        except FileNotFoundError:
            raise ServerKeyError(
                f"server key file {path.name!r} not found (--key-file / {KEY_FILE_ENV})"
            ) from None
        except OSError as exc:
            raise ServerKeyError(f"server key file {path.name!r}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if create and os.fstat(f.fileno()).st_mode & 0o077:
                os.fchmod(f.fileno(), 0o600)  # ours: tighten a copy restored too loosely
            data = f.read(4096)
        return cls(_parse_key(data, path.name))


def _parse_key(data: bytes, name: str) -> bytes:
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    for decode in (base64.b64decode, base64.urlsafe_b64decode, bytes.fromhex):
        try:
            key = decode(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            continue
        if len(key) == KEY_BYTES:
            return bytes(key)
    raise ServerKeyError(
        f"server key file {name!r} must hold {KEY_BYTES} bytes (raw, base64 or hex); "
        f"make one with: head -c {KEY_BYTES} /dev/urandom | base64"
    )


def _subkey(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)
