"""ImageStore.prune on a store laid out by hand (no root needed): what nothing can use any more
goes (images of the old storage layout, owned by host root, among them), the newest pulled
version and whatever a sandbox was made from stay."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from sandlot.engines.base import ImageError
from sandlot.engines.local.engine import images_in_use
from sandlot.engines.local.idmap import STORAGE_ID_BASE
from sandlot.images.store import ImageStore, default_image_digest


def _image(root: Path, name: str, uid_base: int | None = STORAGE_ID_BASE) -> Path:
    """An image directory; ``uid_base=None``: of the old storage layout (host root's)."""
    d = root / name
    (d / "rootfs").mkdir(parents=True)
    meta: dict[str, object] = {"env": {}, "workdir": "/"}
    if uid_base is not None:
        meta["uid_base"] = uid_base
    (d / "image.json").write_text(json.dumps(meta))
    return d


def test_prune(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    v1, v2, v3 = (_image(store.root, f"registry-abc-{n}") for n in (1, 2, 3))
    other = _image(store.root, "registry-def-7")
    current = _image(store.root, f"default-{default_image_digest()}")
    stale_default = _image(store.root, "default-000000000000")
    busybox = _image(store.root, "busybox-123")
    old_layout = [_image(store.root, n, None) for n in ("busybox-0ld", "registry-0ld-1")]
    fresh_build = store.root / ".build-registry-x-1"
    fresh_build.mkdir()
    old_build = store.root / ".build-default-y"
    old_build.mkdir()
    an_hour_ago = time.time() - 3700
    os.utime(old_build, (an_hour_ago, an_hour_ago))

    in_use = {v1 / "rootfs"}
    would = store.prune(in_use, dry_run=True)
    assert set(would) == {v2, stale_default, old_build, *old_layout}
    assert all(d.exists() for d in would)
    assert store.prune(in_use) == would
    for gone in would:
        assert not gone.exists()
    for kept in (v1, v3, other, current, busybox, fresh_build):
        assert kept.exists()
    # once nothing uses v1, it goes too; the newest version of each image stays
    assert store.prune(set()) == (v1,)
    assert store.prune(set()) == ()


def test_images_in_use_reads_every_sandbox(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for sandbox, rootfs in (("a", "/images/x/rootfs"), ("b", "/images/y/rootfs")):
        (state / "sandboxes" / sandbox).mkdir(parents=True)
        meta = {"id": sandbox, "image": "x", "image_rootfs": rootfs}
        (state / "sandboxes" / sandbox / "meta.json").write_text(json.dumps(meta))
    assert images_in_use(state) == {Path("/images/x/rootfs"), Path("/images/y/rootfs")}
    assert images_in_use(tmp_path / "nothing") == set()
    (state / "sandboxes" / "c").mkdir()
    (state / "sandboxes" / "c" / "meta.json").write_text("{half")
    with pytest.raises(ImageError, match="not pruning"):  # never guess what is unused
        images_in_use(state)


@pytest.mark.parametrize(
    ("text", "size"),
    [("10G", 10 << 30), ("512M", 512 << 20), ("2048", 2048), ("1GiB", 1 << 30), ("3k", 3072)],
)
def test_parse_size(text: str, size: int) -> None:
    from sandlot.images.store import parse_size

    assert parse_size(text) == size


def test_a_bad_size_limit_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SANDLOT_MAX_IMAGE_SIZE", "lots")
    with pytest.raises(ValueError, match="not a size: 'lots'"):
        ImageStore(tmp_path)


def test_compressed_size_from_a_manifest_or_an_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Manifest parsing only (skopeo's answers stubbed here; the pull itself is tested against
    a real registry in tests/sdk/test_registry_images.py)."""
    import platform

    from sandlot.images import store

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    single = {"layers": [{"size": 100}, {"size": 23}]}
    index = {
        "manifests": [
            {"digest": "sha256:other", "platform": {"os": "linux", "architecture": "s390x"}},
            {"digest": "sha256:ours", "platform": {"os": "linux", "architecture": arch}},
        ]
    }
    asked: list[str] = []

    def fake_skopeo(ref: str, args: list[str], hide: tuple[str, ...] = ()) -> str:
        asked.append(args[-1])
        if args[-1].endswith("@sha256:ours"):
            return json.dumps({"layers": [{"size": 7}]})
        return json.dumps(index if "multi" in args[-1] else single)

    monkeypatch.setattr(store, "_skopeo", fake_skopeo)
    assert store._compressed_size("reg.example:5000/a/b:1", []) == 123
    assert store._compressed_size("reg.example:5000/a/multi:1", []) == 7
    assert asked[-1] == "docker://reg.example:5000/a/multi@sha256:ours"
    monkeypatch.setattr(
        store,
        "_skopeo",
        lambda ref, args, hide=(): json.dumps({"manifests": [index["manifests"][0]]}),
    )
    if arch != "s390x":
        with pytest.raises(ImageError, match=f"no image for linux/{arch}"):
            store._compressed_size("python:3.12", [])
    monkeypatch.setattr(store, "_skopeo", lambda ref, args, hide=(): "not json")
    with pytest.raises(ImageError, match="manifest is not readable"):
        store._compressed_size("python:3.12", [])
