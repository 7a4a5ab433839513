"""``image=`` must not reach the host.

Attacks, as a tenant (an API token) and as an image's author, against a real server, real
sandboxes and a real registry on 127.0.0.1:

- a tenant names a host path (``/usr``, ``/proc/self/root``) or an OCI layout on the host -- one it
  wrote itself into its own sandbox's shared directory -- as its image: refused (403), and the
  answer names no host path. The socket's owner still may; tenants may inside a directory the
  server trusts (``--trusted-image-dir``), not through a symlink out of it.
- an image whose layer is a gzip bomb (1 MiB that unpacks to 1 GiB): refused before anything is
  unpacked, nothing left behind.
- an image whose layer holds a 0666 device node, a setuid-root binary and a file capability: on
  the host, no device node and nothing owned by root (the storage uid range owns it all); inside
  the sandbox the setuid file is root's, setuid, and runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.local import IMAGES_DIR, local_engine_unavailable
from support.registry import (
    Entry,
    busybox_layer,
    gzip_bomb_layer,
    need_tools,
    push,
    start_registry,
    write_layout,
)
from support.server import RunningServer, start_server

from sandlot import Sandbox
from sandlot.engines.local import own_files
from sandlot.images.trust import ImageRefused, ImageTrust

pytestmark = pytest.mark.root

#: Low enough that the gzip bomb below (1 GiB) crosses it at its first header.
UNPACK_LIMIT = 256 * 1024**2
#: A v2 ``security.capability``: CAP_NET_RAW permitted and effective.
NET_RAW_CAPS = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


@dataclass
class World:
    tmp: Path
    engine: Any
    owner: RunningServer  # on the Unix socket: the host's administrator
    tenant: RunningServer  # on TCP: API tokens
    token: str
    trusted: Path  # --trusted-image-dir
    registry: str  # 127.0.0.1:PORT

    def as_tenant(self) -> httpx.Client:
        return self.tenant.client(token=self.token)

    def store_entries(self) -> set[str]:
        root = Path(self.engine.images.root)
        return {d.name for d in root.iterdir()} if root.exists() else set()


def _host_rootfs(target: Path) -> Path:
    """A root filesystem directory owned by host root: busybox as /bin/sh."""
    (target / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", target / "bin" / "busybox")
    (target / "bin" / "sh").symlink_to("busybox")
    return target


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    need_tools()
    from sandlot.engines.local import LocalEngine
    from sandlot.images.layers import UnpackLimits
    from sandlot.images.store import ImageStore

    tmp = Path(tempfile.mkdtemp(prefix="sl-sec-images-"))
    servers: list[RunningServer] = []
    registry: subprocess.Popen[bytes] | None = None
    try:
        trusted = tmp / "trusted"
        _host_rootfs(trusted / "rootfs")
        write_layout(trusted / "layout", "t", [busybox_layer()])
        (trusted / "escape").symlink_to("/usr")
        (tmp / "outside").mkdir()
        write_layout(tmp / "outside" / "layout", "t", [busybox_layer()])
        (trusted / "escape-layout").symlink_to(tmp / "outside" / "layout")

        store = ImageStore(tmp / "images", limits=UnpackLimits(UNPACK_LIMIT, 100_000))
        engine = LocalEngine(tmp / "state", images=store)
        owner = start_server(engine, f"sqlite:///{tmp / 'owner.db'}", unix_path=tmp / "s.sock")
        servers.append(owner)
        (tmp / "registry").mkdir()
        host, registry = start_registry(tmp / "registry")
        tenant = start_server(
            engine,
            f"sqlite:///{tmp / 'tenant.db'}",
            tcp=True,
            trusted_image_dirs=(trusted,),
            trusted_registries=(host,),  # exactly as spelled: 127.0.0.1:PORT
        )
        servers.append(tenant)
        _, token = tenant.app.state.control.store.create_token("tenant", "attacker")
        yield World(tmp, engine, owner, tenant, token, trusted, host)
    finally:
        if registry is not None:
            registry.terminate()
            registry.wait(10)
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _create(client: httpx.Client, image: str) -> httpx.Response:
    return client.post("/v1/sandboxes", json={"image": image, "wait_ready": True}, timeout=120)


def _delete(client: httpx.Client, response: httpx.Response) -> None:
    if response.status_code == 201:
        client.delete(f"/v1/sandboxes/{response.json()['id']}")


def _assert_no_host_path(world: World, response: httpx.Response, *paths: str) -> None:
    for path in (*paths, str(world.tmp), "/var/lib/sandlot", str(world.engine.images.root)):
        assert path not in response.text, response.text


# -- a tenant's image= never names the host ----------------------------------------------------


# -- a tenant's image= never makes the server pull from the host itself ------------------------


def _resolves(name: str) -> bool:
    try:
        return bool(socket.getaddrinfo(name, None))
    except OSError:
        return False


def _own_global_address() -> str | None:
    """One of this host's global addresses (``ip -j addr``), bracketed if IPv6."""
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    for link in json.loads(out):
        for addr in link.get("addr_info", []):
            if addr.get("scope") == "global":
                local = str(addr["local"])
                return f"[{local}]" if ":" in local else local
    return None


