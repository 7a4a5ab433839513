"""Extra CA certificates: what sandboxes trust is the operator's choice, never the host's store,
never a tenant's, and never a way to read host files.

- ``--extra-ca-file`` takes certificates only: a private key (or any other PEM block), a
  server's own certificate (CA:FALSE), junk, or an endless file is refused before the server
  starts, and what reaches sandboxes is the certificates re-encoded, not the file's bytes.
- An image whose CA bundle path leads out of it (``/etc/ssl`` a symlink to the host's) gets no
  combined bundle: the host's CAs are never read through an image's links.
- With outbound access, ``pip install`` from an HTTPS index that this test serves from a
  network namespace of its own fails without the extra CA (the sandbox's Debian bundle does not
  know the test CA) and succeeds with it, for pip (system and venv), uv, curl (the system
  store) and Node.js. No test contacts a real index.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import demo_packages
from support.local import IMAGES_DIR, create_sandbox
from support.peer_host import peer_host

from sandlot import ca_certs
from sandlot.ca_certs import ExtraCAError
from sandlot.cli.main import main
from sandlot.engines.base import NetworkMode
from sandlot.engines.local import LocalEngine
from sandlot.images.store import ImageStore

SUBNET = 9  # 10.213.9.0/30: the network tests use 7 and 8
PORT = 8443


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    ip: str | None = None,
    expired: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3 if expired else 0)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertAuthority:
    """A CA of the test's own and a server certificate it issued for the peer's address."""

    def __init__(self, ip: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _cert("sandlot test CA", self.key, None, ca=True)
        self.server_key = ec.generate_private_key(ec.SECP256R1())
        self.server_cert = _cert(
            ip, self.server_key, ("sandlot test CA", self.key), ca=False, ip=ip
        )


@pytest.fixture(scope="module")
def test_ca() -> CertAuthority:
    return CertAuthority(f"10.213.{SUBNET}.2")


# -- what the operator's file may hold ---------------------------------------------------------


def test_certificates_are_accepted_and_re_encoded(test_ca: CertAuthority) -> None:
    other = CertAuthority("10.0.0.1")
    data = b"# the proxy team's CA, do not share the password hunter2\n" + _pem(test_ca.cert)
    data += b"\ntrailing words\n" + _pem(other.cert)
    extra = ca_certs.parse(data)
    assert extra.pem == _pem(test_ca.cert) + _pem(other.cert)
    assert b"hunter2" not in extra.pem and len(extra.subjects) == 2


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("key", "not: PRIVATE KEY"),
        ("leaf", "is not a CA certificate"),
        ("junk", "holds no PEM certificate"),
        ("broken", "not valid"),
        ("huge", "larger than 1024 KiB"),
        ("many", "more than 256 certificates"),
        ("expired", "sandlot old CA expired on 2"),
    ],
)
def test_bad_files_are_refused(test_ca: CertAuthority, content: str, reason: str) -> None:
    ca = _pem(test_ca.cert)
    data = {
        "key": ca + _key_pem(test_ca.key),  # a CA with its key: the key must never be handed out
        "leaf": _pem(test_ca.server_cert),
        "junk": b"hello",
        "broken": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "huge": ca + b"#" * ca_certs.MAX_BYTES,
        "many": ca * (ca_certs.MAX_CERTIFICATES + 1),
        "expired": ca + _pem(_cert("sandlot old CA", test_ca.key, None, ca=True, expired=True)),
    }[content]
    with pytest.raises(ExtraCAError, match=reason):
        ca_certs.parse(data)


def test_the_server_refuses_a_bad_file_before_starting(
    tmp_path: Path, test_ca: CertAuthority
) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(_key_pem(test_ca.key))
    big = tmp_path / "big.pem"
    with open(big, "wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: read bounded, then refused
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer for ever
    for path, reason in [
        (key, "a private key must never be given to sandboxes"),
        (tmp_path / "missing.pem", "cannot read the extra CA file"),
        (big, "larger than"),
        (fifo, "is not a regular file"),
        (Path("/dev/zero"), "is not a regular file"),
    ]:
        result = CliRunner().invoke(main, ["server", "--extra-ca-file", str(path)])
        assert result.exit_code == 2, result.output
        assert "--extra-ca-file" in result.output and reason in result.output
    env = {"SANDLOT_EXTRA_CA_FILE": str(key)}
    result = CliRunner().invoke(main, ["server"], env=env)
    assert result.exit_code == 2 and "private key" in result.output


# -- sandboxes -----------------------------------------------------------------------------------


@pytest.fixture
async def engines(
    state: Path, test_ca: CertAuthority
) -> AsyncIterator[tuple[LocalEngine, LocalEngine]]:
    """Two engines over one state directory: without and with the test CA."""
    plain = LocalEngine(state, images=ImageStore(IMAGES_DIR))
    trusting = LocalEngine(
        state, images=ImageStore(IMAGES_DIR), extra_ca=ca_certs.parse(_pem(test_ca.cert))
    )
    try:
        yield plain, trusting
    finally:
        for info in await plain.list():
            await plain.delete(info.id)
        await plain.close()
        await trusting.close()


@pytest.fixture
def index(tmp_path: Path, test_ca: CertAuthority) -> Iterator[str]:
    """An HTTPS package index (PEP 503) with one wheel, on a host of the test's own."""
    root = tmp_path / "index"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    demo_packages.simple_index(root, [demo_packages.wheel(wheels, "sandlot_demo_index")])
    (tmp_path / "cert.pem").write_bytes(_pem(test_ca.server_cert))
    (tmp_path / "key.pem").write_bytes(_key_pem(test_ca.server_key))
    (tmp_path / "serve.py").write_text(
        "import functools, http.server, ssl, sys\n"
        "root, cert, key, ip, port = sys.argv[1:]\n"
        "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)\n"
        "httpd = http.server.ThreadingHTTPServer((ip, int(port)), handler)\n"
        "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
        "ctx.load_cert_chain(cert, key)\n"
        "httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)\n"
        "httpd.serve_forever()\n"
    )

    def command(ip: str) -> list[str]:
        files = [str(tmp_path / n) for n in ("index", "cert.pem", "key.pem")]
        return [sys.executable, str(tmp_path / "serve.py"), *files, ip, str(PORT)]

    with peer_host(SUBNET, PORT, command) as ip:
        yield f"https://{ip}:{PORT}"


