"""Images pulled from a registry: a real registry (Debian's docker-registry) on 127.0.0.1 holding
an image this test builds (the busybox rootfs, with its own environment and working directory),
a real server and real sandboxes. Traffic goes to loopback only."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.registry import free_port, need_tools, start_registry
from support.runtimes import runtime_fixture  # noqa: F401 (a fixture)
from support.server import RunningServer, start_server

from sandlot import Sandbox, SandboxRequestError
from sandlot.images.store import STORAGE_LAYOUT

pytestmark = pytest.mark.root


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    ref: str  # the test image's tag reference
    digest_ref: str  # the same image by digest
    process: subprocess.Popen[bytes]


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def _push_test_image(tmp: Path, ref: str, *creds: str) -> str:
    """Build the test image (busybox's rootfs, GREETING in its environment, /work its working
    directory), push it to ``ref`` and return its digest."""
    from sandlot.images.store import ImageStore

    layout, bundle = tmp / "layout", tmp / "bundle"
    if not layout.exists():
        busybox = ImageStore(tmp / "images").busybox_image()
        _run("umoci", "init", "--layout", str(layout))
        _run("umoci", "new", "--image", f"{layout}:t")
        _run("umoci", "unpack", "--image", f"{layout}:t", str(bundle))
        shutil.copytree(busybox.rootfs, bundle / "rootfs", symlinks=True, dirs_exist_ok=True)
        (bundle / "rootfs" / "work").mkdir()
        _run("umoci", "repack", "--image", f"{layout}:t", str(bundle))
        _run(
            "umoci", "config", "--image", f"{layout}:t",
            "--config.env", "GREETING=hello from the registry",
            "--config.workingdir", "/work",
        )  # fmt: skip
    login = ["--dest-creds", ":".join(creds)] if creds else []
    _run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", *login, f"oci:{layout}:t",
         f"docker://{ref}")  # fmt: skip
    login = ["--creds", ":".join(creds)] if creds else []
    inspected = _run("skopeo", "inspect", "--tls-verify=false", *login, f"docker://{ref}")
    return str(json.loads(inspected)["Digest"])


@pytest.fixture(scope="module")
def registry(local_server: RunningServer) -> Iterator[Registry]:
    need_tools()
    tmp = Path(tempfile.mkdtemp(prefix="sl-registry-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        host, process = start_registry(tmp)
        ref = f"{host}/sandlot-test/busy:1"
        digest = _push_test_image(tmp, ref)
        yield Registry(host, ref, f"{host}/sandlot-test/busy@{digest}", process)
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class PrivateRegistry:
    host: str
    ref: str


@pytest.fixture(scope="module")
def private_registry(local_server: RunningServer) -> Iterator[PrivateRegistry]:
    """A registry that wants ``robot`` / ``hunter2-registry`` (bcrypt in an htpasswd file)."""
    need_tools()
    with warnings.catch_warnings():  # deprecated (gone in 3.13), but bcrypt without a package
        warnings.simplefilter("ignore", DeprecationWarning)
        crypt = pytest.importorskip("crypt", reason="bcrypt for the htpasswd file")

    tmp = Path(tempfile.mkdtemp(prefix="sl-private-registry-"))
    htpasswd = tmp / "htpasswd"
    hashed = crypt.crypt("hunter2-registry", crypt.mksalt(crypt.METHOD_BLOWFISH))
    htpasswd.write_text(f"robot:{hashed}\n")
    process: subprocess.Popen[bytes] | None = None
    try:
        host, process = start_registry(tmp, htpasswd)
        ref = f"{host}/team/private:1"
        _push_test_image(tmp, ref, "robot", "hunter2-registry")
        yield PrivateRegistry(host, ref)
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def server(local_server: RunningServer) -> Iterator[RunningServer]:
    """A server whose image store is its own (pulled images do not pile up in the host's)."""
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore

    tmp = Path(tempfile.mkdtemp(prefix="sl-regsrv-"))
    engine = LocalEngine(tmp / "state", images=ImageStore(tmp / "images"))
    srv = start_server(engine, f"sqlite:///{tmp / 'db'}", unix_path=tmp / "s.sock")
    yield srv
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.gvisor_default
def test_an_image_from_a_registry(server: RunningServer, registry: Registry, runtime: str) -> None:
    """An image without Python (busybox's files), on both runtimes."""
    with Sandbox.create(image=registry.ref, api_url=server.url, runtime=runtime) as sb:
        result = sb.exec('echo "$GREETING"; pwd; busybox | head -1')
        assert result.exit_code == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[:2] == ["hello from the registry", "/work"]
        assert lines[2].startswith("BusyBox")
        sb.filesystem.write_file("/work/x.txt", "written")  # the image is writable as usual
        assert sb.filesystem.read_file("/work/x.txt").content == "written"


def test_by_digest(server: RunningServer, registry: Registry, runtime: str) -> None:
    with Sandbox.create(image=registry.digest_ref, api_url=server.url, runtime=runtime) as sb:
        assert sb.exec("echo $GREETING").stdout == "hello from the registry\n"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        # the registry's host is put in front below
        ("sandlot-test/busy:no-such-tag", "cannot pull .*manifest unknown"),
        ("sandlot-test/nothing:1", "cannot pull .*manifest unknown"),
        ("Not A Reference", "without spaces"),
        ("UPPER/case:1", "unknown image"),
        ("a//b", "unknown image"),
    ],
)
def test_bad_references_are_clear_errors(
    server: RunningServer, registry: Registry, image: str, message: str
) -> None:
    if image.startswith("sandlot-test/"):
        image = f"{registry.host}/{image}"
    with pytest.raises(SandboxRequestError, match=message) as info:
        Sandbox.create(image=image, api_url=server.url)
    assert image in str(info.value)
    # a failed create leaves nothing running behind it
    assert all(sb.status != "running" for sb in Sandbox.list(api_url=server.url))


