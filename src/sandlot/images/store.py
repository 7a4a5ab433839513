"""Images: read-only root filesystems that sandboxes are created from.

An image is a directory holding ``rootfs/`` and ``image.json`` (its environment and working
directory). Image rootfs trees are shared read-only by every sandbox made from them (each sandbox
writes to its own overlay upper directory), so nothing here is ever modified after it is built.

Image references a user can give:

- ``default`` or ``koyeb/sandbox`` -- the default image (Debian bookworm with python3, pip, uv,
  gcc, Node.js, git, curl, ...: :mod:`.default_image`), built locally once with mmdebstrap,
  rebuilt only when its recipe changes;
- ``busybox`` -- a tiny image made from the host's static busybox (no Python in it at all);
- an absolute path to a root filesystem directory (used in place, owned by host root);
- ``oci:PATH[:TAG]`` -- an OCI image layout on disk (unpacked with umoci);
- a registry reference, as Docker spells it (``python:3.12-slim``, ``ghcr.io/org/app:v1``,
  ``127.0.0.1:5000/team/tool@sha256:...``): pulled once with skopeo into an OCI layout, then
  unpacked like one. Later uses reuse the pull (as Docker's default "pull if missing");
  ``sandlot image pull REF`` pulls again. Registries on ``localhost``/``127.0.0.1``/``[::1]``
  are spoken to over plain HTTP, as Docker does.

Host paths and OCI layouts are for trusted principals only (:mod:`sandlot.images.trust`).
Everything this store unpacks or builds is owned by the storage uid range, in a 0700 directory,
and bounded in size before it is unpacked (:mod:`.storage`, :mod:`.layers`). Image directories
are named by a digest of their recipe, which includes :data:`STORAGE_LAYOUT`: a change in how
images are stored makes new directories beside the old ones, never changes those in place
(sandboxes, also other servers', use them), and ``prune`` removes the old ones once unused.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sandlot.engines.base import ImageError, RegistryAuth
from sandlot.images import default_image, storage
from sandlot.images.layers import UnpackLimits, limits_from_env, measure, read_json
from sandlot.images.sizes import human, parse_size

DEFAULT_PATH = default_image.ENV["PATH"]
DEFAULT_IMAGE_ALIASES = frozenset({"default", "koyeb/sandbox", "koyeb/sandbox:latest"})

Progress = Callable[[str], None]


#: How images are stored; part of every image directory's name. v1: owned by host root, as
#: unpacked. v2: owned by the storage uid range, device nodes left out.
STORAGE_LAYOUT = "storage-v2"


@dataclass(frozen=True)
class Image:
    name: str
    rootfs: Path
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    workdir: str = "/"
    #: The host uid that is root of the image's files: the storage root for the store's
    #: images, 0 for a host directory. Sandboxes map this range onto their own.
    uid_base: int = 0


def _write_meta(directory: Path, env: dict[str, str], workdir: str) -> None:
    meta = {"env": env, "workdir": workdir, "uid_base": storage.STORAGE_ID_BASE}
    (directory / "image.json").write_text(json.dumps(meta))


def _read_image(name: str, directory: Path) -> Image:
    meta = json.loads((directory / "image.json").read_text())
    return Image(
        name=name,
        rootfs=directory / "rootfs",
        env=meta["env"],
        workdir=meta["workdir"],
        uid_base=int(meta.get("uid_base", 0)),
    )


def _recipe_digest(*parts: str) -> str:
    return _digest(STORAGE_LAYOUT, *parts)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=64)
def _credential_tag(auth: RegistryAuth) -> str:
    """What an image pulled with ``auth`` is kept apart by, standing for the password. The
    directory name holds 48 bits of a digest of its recipe and shows in a sandbox's mount table:
    with a fast hash of the password in it, a weak password could be guessed offline from the
    name. scrypt (~0.1 s here, remembered per credentials while the server runs) makes each guess
    cost as much."""
    salt = f"sandlot-registry-auth\n{auth.registry}\n{auth.username}".encode()
    return hashlib.scrypt(auth.password.encode(), salt=salt, n=2**14, r=8, p=1).hex()


def default_image_digest() -> str:
    return _recipe_digest(*default_image.recipe())


class ImageStore:
    """Finds, builds and caches images under ``root`` (``<state>/images``)."""

    def __init__(
        self,
        root: Path,
        max_pull_bytes: int | None = None,
        limits: UnpackLimits | None = None,
    ) -> None:
        self.root = root
        #: The largest image (compressed layers) a pull may bring in: a reference is user
        #: input, and an image of tens of GB would fill the host's disk.
        self.max_pull_bytes = (
            max_pull_bytes
            if max_pull_bytes is not None
            else parse_size(os.environ.get("SANDLOT_MAX_IMAGE_SIZE") or DEFAULT_MAX_PULL)
        )
        #: What one image may unpack to (SANDLOT_MAX_IMAGE_UNPACKED_SIZE, ..._FILES).
        self.limits = limits or limits_from_env()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        if self.root.is_dir():
            self._secure_root()

    def _secure_root(self) -> None:
        """Images are nobody's business but the server's: the store is 0700."""
        info = self.root.stat()
        if info.st_mode & 0o077 and info.st_uid == os.geteuid():
            self.root.chmod(0o700)

    # -- resolution ---------------------------------------------------------------------------

    def resolve(
        self,
        ref: str,
        *,
        build: bool = True,
        progress: Progress | None = None,
        auth: RegistryAuth | None = None,
    ) -> Image:
        """Return the image for ``ref``; build the built-in ones on first use when ``build``;
        ``auth`` is for a private registry image (and refused for any other kind). Every
        failure is an :class:`ImageError` whose message names no path of the server's."""
        try:
            return self._resolve(ref, build, progress, auth)
        except (OSError, ValueError) as exc:  # e.g. a full disk, an unreadable image.json
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
            raise ImageError(f"the image cannot be prepared: {reason}") from exc

    def _resolve(
        self, ref: str, build: bool, progress: Progress | None, auth: RegistryAuth | None
    ) -> Image:
        if not isinstance(ref, str) or not ref.strip():
            raise ImageError("image must be a non-empty string")
        if auth is not None:
            if not _REGISTRY_REF.fullmatch(ref) or ref in DEFAULT_IMAGE_ALIASES or ref == "busybox":
                raise ImageError(
                    f"registry_secret is for images pulled from a registry, not for {ref!r}"
                )
            return self.registry_image(ref, progress=progress, auth=auth)
        if ref in DEFAULT_IMAGE_ALIASES:
            return self.default_image(build=build, progress=progress)
        if ref == "busybox":
            return self.busybox_image()
        if ref.startswith("oci:"):
            return self.oci_image(ref[4:], progress=progress)
        if ref.startswith("/"):
            return self.rootfs_image(Path(ref))
        if _REGISTRY_REF.fullmatch(ref):
            return self.registry_image(ref, progress=progress)
        raise ImageError(
            f"unknown image {ref!r}: use 'default' (alias 'koyeb/sandbox'), 'busybox', a registry "
            "reference such as 'python:3.12-slim' or 'ghcr.io/org/app:tag' (lower case), an "
            "absolute path to a root filesystem directory, or 'oci:/path/to/layout[:tag]'"
        )

    def list(self) -> list[dict[str, str]]:
        out = []
        for meta in sorted(self.root.glob("*/image.json")):
            out.append({"name": meta.parent.name, "path": str(meta.parent / "rootfs")})
        return out

    def _check_size(self, ref: str, size: int) -> None:
        """Refuse, before pulling, an image above :attr:`max_pull_bytes` or one the disk
        cannot hold (unpacked, images are about two to three times their compressed size)."""
        if size > self.max_pull_bytes:
            raise ImageError(
                f"{ref} is {human(size)} compressed, more than this server pulls "
                f"({human(self.max_pull_bytes)}; SANDLOT_MAX_IMAGE_SIZE raises it)"
            )
        free = shutil.disk_usage(self.root).free
        if free < 3 * size + 256 * 1024**2:
            raise ImageError(
                f"not enough disk to pull {ref} ({human(size)} compressed, "
                f"{human(free)} free for images)"
            )

    def prune(self, in_use: set[Path], *, dry_run: bool = False) -> tuple[Path, ...]:
        """Remove what no sandbox can get any more and none uses (``in_use``: the rootfs paths
        sandboxes were made from, deeply asleep ones included): older versions of pulled images
        (the newest stays), default images of an older recipe, images of an older storage
        layout (owned by host root), and builds a crash left half done (over an hour old).
        Returns what was (or, with ``dry_run``, would be) removed."""
        if not self.root.is_dir():
            return ()
        used = {p.resolve() for p in in_use}
        newest: dict[str, tuple[int, Path]] = {}
        old: set[Path] = set()
        for d in self.root.iterdir():
            base, _, version = d.name.rpartition("-")
            if _old_layout(d):
                old.add(d)
            elif d.name.startswith("registry-") and version.isdigit():
                if base not in newest or newest[base][0] < int(version):
                    if base in newest:
                        old.add(newest[base][1])
                    newest[base] = (int(version), d)
                else:
                    old.add(d)
            elif _superseded(d):
                old.add(d)
        removed = tuple(d for d in sorted(old) if (d / "rootfs").resolve() not in used)
        if not dry_run:
            for d in removed:
                shutil.rmtree(d, ignore_errors=True)
        return removed

    # -- built-in images ----------------------------------------------------------------------

    def _build_atomically(self, final: Path, build: Callable[[Path], None]) -> Path:
        """Run ``build(tmpdir)`` and move the result to ``final``; never leave half an image.
        Builds of one image wait for each other (ten creates of a new registry image pull it
        once)."""
        if (final / "image.json").exists():
            return final
        with self._lock(final.name):
            return self._build_unlocked(final, build)

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def _build_unlocked(self, final: Path, build: Callable[[Path], None]) -> Path:
        if (final / "image.json").exists():
            return final
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._secure_root()
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=self.root))
        try:
            build(tmp)
            try:
                tmp.rename(final)
            except OSError:
                if not (final / "image.json").exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def default_image(self, *, build: bool = True, progress: Progress | None = None) -> Image:
        final = self.root / f"default-{default_image_digest()}"
        if not (final / "image.json").exists():
            # The same recipe stored the old way (owned by host root) is copied, not rebuilt.
            legacy = self.root / f"default-{_digest(*default_image.recipe())}"
            if not (legacy / "image.json").exists() and not build:
                raise ImageError("the default image is not built yet: run `sandlot image build`")

            def make(tmp: Path) -> None:
                if (legacy / "image.json").exists():
                    if progress:
                        progress("moving the default image to the storage user")
                    _copy_tree(legacy / "rootfs", tmp / "rootfs")
                    meta = json.loads((legacy / "image.json").read_text())
                    _write_meta(tmp, meta["env"], meta["workdir"])
                else:
                    _mmdebstrap(tmp, progress)
                storage.shift_to_storage(tmp / "rootfs")

            self._build_atomically(final, make)
        return _read_image("default", final)

    def busybox_image(self) -> Image:
        busybox = Path("/bin/busybox")
        if not busybox.exists():
            raise ImageError("the busybox image needs the host's static busybox (busybox-static)")
        st = busybox.stat()
        digest = _recipe_digest("busybox-v1", str(st.st_size), str(st.st_mtime_ns))
        final = self.root / f"busybox-{digest}"

        def build(tmp: Path) -> None:
            rootfs = tmp / "rootfs"
            for d in (
                "bin",
                "sbin",
                "usr/bin",
                "usr/sbin",
                "etc",
                "proc",
                "sys",
                "dev",
                "tmp",
                "root",
                "var/tmp",
            ):
                (rootfs / d).mkdir(parents=True, exist_ok=True)
            (rootfs / "tmp").chmod(0o1777)
            (rootfs / "var/tmp").chmod(0o1777)
            shutil.copy2(busybox, rootfs / "bin" / "busybox")
            applets = subprocess.run(
                [str(busybox), "--list-full"], capture_output=True, text=True, check=True
            ).stdout.split()
            for applet in applets:
                link = rootfs / applet
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to("/bin/busybox")
            (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
            (rootfs / "etc/group").write_text("root:x:0:\n")
            _write_meta(tmp, {"PATH": DEFAULT_PATH, "HOME": "/root"}, "/root")
            storage.shift_to_storage(rootfs)

        self._build_atomically(final, build)
        return _read_image("busybox", final)

    # -- user-supplied images -----------------------------------------------------------------

    def rootfs_image(self, path: Path) -> Image:
        """A root filesystem directory on the host, used in place (owned by host root)."""
        if not path.is_absolute():
            raise ImageError("an image path must be absolute")
        resolved = Path(os.path.realpath(path))
        if resolved == Path("/") or any(resolved.is_relative_to(p) for p in _KERNEL_DIRS):
            raise ImageError(
                "an image path must be a root filesystem directory, not the host's own root or "
                "a kernel filesystem"
            )
        if not resolved.is_dir():
            raise ImageError("the image path is not a directory")
        return Image(name=str(path), rootfs=resolved, env={"PATH": DEFAULT_PATH, "HOME": "/root"})

    def oci_image(self, spec: str, *, progress: Progress | None = None) -> Image:
        layout, tag = parse_oci(spec)
        layout_path = Path(layout)
        if not layout_path.is_absolute() or not (layout_path / "index.json").is_file():
            raise ImageError("the image is not an OCI image layout (no index.json)")
        _need("skopeo", "OCI layouts")
        _need("umoci", "OCI layouts")
        index = (layout_path / "index.json").read_bytes()
        digest = _recipe_digest(
            "oci-v1", str(layout_path.resolve()), tag, hashlib.sha256(index).hexdigest()
        )
        final = self.root / f"oci-{digest}"
        name = f"the OCI layout's image {tag!r}"

        def build(tmp: Path) -> None:
            # A copy (only the tag's blobs, digests checked) that the storage user can read.
            stage = tmp / "stage"
            stage.mkdir()
            source, target = f"oci:{layout_path}:{tag}", f"oci:{stage / 'layout'}:image"
            _skopeo(name, ["copy", "--quiet", source, target], hide=(str(layout_path), str(tmp)))
            self._unpack(stage, name, tmp, progress)

        try:
            self._build_atomically(final, build)
        except subprocess.TimeoutExpired:
            raise ImageError(f"unpacking {name} took longer than {PULL_TIMEOUT:g}s") from None
        return _read_image(spec, final)

    def registry_image(
        self,
        ref: str,
        *,
        progress: Progress | None = None,
        pull: bool = False,
        auth: RegistryAuth | None = None,
    ) -> Image:
        """``ref`` pulled from its registry and unpacked: once, then reused; ``pull=True`` pulls
        again into a new version (the versions in use stay where they are: sandboxes, also
        deeply asleep ones, refer to their image's directory). Images pulled with credentials
        are kept apart per credentials, so that nobody without them gets a private image from
        this cache."""
        match = _REGISTRY_REF.fullmatch(ref)
        if match is None:
            raise ImageError(f"{ref!r} is not a registry reference (such as 'python:3.12-slim')")
        host = registry_host(ref)
        if auth is not None and auth.registry != host:  # both as registry_host() spells them
            raise ImageError(
                f"the registry secret is for {auth.registry}, not for {host} (the image's registry)"
            )
        _need("skopeo", "pulling images from registries")
        _need("umoci", "pulling images from registries")
        key = ["registry-v1", ref]
        if auth is not None:
            key += ["scrypt", auth.registry, auth.username, _credential_tag(auth)]
        base = f"registry-{_recipe_digest(*key)}"
        with self._lock(base):
            versions = sorted(
                (int(d.name.rsplit("-", 1)[1]), d)
                for d in self.root.glob(f"{base}-*")
                if d.name.rsplit("-", 1)[1].isdigit() and (d / "image.json").exists()
            )
            if versions and not pull:
                return _read_image(ref, versions[-1][1])
            final = self.root / f"{base}-{versions[-1][0] + 1 if versions else 1}"
            name, _, port = host.rpartition(":")
            plain_http = (name if port.isdigit() else host) in _PLAIN_HTTP_HOSTS

            def build(tmp: Path) -> None:
                stage = tmp / "stage"
                stage.mkdir()
                if progress:
                    progress(f"pulling {ref}")
                flags: list[str] = []
                if plain_http:
                    flags.append("--tls-verify=false")
                if auth is not None:  # in a 0600 file, never on a command line
                    authfile = tmp / "auth.json"
                    authfile.touch(mode=0o600)
                    token = base64.b64encode(f"{auth.username}:{auth.password}".encode())
                    authfile.write_text(json.dumps({"auths": {host: {"auth": token.decode()}}}))
                    flags += ["--authfile", str(authfile)]
                try:
                    self._check_size(ref, _compressed_size(ref, flags, hide=(str(tmp),)))
                    copy_flags = [f.replace("--", "--src-", 1) for f in flags]
                    source, target = f"docker://{ref}", f"oci:{stage / 'layout'}:image"
                    _skopeo(
                        ref,
                        ["copy", "--quiet", "--retry-times", "2", *copy_flags, source, target],
                        hide=(str(tmp),),
                    )
                finally:
                    if auth is not None:
                        (tmp / "auth.json").unlink(missing_ok=True)
                self._unpack(stage, ref, tmp, progress)

            try:
                self._build_unlocked(final, build)
            except subprocess.TimeoutExpired:
                raise ImageError(f"pulling {ref} took longer than {PULL_TIMEOUT:g}s") from None
        return _read_image(ref, final)

    def _unpack(self, stage: Path, name: str, tmp: Path, progress: Progress | None) -> None:
        """Unpack ``stage/layout:image`` into ``tmp/rootfs`` as the storage user, once its
        layers are known to fit (:func:`~sandlot.images.layers.measure`), and write its
        environment and working directory (from the image's config) next to it."""
        if progress:
            progress(f"unpacking {name}")
        measure(stage / "layout", "image", self.limits, name)
        storage.make_readable(stage / "layout")
        storage.give_to_storage(stage)
        result = storage.run_as_storage(
            ["umoci", "unpack", "--image", "layout:image", "bundle"], stage, PULL_TIMEOUT
        )
        if result.returncode != 0:
            raise ImageError(f"cannot unpack {name}: {_tool_error(result.stderr, str(tmp))}")
        # What the unpacker left is the storage user's: trusted as data, never as a link.
        bundle = stage / "bundle"
        if not _is_real_dir(bundle / "rootfs") or (bundle / "config.json").is_symlink():
            raise ImageError(f"cannot unpack {name}: the unpacker left no root filesystem")
        (bundle / "rootfs").rename(tmp / "rootfs")
        config = read_json(bundle / "config.json")
        process = config.get("process") if isinstance(config, dict) else None
        process = process if isinstance(process, dict) else {}
        variables = process.get("env")
        pairs = (str(e).partition("=") for e in (variables if isinstance(variables, list) else []))
        env = {k: v for k, sep, v in pairs if sep and k}
        env.setdefault("PATH", DEFAULT_PATH)
        cwd = process.get("cwd")
        _write_meta(tmp, env, cwd if isinstance(cwd, str) and cwd.startswith("/") else "/")
        shutil.rmtree(stage)


def _skopeo(ref: str, args: list[str], hide: tuple[str, ...] = ()) -> str:
    """Run skopeo; its error (with the paths in ``hide`` left out) is the message."""
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=PULL_TIMEOUT)
    if result.returncode != 0:
        raise ImageError(f"cannot pull {ref}: {_tool_error(result.stderr, *hide)}")
    return result.stdout