@pytest.mark.parametrize(
    "image",
    [
        "localhost:{port}/evil/bomb:1",  # the registry on 127.0.0.1, spelled another way
        "127.0.0.1:{other}/x:1",  # any other service on the host's loopback
        "127.0.0.2:{port}/x:1",
        "[::1]:{port}/x:1",
        "{hostname}:{port}/x:1",  # this host's name (resolves to one of its addresses)
        "{own}:{port}/x:1",  # one of this host's own non-loopback addresses
        "169.254.169.254/latest/meta-data:1",  # the cloud's metadata service
        "0.0.0.0:{port}/x:1",
        "foo.localhost:{port}/x:1",
    ],
)
def test_a_tenant_cannot_pull_from_registries_on_the_host(world: World, image: str) -> None:
    port = world.registry.rpartition(":")[2]
    hostname = socket.gethostname()
    if "{hostname}" in image and not _resolves(hostname):
        pytest.skip(f"this host's name {hostname!r} does not resolve here")
    own = _own_global_address()
    if "{own}" in image and own is None:
        pytest.skip("this host has no global address")
    image = image.format(port=port, other=int(port) + 1, hostname=hostname, own=own)
    before = world.store_entries()
    with world.as_tenant() as tenant:
        response = _create(tenant, image)
        _delete(tenant, response)
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "forbidden"
    assert "--trusted-registry" in response.json()["error"]
    assert world.store_entries() == before  # nothing was pulled


def test_a_trusted_registry_is_open_to_tenants_only_as_spelled(world: World) -> None:
    with pytest.raises(ValueError, match="HOST"):
        ImageTrust.from_dirs([], ["http://127.0.0.1:5000"])
    trust = ImageTrust.from_dirs([], [world.registry])
    assert trust.check(f"{world.registry}/a/b:1", local=False) == f"{world.registry}/a/b:1"
    for ref in ("default", "koyeb/sandbox", "busybox"):
        assert trust.check(ref, local=False) == ref
    assert trust.check("localhost:1/a:1", local=True) == "localhost:1/a:1"  # the administrator
    with pytest.raises(ImageRefused):
        trust.check(f"localhost:{world.registry.rpartition(':')[2]}/a/b:1", local=False)


@pytest.mark.parametrize(
    "image",
    [
        "/usr",
        "/proc/self/root",
        "/",
        "/etc/../usr",
        "oci:/var/lib/sandlot/images:latest",
        "oci:relative/layout:t",
        "{trusted}/../outside/layout",
        "{trusted}/escape",
        "oci:{trusted}/escape-layout:t",
        "oci:{trusted}/../outside/layout:t",
    ],
)
def test_a_tenant_cannot_use_host_paths(world: World, image: str) -> None:
    image = image.format(trusted=world.trusted)
    before = world.store_entries()
    with world.as_tenant() as tenant:
        r = _create(tenant, image)
        _delete(tenant, r)
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "forbidden"
        assert "trusted-image-dir" in r.json()["error"]
        _assert_no_host_path(world, r, image.removeprefix("oci:").rsplit(":", 1)[0])
        assert tenant.get("/v1/sandboxes").json()["sandboxes"] == []
    assert world.store_entries() == before  # nothing unpacked