def test_registry_secret_for_an_image_not_from_a_registry(server: RunningServer) -> None:
    _add_secret(server, "for-busybox", "docker.io", "x")
    with pytest.raises(SandboxRequestError, match="registry_secret is for images pulled"):
        Sandbox.create(image="busybox", api_url=server.url, registry_secret="for-busybox")


def test_unreachable_registry(server: RunningServer) -> None:
    port = free_port()  # nothing listens there
    image = f"127.0.0.1:{port}/nothing/here:1"
    with pytest.raises(SandboxRequestError, match="cannot pull") as info:
        Sandbox.create(image=image, api_url=server.url)
    assert "connection refused" in str(info.value).lower()


def test_images_above_the_size_limit_are_refused_before_pulling(
    server: RunningServer, registry: Registry
) -> None:
    engine: Any = server.engine
    ref = f"{registry.host}/sandlot-test/busy:size-test"
    _run(
        "skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
        f"docker://{registry.ref}", f"docker://{ref}",
    )  # fmt: skip
    limit = engine.images.max_pull_bytes
    engine.images.max_pull_bytes = 1000  # the test image is ~1 MB compressed
    try:
        with pytest.raises(SandboxRequestError, match=r"compressed, more than this server pulls"):
            Sandbox.create(image=ref, api_url=server.url)
        assert not any(engine.images.root.glob(".build-*"))  # nothing half pulled is left
    finally:
        engine.images.max_pull_bytes = limit
    with Sandbox.create(image=ref, api_url=server.url) as sb:  # within the limit: pulled
        assert sb.exec("echo $GREETING").stdout == "hello from the registry\n"