def _compressed_size(ref: str, flags: list[str], hide: tuple[str, ...] = ()) -> int:
    """The sum of the image's compressed layers, from its manifest (for an index: the manifest
    of this machine's platform), read before anything is pulled."""
    try:
        inspect = ["inspect", "--raw", *flags]
        manifest = json.loads(_skopeo(ref, [*inspect, f"docker://{ref}"], hide))
        if "manifests" in manifest:  # an index / manifest list
            arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(
                platform.machine(), platform.machine()
            )
            chosen = [
                m["digest"]
                for m in manifest["manifests"]
                if (m.get("platform") or {}).get("os") == "linux"
                and (m.get("platform") or {}).get("architecture") == arch
            ]
            if not chosen:
                raise ImageError(f"{ref} has no image for linux/{arch}")
            match = _REGISTRY_REF.fullmatch(ref)
            assert match is not None
            name = (
                f"{match.group('host')}/{match.group('path')}"
                if match.group("host")
                else (match.group("path"))
            )
            manifest = json.loads(_skopeo(ref, [*inspect, f"docker://{name}@{chosen[0]}"], hide))
        return sum(int(layer.get("size") or 0) for layer in manifest.get("layers") or [])
    except (ValueError, AttributeError, TypeError, KeyError):
        raise ImageError(f"cannot pull {ref}: its registry's manifest is not readable") from None


