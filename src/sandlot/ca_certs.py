"""Extra CA certificates for sandboxes: the operator's opt-in, never the host's own store.

Why: where outbound traffic goes through a TLS-inspecting proxy (or to an internal package
index), sandboxes must trust a CA that Debian's bundle lacks, or ``pip install`` finds "no
versions". The host's own trust store is never copied into sandboxes: a host may trust CAs
for its own reasons that its tenants' code has no business sharing. The operator names a file
(``sandlot server --extra-ca-file PATH``, env ``SANDLOT_EXTRA_CA_FILE``); a tenant cannot name
one (no API takes a host path), so no tenant can make the server read a host file.

What the file may hold is checked here, once, at server start: at most :data:`MAX_BYTES` and
:data:`MAX_CERTIFICATES`, only ``CERTIFICATE`` PEM blocks (a private key or anything else is
refused, so an operator's mistake never hands a key to tenants), each one a parseable X.509
certificate that is not marked as a non-CA (``CA:FALSE``) and has not expired (TLS clients
refuse chains through an expired CA anyway: an operator learns it at start, not from tenants).
Sandboxes get the certificates re-encoded, not the file's bytes: no comment or stray text of the
operator's file reaches them.

Where they land in a sandbox (see :mod:`sandlot.engines.local.ca_store`): appended to the
image's own Debian-layout bundle, and alone in Debian's place for local CAs, with the
environment variables that tools which ignore the system store read (:func:`sandbox_env`).
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

#: The largest file accepted (a bundle of a few hundred CAs is ~200 KiB).
MAX_BYTES = 1024 * 1024
MAX_CERTIFICATES = 256

#: Inside a sandbox: the system bundle (Debian, Ubuntu, Alpine lay it out here) ...
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
#: ... and the extra certificates alone, where Debian keeps local CAs (so an
#: ``update-ca-certificates`` run inside the sandbox keeps them).
EXTRA_FILE = "/usr/local/share/ca-certificates/sandlot-extra.crt"

_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


class ExtraCAError(ValueError):
    """The extra CA file cannot be used; the message says why."""


@dataclass(frozen=True)
class ExtraCA:
    """Validated certificates, PEM-encoded afresh."""

    pem: bytes
    subjects: tuple[str, ...]


def parse(data: bytes) -> ExtraCA:
    if len(data) > MAX_BYTES:
        raise ExtraCAError(f"the extra CA file is larger than {MAX_BYTES // 1024} KiB")
    labels = {m.group(1).decode() for m in _BLOCK.finditer(data)}
    if not labels:
        raise ExtraCAError("the extra CA file holds no PEM certificate (-----BEGIN CERTIFICATE)")
    if labels - {"CERTIFICATE"}:
        others = ", ".join(sorted(labels - {"CERTIFICATE"}))
        raise ExtraCAError(
            f"the extra CA file may hold only certificates, not: {others} "
            "(a private key must never be given to sandboxes)"
        )
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ExtraCAError(
            f"the extra CA file holds a certificate that is not valid: {exc}"
        ) from None
    if len(certificates) > MAX_CERTIFICATES:
        raise ExtraCAError(f"the extra CA file holds more than {MAX_CERTIFICATES} certificates")
    now = datetime.datetime.now(datetime.UTC)
    for cert in certificates:
        if cert.not_valid_after_utc < now:
            raise ExtraCAError(
                f"{cert.subject.rfc4514_string()} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: give a valid CA"
            )
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            continue  # an old (v1) root: trusted as given
        if not constraints.ca:
            raise ExtraCAError(
                f"{cert.subject.rfc4514_string()} is not a CA certificate (CA:FALSE): give the "
                "CA that issued it"
            )
    return ExtraCA(
        pem=b"".join(c.public_bytes(Encoding.PEM) for c in certificates),
        subjects=tuple(c.subject.rfc4514_string() for c in certificates),
    )


def load(path: str | Path) -> ExtraCA:
    """Read and check the operator's file: a regular file (a FIFO or a device would hang the
    server's start or never end), read bounded."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ExtraCAError(f"cannot read the extra CA file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ExtraCAError(f"the extra CA file {path} is not a regular file")
        try:
            data = f.read(MAX_BYTES + 1)
        except OSError as exc:
            raise ExtraCAError(f"cannot read the extra CA file {path}: {exc.strerror}") from None
    return parse(data)


def sandbox_env(has_system_bundle: bool, has_extra_file: bool = True) -> dict[str, str]:
    """The variables that make tools which ignore the system store use the extra CAs: Python's
    ssl and OpenSSL (``SSL_CERT_FILE``), requests (``REQUESTS_CA_BUNDLE``, else certifi), pip
    (``PIP_CERT``), uv (``SSL_CERT_FILE``), Node.js (``NODE_EXTRA_CA_CERTS``, added to its own
    roots). The first three replace a tool's store, so they are set only where the image has
    a system bundle that now holds the extra CAs too."""
    env = {"NODE_EXTRA_CA_CERTS": EXTRA_FILE} if has_extra_file else {}
    if has_system_bundle:
        env |= {k: SYSTEM_BUNDLE for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT")}
    return env