def test_pull_again_then_prune(server: RunningServer, registry: Registry) -> None:
    """``image pull`` makes a new version beside the one a sandbox uses; prune keeps both
    while that sandbox lives (asleep or not), and the old one goes after it."""
    from sandlot.engines.local.engine import images_in_use

    engine: Any = server.engine
    state = engine.sandboxes_dir.parent
    with Sandbox.create(image=registry.ref, api_url=server.url) as sb:
        first = Path(engine.images.resolve(registry.ref).rootfs).parent
        second = Path(engine.images.registry_image(registry.ref, pull=True).rootfs).parent
        version = int(first.name.rsplit("-", 1)[1])
        assert second.name == first.name.rsplit("-", 1)[0] + f"-{version + 1}"
        with Sandbox.create(image=registry.ref, api_url=server.url) as newer:
            assert newer.exec("echo $GREETING").stdout == "hello from the registry\n"
        assert engine.images.prune(images_in_use(state)) == ()  # first is in use
        assert sb.exec("pwd").stdout == "/work\n"
    assert engine.images.prune(images_in_use(state)) == (first,)
    assert not first.exists() and second.exists()


def test_pulled_images_stay_when_the_registry_is_gone(
    server: RunningServer, registry: Registry
) -> None:
    """(Last: it stops the module's registry.) A pulled image is reused, as Docker's default
    'pull if missing' does: the same reference still creates with the registry gone."""
    with Sandbox.create(image=registry.ref, api_url=server.url) as sb:
        assert sb.exec("true").exit_code == 0
    registry.process.terminate()
    registry.process.wait(10)
    with Sandbox.create(image=registry.ref, api_url=server.url) as sb:
        assert sb.exec("pwd").stdout == "/work\n"


def _add_secret(server: RunningServer, name: str, registry: str, password: str) -> None:
    with server.client() as c:
        body = {"name": name, "registry": registry, "username": "robot", "password": password}
        r = c.post("/v1/secrets", json=body)
        assert r.status_code == 201, r.text


def test_private_registry_with_registry_secret(
    server: RunningServer, private_registry: PrivateRegistry, runtime: str
) -> None:
    image = private_registry.ref
    with pytest.raises(SandboxRequestError, match=r"cannot pull .*(unauthorized|authentication)"):
        Sandbox.create(image=image, api_url=server.url)
    _add_secret(server, "wrong", private_registry.host, "not-the-password")
    with pytest.raises(SandboxRequestError, match=r"cannot pull .*(unauthorized|authentication)"):
        Sandbox.create(image=image, api_url=server.url, registry_secret="wrong")
    _add_secret(server, "elsewhere", "ghcr.io", "hunter2-registry")
    with pytest.raises(SandboxRequestError, match=r"secret is for ghcr\.io, not for 127\.0\.0\.1"):
        Sandbox.create(image=image, api_url=server.url, registry_secret="elsewhere")
    _add_secret(server, "robot", private_registry.host, "hunter2-registry")
    with Sandbox.create(
        image=image, api_url=server.url, registry_secret="robot", runtime=runtime
    ) as sb:
        assert sb.exec("echo $GREETING").stdout == "hello from the registry\n"
    # The pulled private image is kept for that secret only: without it, no sandbox gets it.
    with pytest.raises(SandboxRequestError, match="cannot pull"):
        Sandbox.create(image=image, api_url=server.url)
    # and the password went nowhere near a command line or the image store's files
    store = Path(server.engine.images.root)  # type: ignore[attr-defined]
    leaked = subprocess.run(
        ["grep", "-rl", "hunter2-registry", str(store)], capture_output=True, text=True
    )
    assert leaked.stdout == ""
    # nor can a fast hash of a guess be checked against the directory names (they show in a
    # sandbox's mount table): the name of the stored pull is not a fast digest of the password
    for guess in ("hunter2-registry", "not-the-password"):
        fast = "\n".join([STORAGE_LAYOUT, "registry-v1", image, private_registry.host])
        fast += f"\nrobot\n{guess}"
        tag = hashlib.sha256(fast.encode()).hexdigest()[:12]
        assert not list(store.glob(f"registry-{tag}-*"))
    assert list(store.glob("registry-*"))  # the pull is there, under another name