def parse_oci(spec: str) -> tuple[str, str]:
    """``PATH[:TAG]`` (what follows ``oci:``) → (PATH, TAG); the tag defaults to ``latest``."""
    layout, _, tag = spec.partition(":")
    return layout, tag or "latest"


def host_path(ref: str) -> str | None:
    """The host path an image reference names (a root filesystem directory, or an OCI layout
    with ``oci:``), or None for the built-in and registry images."""
    if ref.startswith("oci:"):
        return parse_oci(ref[4:])[0]
    if ref.startswith("/"):
        return ref
    return None


def _copy_tree(source: Path, target: Path) -> None:
    """A copy keeping owners, modes, links and extended attributes (file capabilities)."""
    result = subprocess.run(
        ["cp", "-a", "--reflink=auto", str(source), str(target)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ImageError(f"copying an image failed: {_tool_error(result.stderr, str(source))}")


def _is_real_dir(path: Path) -> bool:
    return not path.is_symlink() and path.is_dir()


def _old_layout(d: Path) -> bool:
    """An image of the storage layout before :data:`STORAGE_LAYOUT` (owned by host root)."""
    if d.name.startswith(".") or not (d / "image.json").is_file():
        return False
    try:
        return int(json.loads((d / "image.json").read_text()).get("uid_base", 0)) == 0
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def _superseded(d: Path) -> bool:
    """A default image of an older recipe, or a build a crash left (over an hour old)."""
    if d.name.startswith("default-"):
        return d.name != f"default-{default_image_digest()}"
    return d.name.startswith(".build-") and time.time() - d.stat().st_mtime > 3600


def pulls_from(ref: str) -> str | None:
    """The registry host (``host[:port]``) an image reference would be pulled from, or None for
    the built-in images and host paths."""
    if ref in DEFAULT_IMAGE_ALIASES or ref == "busybox" or host_path(ref) is not None:
        return None
    return registry_host(ref) if _REGISTRY_REF.fullmatch(ref) else None


def is_registry_host(text: str) -> bool:
    """``text`` names a registry the way :func:`registry_host` spells one (``ghcr.io``,
    ``localhost:5000``, ``docker.io``), so that credentials for it can be matched to images."""
    return "/" not in text and registry_host(f"{text}/x") == text


def registry_host(ref: str) -> str:
    """The registry a reference pulls from, as skopeo's auth files name it (Docker Hub:
    ``docker.io``)."""
    match = _REGISTRY_REF.fullmatch(ref)
    host = (match.group("host") if match else None) or "docker.io"
    return "docker.io" if host in ("index.docker.io", "registry-1.docker.io") else host


#: ``[host[:port]/]path[:tag][@digest]`` -- Docker's reference grammar: the first component is a
#: registry host when it has a dot or a port or is ``localhost``; paths are lower case.
_REGISTRY_REF = re.compile(
    r"(?:(?P<host>(?:localhost|\[[0-9a-f:]+\]|[a-z0-9-]+(?:\.[a-z0-9-]+)+)(?::[0-9]+)?"
    r"|[a-z0-9-]+:[0-9]+)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
_PLAIN_HTTP_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
PULL_TIMEOUT = 600.0
DEFAULT_MAX_PULL = "10G"


#: Where the kernel's own filesystems live: never an image.
_KERNEL_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))


def _need(tool: str, what: str) -> None:
    if shutil.which(tool) is None:
        raise ImageError(f"{what} needs {tool}: install the Debian package '{tool}'")


def _tool_error(stderr: str, *hide: str) -> str:
    """A tool's last line, without its log prefix: the reason ("manifest unknown", ...), with
    the host paths in ``hide`` (working directories, the user's layout) left out."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "failed"
    last = re.sub(r'^time="[^"]*" level=\w+ msg="(.*)"$', r"\1", last)
    last = last.lstrip("\u2022 ").removeprefix("Error: ").strip()
    for path in sorted(filter(None, hide), key=len, reverse=True):
        last = last.replace(path.rstrip("/") + "/", "").replace(path, "<image>")
    return last


def _mmdebstrap(tmp: Path, progress: Progress | None) -> None:
    if shutil.which("mmdebstrap") is None:
        raise ImageError("building the default image needs mmdebstrap: apt-get install mmdebstrap")
    rootfs = tmp / "rootfs"
    if progress:
        progress(f"fetching uv {default_image.UV_VERSION}")
    wheels = tmp / "wheels"
    wheels.mkdir()
    cmd = default_image.mmdebstrap_command(rootfs, default_image.fetch_uv(wheels))
    if progress:
        progress(f"building the default image (Debian {default_image.SUITE}) with mmdebstrap ...")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = [*tail[-20:], line.rstrip()]
        if progress and line.startswith("I: "):
            progress(line[3:].rstrip())
    if proc.wait() != 0:
        raise ImageError("mmdebstrap failed building the default image:\n" + "\n".join(tail))
    shutil.rmtree(wheels)
    _write_meta(tmp, dict(default_image.ENV), default_image.WORKDIR)
    if progress:
        size = sum(
            f.stat().st_size for f in rootfs.rglob("*") if f.is_file() and not f.is_symlink()
        )
        progress(f"default image ready ({size / 2**20:.0f} MiB)")


def default_store() -> ImageStore:
    from sandlot.paths import images_dir

    return ImageStore(images_dir())


__all__ = ["DEFAULT_IMAGE_ALIASES", "Image", "ImageStore", "default_store"]
