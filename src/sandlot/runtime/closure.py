"""The agent runtime: a self-contained, read-only Python closure mounted into every sandbox.

Why: the agent must reach every sandbox without help from its image -- a busybox rootfs with no
Python works as well as the default image, and a user who breaks the image's own python3 (pip
installs, removals) cannot break the agent. The closure is Debian's python3.11 binary, its standard
library (tests and GUI toolkits dropped), every shared library they load and the dynamic loader,
with the binary's interpreter and rpath rewritten (patchelf) to point inside the closure so it
runs without any environment variable that would leak into user commands. The sandbox's pid 1 is
``sandlot-init`` (the shell script beside this module, run by Debian's static busybox), which
keeps the agent running: it restarts it whenever it dies.

Nothing the sandbox writes may change the code the agent runs, yet a stock loader and libc read
files of the sandbox's own filesystem: ``/etc/ld.so.preload`` (libraries loaded into every
program), ``/etc/ld.so.cache`` and the system library directories (where a ``dlopen`` of a
library the closure lacks ends up), the locale archive and the gconv modules (a locale's
charset names a gconv module, which is ``dlopen``ed). So the closure's copies of the loader and
libc are patched: each of those built-in paths is replaced by a path of the same length under
``/sys`` (read-only sysfs, which never holds such files; the engine checks before every start
that ``/sys`` is a real directory for sysfs to be mounted on). The libraries glibc loads by name
on its own (``libgcc_s`` for thread unwinding) ship in the closure, found first through its
rpath. An empty ``python311.zip`` stops Python's search for its prefix inside the runtime (it
went on up to ``/.sandlot/lib``, where the sandbox could put a standard library of its own).
The agent runs with ``-I -S`` (no ``PYTHON*`` variables, no site, no current directory on
``sys.path``), ``-X utf8`` and ``LC_ALL=C`` (no locale files at all); libc's
``/etc/localtime`` is patched away too (the agent keeps UTC and parses no sandbox file).

Layout, mounted at :data:`sandlot.paths.SANDBOX_RUNTIME_DIR`::

    bin/sandlot-init                 (pid 1: a busybox shell script, see the file beside this one)
    bin/busybox                      (static: runs sandlot-init)
    bin/sandlot-checkpoint           (gVisor: runsc's save/restore hook, a busybox script)
    bin/sandlot-agent                (a link to python/bin/python3: the name ps shows)
    python/bin/python3               (patched interpreter, runs with -I)
    python/lib/ld-linux-x86-64.so.2  (loader) and the .so files
    python/lib/python3.11/...        (stdlib; the agent package lives here as ``sandlot.agent``)

The directory name is a digest of its inputs, so a changed agent or Python yields a new runtime
and running sandboxes keep the one they were started with.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sandlot.paths import SANDBOX_RUNTIME_DIR

#: Debian's python3.11 (package python3.11-minimal + libpython3.11-stdlib).
HOST_PYTHON = Path("/usr/bin/python3.11")
HOST_BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
INIT_SCRIPT = Path(__file__).with_name("sandlot-init")
#: runsc's save/restore hook in gVisor sandboxes (see sandlot.agent.checkpoint).
CHECKPOINT_SCRIPT = Path(__file__).with_name("sandlot-checkpoint")
HOST_STDLIB = Path("/usr/lib/python3.11")
PY_VERSION = "python3.11"
#: The names of the sandbox's pid 1 and of its agent, as ``ps`` and ``pkill`` see them.
INIT_NAME = "sandlot-init"
AGENT_NAME = "sandlot-agent"

#: Standard-library parts the agent never needs; dropping them keeps the closure small.
_STDLIB_EXCLUDE = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "distutils",
    "pydoc_data",
    "site-packages",
    "dist-packages",
    "config-3.11-x86_64-linux-gnu",
    "EXTERNALLY-MANAGED",
}
#: ``nis`` is dropped for what it links: libtirpc and Kerberos, which read /etc/krb5.conf (and
#: load the plugins it names) from the sandbox's filesystem.
_DYNLOAD_EXCLUDE = re.compile(r"^(_test|xx|_xx|_ctypes_test|_curses|readline|_tkinter|nis\.)")

_AGENT_PACKAGE = Path(__file__).resolve().parent.parent / "agent"

#: Libraries glibc ``dlopen``s by name on its own (not listed by ldd): ``pthread_exit`` and
#: ``pthread_cancel`` load the unwinder.
_IMPLICIT_LIBRARIES = ("libgcc_s.so.1",)


def _same_length(old: str, new: str) -> tuple[bytes, bytes]:
    if len(old) != len(new):
        raise ValueError(f"{old!r} and {new!r} differ in length")
    return old.encode() + b"\0", new.encode() + b"\0"


def _loader_patches(triplet: str) -> list[tuple[bytes, bytes]]:
    """The loader's built-in paths of sandbox-writable files, and their replacements. The
    system directories are one block of NUL-separated strings whose lengths the loader keeps
    in a separate table, hence the same lengths."""
    dirs_old = f"/lib/{triplet}/\0/usr/lib/{triplet}/\0/lib/\0/usr/lib/"
    dirs_new = f"/sys/{triplet}/\0/sys/lib/{triplet}/\0/sys/\0/sys/lib/"
    return [
        _same_length("/etc/ld.so.preload", "/sys/ld.so.preload"),
        _same_length("/etc/ld.so.cache", "/sys/ld.so.cache"),
        _same_length(dirs_old, dirs_new),
    ]


def _libc_patches(triplet: str) -> list[tuple[bytes, bytes]]:
    """libc's built-in paths of code it may load from the sandbox's filesystem (gconv modules,
    named by a locale's charset) and of the locales themselves."""
    return [
        _same_length("/usr/lib/locale", "/sys/lib/locale"),
        _same_length("/etc/localtime", "/sys/localtime"),  # the agent keeps UTC
        _same_length("/usr/lib/locale/locale-archive", "/sys/lib/locale/locale-archive"),
        _same_length(f"/usr/lib/{triplet}/gconv", f"/sys/lib/{triplet}/gconv"),
        _same_length(
            f"/usr/lib/{triplet}/gconv/gconv-modules.cache",
            f"/sys/lib/{triplet}/gconv/gconv-modules.cache",
        ),
    ]


def _libcrypto_patches(triplet: str) -> list[tuple[bytes, bytes]]:
    """OpenSSL's configuration (``openssl.cnf`` under OPENSSLDIR names providers and engines to
    load: code) and its module directories."""
    return [
        _same_length("/usr/lib/ssl", "/sys/lib/ssl"),
        _same_length(f"/usr/lib/{triplet}/engines-3", f"/sys/lib/{triplet}/engines-3"),
        _same_length(f"/usr/lib/{triplet}/ossl-modules", f"/sys/lib/{triplet}/ossl-modules"),
    ]


def patch_paths(binary: Path, patches: list[tuple[bytes, bytes]]) -> None:
    """Replace every occurrence of each NUL-terminated string; each must occur (a glibc that
    keeps its paths elsewhere must fail the build, not yield an agent that reads them)."""
    data = binary.read_bytes()
    for old, new in patches:
        if old not in data:
            raise RuntimeBuildError(f"{binary.name}: built-in path {old[:-1]!r} not found")
        data = data.replace(old, new)
    binary.write_bytes(data)


class RuntimeBuildError(RuntimeError):
    """The closure cannot be built on this host (missing python3.11 or patchelf)."""


def _require(path: Path, package: str) -> None:
    if not path.exists():
        raise RuntimeBuildError(f"{path} is missing: install the Debian package {package!r}")


def _agent_files() -> list[Path]:
    return sorted(
        p
        for p in _AGENT_PACKAGE.rglob("*")
        if p.is_file() and p.suffix != ".pyc" and "__pycache__" not in p.parts
    )


def runtime_digest() -> str:
    """Digest of everything the closure is made of (cheap: stat of big files, content of ours)."""
    h = hashlib.sha256(b"sandlot-runtime-v2")
    for big in (HOST_PYTHON, HOST_BUSYBOX):
        st = big.stat()
        h.update(f"{big}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(INIT_SCRIPT.read_bytes())
    h.update(CHECKPOINT_SCRIPT.read_bytes())
    h.update(str(sorted(_STDLIB_EXCLUDE)).encode())
    h.update(Path(__file__).read_bytes())
    for f in _agent_files():
        h.update(str(f.relative_to(_AGENT_PACKAGE)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _shared_libraries(binaries: list[Path]) -> dict[str, Path]:
    """Map soname -> host path for every library the binaries load (via ldd)."""
    libs: dict[str, Path] = {}
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            line = line.strip()
            m = re.match(r"(\S+) => (/\S+)", line)
            if m:
                libs[m.group(1)] = Path(m.group(2))
            elif line.startswith("/"):
                path = Path(line.split()[0])
                libs[path.name] = path
    return libs


def _copy_stdlib(dest: Path) -> None:
    def ignore(directory: str, names: list[str]) -> set[str]:
        if Path(directory) == HOST_STDLIB:
            return {n for n in names if n in _STDLIB_EXCLUDE}
        if Path(directory).name == "lib-dynload":
            return {n for n in names if _DYNLOAD_EXCLUDE.match(n)}
        return set()

    # copy2 keeps mtimes, which the shipped .pyc files are validated against.
    shutil.copytree(HOST_STDLIB, dest, ignore=ignore, symlinks=False, copy_function=shutil.copy2)


def _install_agent(stdlib_dest: Path) -> None:
    package = stdlib_dest / "sandlot"
    package.mkdir()
    # A bare package: the real sandlot/__init__.py belongs to the host-side SDK.
    (package / "__init__.py").write_text('"""sandlot agent runtime (standard library only)."""\n')
    shutil.copytree(
        _AGENT_PACKAGE, package / "agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    # The runtime is mounted read-only: compile now so start-up never recompiles.
    subprocess.run([str(HOST_PYTHON), "-I", "-m", "compileall", "-q", str(package)], check=True)


def build_runtime(root: Path, *, log: object = None) -> Path:
    """Return the runtime directory for the current inputs, building it if needed.

    Building is atomic (a temporary sibling renamed into place), so concurrent callers and
    crashes never leave a half-built runtime behind that would later be used.
    """
    _require(HOST_PYTHON, "python3.11-minimal")
    _require(HOST_STDLIB / "os.py", "libpython3.11-stdlib")
    _require(HOST_BUSYBOX, "busybox-static")
    if shutil.which("patchelf") is None:
        raise RuntimeBuildError("patchelf is missing: install the Debian package 'patchelf'")

    final = root / runtime_digest()
    if (final / "python" / "bin" / "python3").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        pydir = tmp / "python"
        libdir = pydir / "lib"
        (pydir / "bin").mkdir(parents=True)
        libdir.mkdir()
        (tmp / "bin").mkdir()
        stdlib = libdir / PY_VERSION
        _copy_stdlib(stdlib)
        _install_agent(stdlib)
        # Python finds its prefix by looking for lib/python311.zip in each parent of its
        # executable's directory, up to /.sandlot/lib -- which the sandbox can write: a zip
        # there became the agent's standard library. An empty one here ends the search.
        zipfile.ZipFile(libdir / f"{PY_VERSION.replace('.', '')}.zip", "w").close()

        dynload = sorted((stdlib / "lib-dynload").glob("*.so"))
        libs = _shared_libraries([HOST_PYTHON, *dynload])
        if "libc.so.6" not in libs:
            raise RuntimeBuildError("ldd did not report the libc of python3.11")
        libc_dir = libs["libc.so.6"].parent
        for name in _IMPLICIT_LIBRARIES:
            _require(libc_dir / name, "libgcc-s1")
            libs[name] = libc_dir / name
        loader_name = ""
        for soname, src in libs.items():
            shutil.copy2(src.resolve(), libdir / soname)
            if soname.startswith("ld-linux"):
                loader_name = soname
        if not loader_name:
            raise RuntimeBuildError("ldd did not report the dynamic loader of python3.11")
        triplet = libc_dir.name  # the multiarch directory, e.g. x86_64-linux-gnu
        patch_paths(libdir / loader_name, _loader_patches(triplet))
        patch_paths(libdir / "libc.so.6", _libc_patches(triplet))
        if (libdir / "libcrypto.so.3").exists():  # hashlib and ssl link it
            patch_paths(libdir / "libcrypto.so.3", _libcrypto_patches(triplet))

        binary = pydir / "bin" / "python3"
        shutil.copy2(HOST_PYTHON, binary)
        inner_lib = f"{SANDBOX_RUNTIME_DIR}/python/lib"
        # DT_RPATH (not RUNPATH) so it also applies to libraries dlopen()ed by extension modules.
        subprocess.run(
            [
                "patchelf",
                "--set-interpreter",
                f"{inner_lib}/{loader_name}",
                "--force-rpath",
                "--set-rpath",
                inner_lib,
                str(binary),
            ],
            check=True,
            capture_output=True,
        )
        # Processes are named after the file exec'd (comm) and show their argv (cmdline): a
        # link whose name does not contain "python" keeps `pkill python3` and `pkill -f python`
        # off the agent. Python resolves the link to find its prefix.
        (tmp / "bin" / AGENT_NAME).symlink_to("../python/bin/python3")
        shutil.copy2(HOST_BUSYBOX, tmp / "bin" / "busybox")
        shutil.copyfile(INIT_SCRIPT, tmp / "bin" / INIT_NAME)
        (tmp / "bin" / INIT_NAME).chmod(0o755)
        shutil.copyfile(CHECKPOINT_SCRIPT, tmp / "bin" / CHECKPOINT_SCRIPT.name)
        (tmp / "bin" / CHECKPOINT_SCRIPT.name).chmod(0o755)
        for path in (tmp, *tmp.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "python" / "bin" / "python3").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another builder won the race
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: The agent's own environment (its commands get theirs from a file, see the engine): the C
#: locale is built into libc, so no locale file and no gconv module is ever opened.
AGENT_ENV = {"LC_ALL": "C", "HOME": "/"}  # HOME given: crun reads no /etc/passwd for it


def checkpoint_hook() -> str:
    """runsc's ``--save-restore-exec-argv`` (split on spaces by runsc): the runtime's busybox
    running ``sandlot-checkpoint``, both read-only in the sandbox."""
    bin_dir = f"{SANDBOX_RUNTIME_DIR}/bin"
    return f"{bin_dir}/busybox sh {bin_dir}/{CHECKPOINT_SCRIPT.name}"


def agent_command(listen: str) -> list[str]:
    """The argv of the sandbox's pid 1: ``sandlot-init``, which runs the agent -- and runs it
    again whenever it dies -- as ``bin/sandlot-agent -I -S -X utf8 -m sandlot.agent`` with
    these arguments: isolated mode (-I ignores the user's PYTHON* variables, so a sandbox env
    cannot break or hijack the agent), no site module (-S: the closure has no site-packages,
    and start-up time matters), UTF-8 (-X utf8: the agent runs in the C locale, see
    :data:`AGENT_ENV`)."""
    return [f"{SANDBOX_RUNTIME_DIR}/bin/{INIT_NAME}", "--listen", listen]


if __name__ == "__main__":  # pragma: no cover - manual use: python -m sandlot.runtime.closure DIR
    print(build_runtime(Path(sys.argv[1] if len(sys.argv) > 1 else os.getcwd())))