def test_a_tenant_cannot_unpack_a_layout_it_wrote_into_its_sandbox(world: World) -> None:
    """The reported attack: the tenant's own sandbox shares /.sandlot/run with the host; it
    writes an OCI layout (a setuid-root shell, a 0666 device node) there and names its host
    path as the image of its next sandbox."""
    layout = write_layout(
        world.tmp / "evil-layout",
        "t",
        [
            busybox_layer(
                Entry("rootshell", data=Path("/bin/busybox").read_bytes(), mode=0o4755),
                Entry("mem", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=1),
            )
        ],
    )
    with Sandbox.create(image="busybox", api_url=world.tenant.url, api_token=world.token) as sb:
        sb.exec("mkdir -p /.sandlot/run/l/blobs/sha256")
        for f in layout.rglob("*"):
            if f.is_file():
                sb.filesystem.write_file(f"/.sandlot/run/l/{f.relative_to(layout)}", f.read_bytes())
        layer = Path(world.engine.sandboxes_dir) / sb.id / "layer"
        host_dir = own_files.own_dir(layer) / "run" / "l"  # on the sandbox's disk image
        assert (host_dir / "index.json").is_file()  # the layout is on the host
        before = world.store_entries()
        with world.as_tenant() as tenant:
            r = _create(tenant, f"oci:{host_dir}:t")
            _delete(tenant, r)
        assert r.status_code == 403, r.text
        _assert_no_host_path(world, r, str(host_dir))
        assert world.store_entries() == before


# -- the socket's owner and the trusted directories --------------------------------------------


def test_the_socket_owner_may_use_host_paths_and_layouts(world: World) -> None:
    rootfs = world.tmp / "owner-rootfs"
    if not rootfs.exists():
        _host_rootfs(rootfs)
    with Sandbox.create(image=str(rootfs), api_url=world.owner.url) as sb:
        # a host directory keeps its own mapping: host root is the sandbox's root
        assert sb.exec("stat -c %u /bin/busybox").stdout == "0\n"
    layout = f"oci:{world.tmp / 'outside' / 'layout'}:t"
    with Sandbox.create(image=layout, api_url=world.owner.url) as sb:
        assert sb.exec("echo from a layout").stdout == "from a layout\n"


@pytest.mark.parametrize(
    "image",
    ["/proc/self/root", "/", "/sys", "/no/such/dir", "/etc/hostname",
     "oci:/no/such/layout:t", "oci:/proc/self/root:t"],
)  # fmt: skip
def test_image_errors_are_4xx_without_host_paths(world: World, image: str) -> None:
    """Even for the socket's owner: a clear 400, no 5xx, no host path of the server's."""
    with world.owner.client() as owner:
        r = _create(owner, image)
        _delete(owner, r)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_image"
    _assert_no_host_path(world, r)


def test_a_trusted_directory_is_open_to_tenants(world: World) -> None:
    kwargs = {"api_url": world.tenant.url, "api_token": world.token}
    with Sandbox.create(image=str(world.trusted / "rootfs"), **kwargs) as sb:
        assert sb.exec("echo trusted rootfs").stdout == "trusted rootfs\n"
    with Sandbox.create(image=f"oci:{world.trusted / 'layout'}:t", **kwargs) as sb:
        assert sb.exec("echo trusted layout").stdout == "trusted layout\n"


# -- what an image holds never lands on the host as such ---------------------------------------


