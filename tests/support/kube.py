"""A throw-away Kubernetes control plane for tests: Debian's etcd and a kube-apiserver built by
``scripts/build-kubernetes.sh``, both on 127.0.0.1 with free ports and temporary directories.

No kubelet, scheduler or controller-manager: Pods, Secrets, NetworkPolicies, RBAC, watches and
Leases are the API server's own and are real; what a kubelet would do to a Pod (set its IP and
phase) a test does through the API (see :mod:`support.loopkubelet`), and what the
controller-manager would create (a namespace's ``default`` ServiceAccount) :meth:`namespace`
creates. Ready in ~1 s here.

Authentication is a static token file: ``admin`` (``system:masters``) and any extra users a test
asks for, so RBAC is checked for real against users without that group.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-kubernetes.sh"
APT_PACKAGE = "etcd-server"


def find_apiserver() -> Path | None:
    """The cached kube-apiserver, or None; never builds it (that takes minutes: setup.sh does)."""
    if given := os.environ.get("SANDLOT_KUBE_APISERVER"):
        return Path(given) if os.access(given, os.X_OK) else None
    done = subprocess.run(
        [str(BUILD_SCRIPT), "--cached"], capture_output=True, text=True, check=False
    )
    path = done.stdout.strip()
    return Path(path) if done.returncode == 0 and path else None


def missing() -> str | None:
    """Why a control plane cannot start here (a skip reason), or None."""
    if shutil.which("etcd") is None:
        return f"etcd is not installed (apt-get install {APT_PACKAGE}; scripts/setup.sh does)"
    if find_apiserver() is None:
        return "kube-apiserver is not built (scripts/setup.sh runs scripts/build-kubernetes.sh)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ControlPlane:
    url: str
    dir: Path
    ca_file: Path
    tokens: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def kubeconfig(self, user: str = "admin", token: str | None = None) -> Path:
        """A kubeconfig file for ``user`` (a token user of this control plane), or for any
        bearer ``token`` (a service account's) under that name."""
        path = self.dir / f"kubeconfig-{user}"
        if token is not None:
            self.tokens[user] = token
        if token is not None or not path.exists():
            path.write_text(
                "apiVersion: v1\nkind: Config\n"
                f"clusters:\n- name: test\n  cluster:\n    server: {self.url}\n"
                f"    certificate-authority: {self.ca_file}\n"
                f"users:\n- name: {user}\n  user:\n    token: {self.tokens[user]}\n"
                "contexts:\n- name: test\n  context:\n    cluster: test\n"
                f"    user: {user}\ncurrent-context: test\n"
            )
            path.chmod(0o600)
        return path

    def request(
        self, method: str, path: str, body: bytes | None = None, token: str | None = None
    ) -> tuple[int, bytes]:
        """One request, as admin unless ``token`` is given (stdlib, for fixtures that must not
        need an event loop)."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("authorization", f"Bearer {token or self.tokens['admin']}")
        req.add_header("content-type", "application/json")
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def namespace(self, name: str | None = None) -> str:
        """Create a namespace and its ``default`` ServiceAccount (the controller-manager's job,
        which the ServiceAccount admission plugin needs before any Pod)."""
        name = name or f"t-{secrets.token_hex(4)}"
        for path, body in (
            ("/api/v1/namespaces", f'{{"metadata":{{"name":"{name}"}}}}'),
            (
                f"/api/v1/namespaces/{name}/serviceaccounts",
                '{"metadata":{"name":"default"}}',
            ),
        ):
            status, text = self.request("POST", path, body.encode())
            if status not in (201, 409):
                raise RuntimeError(f"POST {path}: {status} {text[:300]!r}")
        return name

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(3)  # its files go with it: no need for a long graceful drain
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _write_keys(d: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv, pub = d / "sa.key", d / "sa.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    priv.chmod(0o600)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


def _wait_ready(cp: ControlPlane, deadline: float) -> None:
    last = ""
    while time.monotonic() < deadline:
        for proc in cp.procs:
            if proc.poll() is not None:
                log = (cp.dir / "apiserver.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"control plane exited ({proc.args[0]}): {log}")
        try:
            status, body = cp.request("GET", "/readyz")
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        except OSError as exc:  # not listening yet
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"kube-apiserver not ready: {last}")


@contextlib.contextmanager
def control_plane(users: tuple[str, ...] = ()) -> Iterator[ControlPlane]:
    """Start etcd and kube-apiserver; yield the running :class:`ControlPlane`; stop both and
    remove their files, whatever happened."""
    apiserver = find_apiserver()
    etcd = shutil.which("etcd")
    if apiserver is None or etcd is None:
        raise FileNotFoundError(missing() or "control plane binaries missing")
    d = Path(tempfile.mkdtemp(prefix="sandlot-kube-"))
    d.chmod(0o700)
    tokens = {u: secrets.token_hex(16) for u in ("admin", *users)}
    (d / "tokens.csv").write_text(
        "".join(
            f'{tok},{u},{u},"system:masters"\n' if u == "admin" else f"{tok},{u},{u}\n"
            for u, tok in tokens.items()
        )
    )
    sa_key, sa_pub = _write_keys(d)
    etcd_port, etcd_peer, api_port = _free_port(), _free_port(), _free_port()
    cp = ControlPlane(
        url=f"https://127.0.0.1:{api_port}",
        dir=d,
        ca_file=d / "certs" / "apiserver.crt",
        tokens=tokens,
    )
    try:
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        with open(d / "etcd.log", "wb") as log:
            cp.procs.append(
                subprocess.Popen(
                    [
                        etcd,
                        f"--data-dir={d / 'etcd'}",
                        f"--listen-client-urls={etcd_url}",
                        f"--advertise-client-urls={etcd_url}",
                        f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                        f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                        f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                        "--log-level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        with open(d / "apiserver.log", "wb") as log:
            cp.procs.append(
                subprocess.Popen(
                    [
                        str(apiserver),
                        f"--etcd-servers={etcd_url}",
                        "--bind-address=127.0.0.1",
                        "--advertise-address=127.0.0.1",
                        f"--secure-port={api_port}",
                        f"--cert-dir={d / 'certs'}",
                        f"--token-auth-file={d / 'tokens.csv'}",
                        "--authorization-mode=RBAC",
                        f"--service-account-key-file={sa_pub}",
                        f"--service-account-signing-key-file={sa_key}",
                        "--service-account-issuer=https://kubernetes.default.svc",
                        "--service-cluster-ip-range=10.96.0.0/16",
                        "--allow-privileged=true",
                        "--profiling=false",
                        "--v=0",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 60
        while not cp.ca_file.exists() and time.monotonic() < deadline:
            if cp.procs[-1].poll() is not None:
                break
            time.sleep(0.02)
        _wait_ready(cp, deadline)
        yield cp
    finally:
        cp.stop()
