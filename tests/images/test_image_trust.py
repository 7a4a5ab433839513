"""Which principal may use which image reference (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandlot.images.trust import ImageRefused, ImageTrust


@pytest.fixture
def trust(tmp_path: Path) -> ImageTrust:
    (tmp_path / "trusted" / "rootfs").mkdir(parents=True)
    (tmp_path / "trusted" / "link").symlink_to(tmp_path / "trusted" / "rootfs")
    (tmp_path / "trusted" / "escape").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "trusted")
    return ImageTrust.from_dirs([tmp_path / "alias"])  # resolved once, here


@pytest.mark.parametrize("ref", ["default", "busybox", "python:3.12-slim", "ghcr.io/a/b:1"])
def test_built_in_and_registry_images_are_for_everyone(trust: ImageTrust, ref: str) -> None:
    assert trust.check(ref, local=False) == ref


def test_the_local_socket_owner_may_use_any_path(trust: ImageTrust) -> None:
    assert trust.check("/usr", local=True) == "/usr"
    assert trust.check("oci:/srv/l:t", local=True) == "oci:/srv/l:t"


def test_trusted_directories(trust: ImageTrust, tmp_path: Path) -> None:
    real = tmp_path / "trusted" / "rootfs"
    assert trust.check(f"{tmp_path}/alias/link", local=False) == str(real)
    assert trust.check(f"oci:{tmp_path}/trusted/link:v1", local=False) == f"oci:{real}:v1"
    assert trust.check(f"oci:{tmp_path}/trusted/missing", local=False).endswith(":latest")


@pytest.mark.parametrize(
    "ref",
    ["/usr", "/proc/self/root", "oci:relative:t", "oci:/srv/x", "{t}/trusted/escape",
     "{t}/trusted/../elsewhere", "oci:{t}/trusted/escape:t", "{t}/trusted\0/rootfs"],
)  # fmt: skip
def test_everything_else_is_refused(trust: ImageTrust, tmp_path: Path, ref: str) -> None:
    ref = ref.format(t=tmp_path)
    with pytest.raises(ImageRefused) as info:
        trust.check(ref, local=False)
    assert str(tmp_path) not in str(info.value) and "/usr" not in str(info.value)


def test_a_trusted_directory_must_be_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        ImageTrust.from_dirs([tmp_path / "nothing"])
    with pytest.raises(ValueError, match="host's root"):
        ImageTrust.from_dirs(["/"])
