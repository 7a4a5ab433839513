"""The closure's loader and libc name no file of the sandbox's own filesystem."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sandlot.runtime.closure import RuntimeBuildError, build_runtime, patch_paths

#: Built-in paths of a stock glibc that a sandbox can write (each a whole string: NUL before
#: and after).
SANDBOX_PATHS = tuple(
    b"\0" + p.encode() + b"\0"
    for p in (
        "/etc/ld.so.preload",
        "/etc/ld.so.cache",
        "/lib/x86_64-linux-gnu/",
        "/usr/lib/x86_64-linux-gnu/",
        "/lib/",
        "/usr/lib/",
        "/usr/lib/locale",
        "/usr/lib/locale/locale-archive",
        "/usr/lib/x86_64-linux-gnu/gconv",
        "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
        "/etc/localtime",
        "/usr/lib/ssl",
        "/usr/lib/x86_64-linux-gnu/engines-3",
        "/usr/lib/x86_64-linux-gnu/ossl-modules",
    )
)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not Path("/usr/bin/python3.11").exists() or shutil.which("patchelf") is None:
        pytest.skip("needs Debian's python3.11 and patchelf")
    return build_runtime(tmp_path_factory.mktemp("runtime"))


def test_loader_and_libc_name_no_sandbox_path(runtime: Path) -> None:
    lib = runtime / "python" / "lib"
    for name in ("ld-linux-x86-64.so.2", "libc.so.6", "libcrypto.so.3"):
        data = (lib / name).read_bytes()
        found = [p for p in SANDBOX_PATHS if p in data]
        assert not found, f"{name} still names {found}"
    assert (lib / "libgcc_s.so.1").exists()  # loaded by name when a thread exits
    assert not (lib / "libkrb5.so.3").exists()  # Kerberos reads (and loads) what krb5.conf says
    assert (lib / "python311.zip").exists()  # ends Python's prefix search inside the runtime


def test_patched_runtime_still_runs(runtime: Path) -> None:
    lib = runtime / "python" / "lib"
    out = subprocess.run(
        [
            str(lib / "ld-linux-x86-64.so.2"),
            "--library-path",
            str(lib),
            str(runtime / "python" / "bin" / "python3"),
            "-I",
            "-S",
            "-c",
            "print('ok')",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONHOME": str(runtime / "python")},
        check=False,
    )
    assert out.stdout == "ok\n", out.stderr


def test_a_path_not_found_fails_the_build(tmp_path: Path) -> None:
    binary = tmp_path / "lib.so"
    binary.write_bytes(b"\0/etc/other\0")
    with pytest.raises(RuntimeBuildError, match="not found"):
        patch_paths(binary, [(b"/etc/ld.so.preload\0", b"/sys/ld.so.preload\0")])
    binary.write_bytes(b"\0/etc/ld.so.preload\0x/etc/ld.so.preload\0")
    patch_paths(binary, [(b"/etc/ld.so.preload\0", b"/sys/ld.so.preload\0")])
    assert binary.read_bytes() == b"\0/sys/ld.so.preload\0x/sys/ld.so.preload\0"
    assert os.path.getsize(binary) == 40