PIP = "--retries 0 --timeout 15 --no-cache-dir --index-url {url}/simple/ sandlot-demo-index"
IMPORT = "cd / && {python} -c 'import sandlot_demo_index as m; print(m.VALUE)'"


@pytest.mark.anyio
@pytest.mark.root
async def test_pip_trusts_the_index_only_with_the_extra_ca(
    engines: tuple[LocalEngine, LocalEngine], index: str
) -> None:
    plain, trusting = engines
    without = await create_sandbox(plain, "default", network=NetworkMode.OUTBOUND)
    with_ca = await create_sandbox(trusting, "default", network=NetworkMode.OUTBOUND)
    for handle in (without, with_ca):
        handle.client.timeout = httpx.Timeout(300)  # pip and uv in venvs: slow on a busy host
    try:
        pip = PIP.format(url=index)
        out = await without.run(f"pip install {pip} 2>&1")
        assert out["code"] != 0 and "CERTIFICATE_VERIFY_FAILED" in out["stdout"], out
        assert (await without.run(f"curl -sS {index}/simple/ 2>&1"))["code"] != 0

        # pip, system-wide and in a venv (pip's own store: PIP_CERT), ...
        await with_ca.sh(f"pip install {pip} 2>&1")
        assert await with_ca.sh(IMPORT.format(python="python3")) == "sandlot_demo_index\n"
        await with_ca.sh(f"python3 -m venv /tmp/v && /tmp/v/bin/pip install {pip} 2>&1")
        assert await with_ca.sh(IMPORT.format(python="/tmp/v/bin/python")) == "sandlot_demo_index\n"
        # ... uv (its own roots unless SSL_CERT_FILE), curl (the system store), Node.js.
        uv = f"uv pip install --python /tmp/u/bin/python --index-url {index}/simple/"
        await with_ca.sh(
            f"uv venv --python /usr/bin/python3 /tmp/u 2>&1 && {uv} sandlot-demo-index 2>&1"
        )
        assert await with_ca.sh(IMPORT.format(python="/tmp/u/bin/python")) == "sandlot_demo_index\n"
        assert "sandlot-demo-index" in await with_ca.sh(
            f"env -u SSL_CERT_FILE curl -sS {index}/simple/"
        )
        node = f"require('https').get('{index}/simple/', r => console.log(r.statusCode))"
        assert await with_ca.sh(f'node -e "{node}"') == "200\n"
        assert (await without.run(f'node -e "{node}" 2>&1'))["code"] != 0
    finally:
        for handle, engine in ((without, plain), (with_ca, trusting)):
            await handle.aclose()
            await engine.delete(handle.id)