def test_a_gzip_bomb_is_refused_before_unpacking(world: World) -> None:
    bomb = gzip_bomb_layer(1024**3)
    assert len(bomb[0]) < 2 * 1024**2  # ~1 MiB on the wire, 1 GiB unpacked
    layout = write_layout(world.tmp / "bomb-layout", "t", [busybox_layer(), bomb])
    ref = f"{world.registry}/evil/bomb:1"
    push(layout, "t", ref)
    before = world.store_entries()
    with world.as_tenant() as tenant:
        r = _create(tenant, ref)
        _delete(tenant, r)
    assert r.status_code == 400, r.text
    assert "unpacks to more than 256.0 MiB" in r.json()["error"]
    assert world.store_entries() == before  # nothing half unpacked is left


def _find(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            yield path, path.lstat()


def test_device_nodes_setuid_files_and_capabilities_of_a_layer(world: World) -> None:
    from sandlot.engines.local.idmap import STORAGE_ID_BASE

    layer = busybox_layer(
        Entry("suid", tarfile.DIRTYPE, mode=0o755),  # busybox runs the applet named argv[1]
        Entry("suid/busybox", data=Path("/bin/busybox").read_bytes(), mode=0o4755),
        Entry("mem", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=1),
        Entry("capped", data=b"#!/bin/sh\necho capped\n", mode=0o755, xattrs={
            "security.capability": NET_RAW_CAPS}),
        Entry("home", tarfile.DIRTYPE, mode=0o755),
        Entry("home/app", tarfile.DIRTYPE, mode=0o700, uid=1000, gid=1000),
    )  # fmt: skip
    layout = write_layout(world.tmp / "evil-layer", "t", [layer])
    ref = f"{world.registry}/evil/setuid:1"
    push(layout, "t", ref)
    kwargs = {"api_url": world.tenant.url, "api_token": world.token}
    with Sandbox.create(image=ref, **kwargs) as sb:
        rootfs = world.engine.images.registry_image(ref).rootfs  # the pull, as stored
        # On the host: no device node, nothing of the image owned by host root.
        for path, st in _find(rootfs):
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), path
            assert st.st_uid >= STORAGE_ID_BASE and st.st_gid >= STORAGE_ID_BASE, path
        shell = (rootfs / "suid" / "busybox").lstat()
        assert shell.st_uid == STORAGE_ID_BASE and shell.st_mode & stat.S_ISUID
        assert (rootfs / "home" / "app").lstat().st_uid == STORAGE_ID_BASE + 1000
        caps = os.getxattr(rootfs / "capped", "security.capability")
        # a v3 capability of the storage root: nothing for the host's own root
        assert struct.unpack("<I", caps[:4])[0] >> 24 == 3
        assert struct.unpack("<I", caps[20:24])[0] == STORAGE_ID_BASE
        # Inside: root's setuid file, and it runs; the device is an empty regular file.
        out = sb.exec("stat -c '%u:%g %A' /suid/busybox; /suid/busybox echo runs; stat -c %F /mem")
        assert out.stdout.splitlines() == ["0:0 -rwsr-xr-x", "runs", "regular empty file"]
        assert sb.exec("stat -c %u /home/app").stdout == "1000\n"
        assert sb.exec("/capped").stdout == "capped\n"


def test_built_in_images_belong_to_the_storage_range(world: World) -> None:
    from sandlot.engines.local.idmap import STORAGE_ID_BASE
    from sandlot.images.store import ImageStore

    busybox = world.engine.images.busybox_image().rootfs
    assert all(st.st_uid >= STORAGE_ID_BASE for _, st in _find(busybox))
    with Sandbox.create(image="busybox", api_url=world.tenant.url, api_token=world.token) as sb:
        assert sb.exec("stat -c %u:%g /bin/busybox").stdout == "0:0\n"
    default = ImageStore(IMAGES_DIR).default_image().rootfs
    su = (default / "usr" / "bin" / "su").lstat()
    assert su.st_uid == STORAGE_ID_BASE and su.st_mode & stat.S_ISUID
    assert not any(stat.S_ISCHR(st.st_mode) for _, st in _find(default / "dev"))
    assert stat.S_IMODE(Path(IMAGES_DIR).stat().st_mode) == 0o700
