"""Images: read-only root filesystems that sandboxes are created from.

An image is a directory holding ``rootfs/`` and ``image.json`` (its environment and working
directory). Image rootfs trees are shared read-only by every sandbox made from them (each sandbox
writes to its own overlay upper directory), so nothing here is ever modified after it is built.

Image references a user can give:

- ``default`` or ``koyeb/sandbox`` -- the default image (Debian bookworm with python3, pip, git,
  curl, ...), built locally once with mmdebstrap, rebuilt only when its recipe changes;
- ``busybox`` -- a tiny image made from the host's static busybox (no Python in it at all);
- an absolute path to a root filesystem directory;
- ``oci:PATH[:TAG]`` -- an OCI image layout on disk (unpacked with umoci);
- a registry reference, as Docker spells it (``python:3.12-slim``, ``ghcr.io/org/app:v1``,
  ``127.0.0.1:5000/team/tool@sha256:...``): pulled once with skopeo into an OCI layout, then
  unpacked like one. Later uses reuse the pull (as Docker's default "pull if missing");
  ``sandlot image pull REF`` pulls again. Registries on ``localhost``/``127.0.0.1``/``[::1]``
  are spoken to over plain HTTP, as Docker does.
"""

from __future__ import annotations

import base64
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

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_IMAGE_ALIASES = frozenset({"default", "koyeb/sandbox", "koyeb/sandbox:latest"})

#: What the default image holds: what a user of koyeb/sandbox or E2B's base image expects.
DEFAULT_IMAGE_PACKAGES = (
    "python3",
    "python3-pip",
    "python3-venv",
    "git",
    "curl",
    "wget",
    "ca-certificates",
    "procps",
    "unzip",
    "xz-utils",
    "bzip2",
    "jq",
    "less",
    "file",
    "iproute2",
    "vim-tiny",
)
DEBIAN_SUITE = "bookworm"
DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Image:
    name: str
    rootfs: Path
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    workdir: str = "/"


def _write_meta(directory: Path, env: dict[str, str], workdir: str) -> None:
    (directory / "image.json").write_text(json.dumps({"env": env, "workdir": workdir}))


def _read_image(name: str, directory: Path) -> Image:
    meta = json.loads((directory / "image.json").read_text())
    return Image(name=name, rootfs=directory / "rootfs", env=meta["env"], workdir=meta["workdir"])


def _recipe_digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def default_image_digest() -> str:
    return _recipe_digest("default-v1", DEBIAN_SUITE, *DEFAULT_IMAGE_PACKAGES, *DEBIAN_SOURCES)


class ImageStore:
    """Finds, builds and caches images under ``root`` (``<state>/images``)."""

    def __init__(self, root: Path, max_pull_bytes: int | None = None) -> None:
        self.root = root
        #: The largest image (compressed layers) a pull may bring in: a reference is user
        #: input, and an image of tens of GB would fill the host's disk.
        self.max_pull_bytes = (
            max_pull_bytes
            if max_pull_bytes is not None
            else parse_size(os.environ.get("SANDLOT_MAX_IMAGE_SIZE") or DEFAULT_MAX_PULL)
        )
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

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
        ``auth`` is for a private registry image (and refused for any other kind)."""
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
                f"{ref} is {_human(size)} compressed, more than this server pulls "
                f"({_human(self.max_pull_bytes)}; SANDLOT_MAX_IMAGE_SIZE raises it)"
            )
        free = shutil.disk_usage(self.root).free
        if free < 3 * size + 256 * 1024**2:
            raise ImageError(
                f"not enough disk to pull {ref} ({_human(size)} compressed, "
                f"{_human(free)} free under {self.root})"
            )

    def prune(self, in_use: set[Path], *, dry_run: bool = False) -> tuple[Path, ...]:
        """Remove what no sandbox can get any more and none uses (``in_use``: the rootfs paths
        sandboxes were made from, deeply asleep ones included): older versions of pulled images
        (the newest stays), default images of an older recipe, and builds a crash left half
        done (over an hour old). Returns what was (or, with ``dry_run``, would be) removed."""
        if not self.root.is_dir():
            return ()
        used = {p.resolve() for p in in_use}
        newest: dict[str, tuple[int, Path]] = {}
        old: set[Path] = set()
        for d in self.root.iterdir():
            base, _, version = d.name.rpartition("-")
            if d.name.startswith("registry-") and version.isdigit():
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
        self.root.mkdir(parents=True, exist_ok=True)
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
            if not build:
                raise ImageError("the default image is not built yet: run `sandlot image build`")
            self._build_atomically(final, lambda tmp: _mmdebstrap(tmp, progress))
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

        self._build_atomically(final, build)
        return _read_image("busybox", final)

    # -- user-supplied images -----------------------------------------------------------------

    def rootfs_image(self, path: Path) -> Image:
        if not path.is_dir():
            raise ImageError(f"image {str(path)!r} is not a directory")
        return Image(name=str(path), rootfs=path, env={"PATH": DEFAULT_PATH, "HOME": "/root"})

    def oci_image(self, spec: str, *, progress: Progress | None = None) -> Image:
        layout, _, tag = spec.partition(":")
        tag = tag or "latest"
        layout_path = Path(layout)
        if not (layout_path / "index.json").is_file():
            raise ImageError(f"{layout!r} is not an OCI image layout (no index.json)")
        _need("umoci", "OCI layouts")
        index = (layout_path / "index.json").read_bytes()
        digest = _recipe_digest(
            "oci-v1", str(layout_path.resolve()), tag, hashlib.sha256(index).hexdigest()
        )
        final = self.root / f"oci-{digest}"
        self._build_atomically(final, lambda tmp: _unpack(layout_path, tag, tmp, progress))
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
            key += [auth.registry, auth.username, auth.password]
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
                layout = tmp / "layout"
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
                    self._check_size(ref, _compressed_size(ref, flags))
                    copy_flags = [f.replace("--", "--src-", 1) for f in flags]
                    source, target = f"docker://{ref}", f"oci:{layout}:image"
                    _skopeo(
                        ref, ["copy", "--quiet", "--retry-times", "2", *copy_flags, source, target]
                    )
                finally:
                    if auth is not None:
                        (tmp / "auth.json").unlink(missing_ok=True)
                _unpack(layout, "image", tmp, progress)
                shutil.rmtree(layout, ignore_errors=True)

            try:
                self._build_unlocked(final, build)
            except subprocess.TimeoutExpired:
                raise ImageError(f"pulling {ref} took longer than {PULL_TIMEOUT:g}s") from None
        return _read_image(ref, final)


def _skopeo(ref: str, args: list[str]) -> str:
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=PULL_TIMEOUT)
    if result.returncode != 0:
        raise ImageError(f"cannot pull {ref}: {_skopeo_error(result.stderr)}")
    return result.stdout


def _compressed_size(ref: str, flags: list[str]) -> int:
    """The sum of the image's compressed layers, from its manifest (for an index: the manifest
    of this machine's platform), read before anything is pulled."""
    try:
        manifest = json.loads(_skopeo(ref, ["inspect", "--raw", *flags, f"docker://{ref}"]))
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
            manifest = json.loads(
                _skopeo(ref, ["inspect", "--raw", *flags, f"docker://{name}@{chosen[0]}"])
            )
        return sum(int(layer.get("size") or 0) for layer in manifest.get("layers") or [])
    except (ValueError, AttributeError, TypeError, KeyError):
        raise ImageError(f"cannot pull {ref}: its registry's manifest is not readable") from None


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``2048`` (bytes) → bytes."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 10G, 512M)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(match.group(1)) << (10 * power)


