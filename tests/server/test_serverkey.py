"""The server key: sealing, derivation, its file, and the database's memory of it."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from sandlot.server.control.serverkey import ServerKey, ServerKeyError
from sandlot.server.control.store import Store


def test_seal_opens_only_with_its_key_and_column(tmp_path: Path) -> None:
    key = ServerKey(b"k" * 32)
    sealed = key.seal("hunter2", "registry_secrets.password")
    assert "hunter2" not in sealed and sealed.startswith("v1:")
    assert key.seal("hunter2", "registry_secrets.password") != sealed  # fresh nonce each time
    assert key.open(sealed, "registry_secrets.password") == "hunter2"
    with pytest.raises(ServerKeyError):
        key.open(sealed, "sandboxes.secret")  # moved to another column: refused
    with pytest.raises(ServerKeyError):
        ServerKey(b"x" * 32).open(sealed, "registry_secrets.password")
    with pytest.raises(ServerKeyError):
        key.open(sealed[:-4] + "AAAA", "registry_secrets.password")  # tampered
    assert not key.is_sealed("hunter2", "registry_secrets.password")


def test_derived_secrets_are_stable_distinct_and_hex() -> None:
    key = ServerKey(b"k" * 32)
    one = key.derive("sandbox-secret", "abc")
    assert one == key.derive("sandbox-secret", "abc")
    assert one != key.derive("sandbox-secret", "abd")
    assert one != ServerKey(b"j" * 32).derive("sandbox-secret", "abc")
    assert len(one) == 64 and int(one, 16) >= 0  # hex: never the API tokens' "sl_" prefix


def test_key_file_is_made_0600_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "server.key"
    first = ServerKey.load(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ServerKey.load(path, create=True).fingerprint == first.fingerprint
    os.chmod(path, 0o644)  # restored from a backup too loosely
    ServerKey.load(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("encode", [bytes, base64.b64encode, lambda b: b.hex().encode() + b"\n"])
def test_key_file_formats(tmp_path: Path, encode: object) -> None:
    raw = os.urandom(32)
    path = tmp_path / "key"
    path.write_bytes(encode(raw))  # type: ignore[operator]
    assert ServerKey.load(path, create=False).fingerprint == ServerKey(raw).fingerprint


def test_named_key_file_must_exist_and_be_a_key(tmp_path: Path) -> None:
    with pytest.raises(ServerKeyError, match="not found"):
        ServerKey.load(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "short").write_text("c2hvcnQ=\n")
    with pytest.raises(ServerKeyError, match="32 bytes"):
        ServerKey.load(tmp_path / "short", create=False)


def test_database_refuses_another_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sandlot.db'}"
    Store(url).close()  # makes tmp_path/server.key and records its fingerprint
    other = tmp_path / "other.key"
    other.write_bytes(base64.b64encode(os.urandom(32)))
    with pytest.raises(ServerKeyError, match="another server key"):
        Store(url, other)
    Store(url, tmp_path / "server.key").close()  # the right key, named explicitly
