"""The default image's recipe: Debian bookworm with what users of Koyeb's, E2B's and Daytona's
default images run first -- ``pip install``, ``uv``, a C toolchain for sdists, Node.js and npm.

Built once with mmdebstrap (a rootfs from Debian's packages, no container engine) and cached by a
digest of this recipe (:func:`recipe`): changing anything here builds a new image beside the old
one, which ``sandlot image prune`` removes once unused.

Why each departure from plain Debian:

- **No PEP 668 marker.** Debian's python3 ships ``/usr/lib/python3.11/EXTERNALLY-MANAGED``, so
  ``pip install x`` (and ``pip install --user x``, ``uv pip install --system x``) refuses with
  "externally-managed-environment". The peers' images (based on python.org's Python) have no
  marker, and a sandbox is a throwaway machine where protecting apt's Python packages from pip
  matters less than the user's first command working. The marker is kept out with a dpkg
  ``path-exclude`` rather than deleted after the fact, so it also stays out when a user
  upgrades python3 with apt inside a sandbox; and rather than ``break-system-packages`` in
  pip.conf, which only pip reads (uv reads the marker itself). Debian's pip still installs
  into ``/usr/local`` (root) or ``~/.local`` (other users, automatically), never over the
  files apt installed under ``/usr/lib/python3/dist-packages``.
- **uv**, which Debian 12 does not package: its PyPI wheel (a static binary) is fetched on the
  host by the host's pip, with the version pinned and the wheel's sha256 checked by pip's hash
  mode (:data:`UV_REQUIREMENT`), then installed in the image by the image's own pip, offline.
  The host's pip configuration applies (index, find-links, certificates): a host without
  PyPI builds the image from its own mirror.
- **build-essential, python3-dev** (wheels without binaries build), **nodejs, npm** (Debian's:
  Node.js 18, npm 9), and ``python`` as a name for python3 (python-is-python3), as in the
  peers' images.

Measured on a 2-core VM, fresh (nothing cached): the build takes 2 to 4 minutes (this recipe:
3 min 55 s, mmdebstrap 226 s, with the host's load average at 34 from other work; the same
packages took 2 min 0 s on a quieter host) and the image is 818 MB on disk (``du``), against
307 MB for the first recipe (python3 and tools only): gcc 120 MB, Debian's Node.js modules
144 MB, uv 38 MB.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from sandlot.engines.base import ImageError

#: What the default image holds: what a user of koyeb/sandbox or E2B's base image expects.
PACKAGES = (
    "python3",
    "python3-pip",
    "python3-venv",
    "python-is-python3",
    "python3-dev",
    "build-essential",
    "nodejs",
    "npm",
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
SUITE = "bookworm"
SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
#: uv from PyPI, pinned: one hash per wheel pip may pick (x86_64 and aarch64 Linux).
UV_VERSION = "0.13.8"
UV_REQUIREMENT = (
    f"uv=={UV_VERSION}"
    " --hash=sha256:e18a57b8b352eb7c8feb317b9f6f533c8f0ad9673fd6cf34bbe3cf1a9f6a8984"
    " --hash=sha256:0b3e8b1a4f5e405e31e2ff33de8af4744831e9f7338539671efbd8c3c94e791d"
)
#: dpkg options kept in the image (/etc/dpkg/dpkg.cfg.d): lean, and no PEP 668 marker.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-exclude=/usr/share/info/*",
    # Messages in English only (LANG=C.UTF-8): 64 MB of translations, mostly gcc's.
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/lib/python3*/EXTERNALLY-MANAGED",
)
#: The image's environment and working directory.
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
WORKDIR = "/root"


def recipe() -> tuple[str, ...]:
    """Everything that makes the image what it is: its digest names the image's directory."""
    return ("default-v2", SUITE, *PACKAGES, *SOURCES, UV_REQUIREMENT, *DPKG_OPTIONS)


def fetch_uv(directory: Path) -> Path:
    """Download uv's wheel for this machine into ``directory`` with the host's pip (its index
    and certificates are the host's configuration); pip checks the pinned hash."""
    requirements = directory / "uv-requirements.txt"
    requirements.write_text(UV_REQUIREMENT + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-cache-dir"]
    cmd += [
        "--only-binary=:all:",
        "--require-hashes",
        "-r",
        str(requirements),
        "-d",
        str(directory),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wheels = sorted(directory.glob("uv-*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise ImageError(f"cannot fetch uv {UV_VERSION} from the Python package index:\n{tail}")
    return wheels[0]


def mmdebstrap_command(rootfs: Path, uv_wheel: Path) -> list[str]:
    """The build: Debian's packages, then uv installed from its wheel by the image's pip."""
    inside = f"/tmp/{uv_wheel.name}"
    install_uv = (
        'chroot "$1" python3 -m pip install --quiet --no-index --no-deps --no-cache-dir '
        f"--root-user-action=ignore {shlex.quote(inside)}"
        f' && rm -f "$1"{shlex.quote(inside)}'
    )
    return [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        "--components=main",
        *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
        f"--customize-hook=copy-in {shlex.quote(str(uv_wheel))} /tmp",
        f"--customize-hook={install_uv}",
        # No apt lists or caches.
        "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*",
        SUITE,
        str(rootfs),
        *SOURCES,
    ]