def _superseded(d: Path) -> bool:
    """A default image of an older recipe, or a build a crash left (over an hour old)."""
    if d.name.startswith("default-"):
        return d.name != f"default-{default_image_digest()}"
    return d.name.startswith(".build-") and time.time() - d.stat().st_mtime > 3600


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


def _human(n: int) -> str:
    """1536 → "1.5 KiB"."""
    value, units = float(n), ["B", "KiB", "MiB", "GiB"]
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{n} B" if units[0] == "B" else f"{value:.1f} {units[0]}"


def _need(tool: str, what: str) -> None:
    if shutil.which(tool) is None:
        raise ImageError(f"{what} needs {tool}: install the Debian package '{tool}'")


def _skopeo_error(stderr: str) -> str:
    """skopeo's last line, without its log prefix: the reason ("manifest unknown", ...)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "skopeo failed"
    last = re.sub(r'^time="[^"]*" level=\w+ msg="(.*)"$', r"\1", last)
    return last.removeprefix("Error: ").strip()


def _unpack(layout: Path, tag: str, tmp: Path, progress: Progress | None) -> None:
    """Unpack ``layout:tag`` into ``tmp/rootfs`` and write its environment and working
    directory (from the image's config) next to it."""
    if progress:
        progress(f"unpacking {layout.name}:{tag}")
    unpacked = tmp / "bundle"
    result = subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{tag}", str(unpacked)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise ImageError(f"cannot unpack {layout}:{tag}: {result.stderr.strip()}")
    (unpacked / "rootfs").rename(tmp / "rootfs")
    config = json.loads((unpacked / "config.json").read_text())
    process = config.get("process", {})
    env = dict(e.split("=", 1) for e in process.get("env", []) if "=" in e)
    env.setdefault("PATH", DEFAULT_PATH)
    _write_meta(tmp, env, process.get("cwd") or "/")
    shutil.rmtree(unpacked, ignore_errors=True)


def _mmdebstrap(tmp: Path, progress: Progress | None) -> None:
    if shutil.which("mmdebstrap") is None:
        raise ImageError("building the default image needs mmdebstrap: apt-get install mmdebstrap")
    rootfs = tmp / "rootfs"
    cmd = [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={','.join(DEFAULT_IMAGE_PACKAGES)}",
        "--components=main",
        # Keep the image lean: no apt lists, docs or man pages.
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*",
        DEBIAN_SUITE,
        str(rootfs),
        *DEBIAN_SOURCES,
    ]
    if progress:
        progress(f"building the default image (Debian {DEBIAN_SUITE}) with mmdebstrap ...")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = [*tail[-20:], line.rstrip()]
        if progress and line.startswith("I: "):
            progress(line[3:].rstrip())
    if proc.wait() != 0:
        raise ImageError("mmdebstrap failed building the default image:\n" + "\n".join(tail))
    _write_meta(tmp, {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}, "/root")
    if progress:
        size = sum(
            f.stat().st_size for f in rootfs.rglob("*") if f.is_file() and not f.is_symlink()
        )
        progress(f"default image ready ({size / 2**20:.0f} MiB)")


def default_store() -> ImageStore:
    from sandlot.paths import images_dir

    return ImageStore(images_dir())


__all__ = ["DEFAULT_IMAGE_ALIASES", "Image", "ImageStore", "default_store"]