@pytest.mark.anyio
@pytest.mark.root
async def test_the_sandbox_sees_the_files_and_variables(
    engines: tuple[LocalEngine, LocalEngine], test_ca: CertAuthority
) -> None:
    _, trusting = engines
    sb = await create_sandbox(trusting, "default")
    try:
        extra = await sb.sh(f"cat {ca_certs.EXTRA_FILE}")
        assert extra == _pem(test_ca.cert).decode()
        bundle = await sb.sh(f"cat {ca_certs.SYSTEM_BUNDLE}")
        assert bundle.endswith(extra) and bundle.count("BEGIN CERTIFICATE") > 100
        env = await sb.sh("env")
        for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT"):
            assert f"{var}={ca_certs.SYSTEM_BUNDLE}\n" in env
        assert f"NODE_EXTRA_CA_CERTS={ca_certs.EXTRA_FILE}\n" in env
        # The sandbox's own files: root inside may change them (it owns its sandbox), and
        # Debian's own tool, run inside, keeps the extra CAs.
        assert (await sb.sh(f"stat -c %u:%a {ca_certs.SYSTEM_BUNDLE}")) == "0:644\n"
        await sb.sh("update-ca-certificates --fresh 2>&1")
        assert extra in await sb.sh(f"cat {ca_certs.SYSTEM_BUNDLE}")
    finally:
        await sb.aclose()
        await trusting.delete(sb.id)


@pytest.mark.anyio
@pytest.mark.root
async def test_an_image_linking_to_the_hosts_store_gets_no_bundle(
    engines: tuple[LocalEngine, LocalEngine], tmp_path: Path, test_ca: CertAuthority
) -> None:
    """``/etc/ssl`` -> the host's ``/etc/ssl``: reading through it would hand the host's CAs
    (and any file the link names) to the sandbox."""
    _, trusting = engines
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "ssl").symlink_to("/etc/ssl")
    sb = await create_sandbox(trusting, str(rootfs))
    try:
        env = await sb.sh("/bin/busybox env")
        assert "SSL_CERT_FILE" not in env and f"NODE_EXTRA_CA_CERTS={ca_certs.EXTRA_FILE}" in env
        extra = await sb.sh(f"/bin/busybox cat {ca_certs.EXTRA_FILE}")
        assert extra == _pem(test_ca.cert).decode()
    finally:
        await sb.aclose()
        await trusting.delete(sb.id)
    # Nothing was written through the link on the host either.
    assert not Path("/etc/ssl/certs/ca-certificates.crt").read_bytes().endswith(_pem(test_ca.cert))


@pytest.mark.anyio
@pytest.mark.root
async def test_an_image_linking_to_host_directories_gets_nothing_written_there(
    engines: tuple[LocalEngine, LocalEngine], tmp_path: Path
) -> None:
    """``/usr/local`` -> a host directory: the extra file is not placed (nor written through
    the link), and no variable names a file that is not there."""
    _, trusting = engines
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    target = tmp_path / "host-dir"  # stands for any host directory
    (rootfs / "usr").mkdir()
    (rootfs / "usr" / "local").symlink_to(target)
    sb = await create_sandbox(trusting, str(rootfs))
    try:
        assert "NODE_EXTRA_CA_CERTS" not in await sb.sh("/bin/busybox env")
    finally:
        await sb.aclose()
        await trusting.delete(sb.id)
    assert not target.exists()


@pytest.mark.anyio
@pytest.mark.root
async def test_sandlot_server_option_reaches_sandboxes(
    state: Path, tmp_path: Path, test_ca: CertAuthority
) -> None:
    """``sandlot server --extra-ca-file`` (a real server process): a sandbox created through
    the SDK trusts the CA."""
    from sandlot import AsyncSandbox

    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(_pem(test_ca.cert))
    sock = tmp_path / "s.sock"
    env = {**os.environ, "SANDLOT_STATE_DIR": str(state), "SANDLOT_IMAGES_DIR": str(IMAGES_DIR)}
    argv = [sys.executable, "-m", "sandlot.cli", "server", "--listen", f"unix:{sock}"]
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(
            [*argv, "--extra-ca-file", str(ca_file)], env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not start"
            await anyio.sleep(0.05)
        sb = await AsyncSandbox.create(api_url=f"unix:{sock}", wait_ready=True)
        try:
            result = await sb.exec(f"cat {ca_certs.EXTRA_FILE}; echo $SSL_CERT_FILE")
            assert result.stdout == _pem(test_ca.cert).decode() + ca_certs.SYSTEM_BUNDLE + "\n"
        finally:
            await sb.delete()
    finally:
        server.terminate()
        server.wait(30)
        engine = LocalEngine(state, images=ImageStore(IMAGES_DIR))
        for info in await engine.list():
            await engine.delete(info.id)
        await engine.close()
