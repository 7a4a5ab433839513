"""Filesystem snapshots on disk: image layers stacked on the image a sandbox came from.

One snapshot (``<state>/snapshots/<id>/``, the directory 0700 like the image store)::

    layer/           the sandbox's writable layer as it was (:mod:`.layer_copy`: storage-owned,
                     whiteouts and opaque directories kept, hostile entries left out)
    snapshot.json    the base image (rootfs, environment, workdir, owner range) and the stack of
                     layers a sandbox spawned from it mounts, top first (this one's own first)

A sandbox spawned from a snapshot mounts each layer of the stack id-mapped and read-only as one
more overlay lower directory above its image: nothing is copied, so a spawn costs one
id-mapped mount per layer (~1 ms each here) over a cold create. A snapshot of such a sandbox
stacks its new layer on that stack; past :data:`MAX_LAYERS` the stack is flattened (every layer
and the new one merged into a single layer, a copy of all of them), so that no sandbox mounts
more than ``MAX_LAYERS`` layers whatever the chain of snapshots behind it.

A snapshot whose layer another snapshot stacks on, or that a sandbox mounts, cannot be deleted.
A snapshot is made in a ``.tmp-*`` directory and renamed into place once complete: a crash
leaves no half snapshot (:meth:`SnapshotStore.recover` removes the leftovers).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sandlot.engines.base import EngineError, ImageError
from sandlot.images import layer_copy
from sandlot.images.store import Image

#: The most snapshot layers stacked under a sandbox; a deeper chain is flattened into one.
MAX_LAYERS = 8
_ID_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


class SnapshotNotFound(ImageError):
    """No snapshot with this id on this engine."""


class SnapshotInUse(EngineError):
    """The snapshot still backs a sandbox or another snapshot; the message names which."""


@dataclass(frozen=True)
class StoredSnapshot:
    id: str
    image: Image
    #: The layer directories a sandbox spawned from it mounts, top first.
    layers: tuple[Path, ...]
    #: Bytes the snapshot's own layer takes on disk (allocated blocks).
    size: int
    #: What the copy left out, by kind (device nodes, special files, host capabilities).
    dropped: dict[str, int]


class SnapshotStore:
    def __init__(self, root: Path, reserve: float = 0.0) -> None:
        """``reserve``: the fraction of the disk a new snapshot must leave free (the engine's
        ``--reserve``, 10 % by default)."""
        self.root = root
        self.reserve = reserve
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)

    def _dir(self, snapshot_id: str) -> Path:
        if not snapshot_id or not set(snapshot_id) <= _ID_ALPHABET or len(snapshot_id) > 64:
            raise SnapshotNotFound(f"no snapshot {snapshot_id!r}")
        return self.root / snapshot_id

    def get(self, snapshot_id: str) -> StoredSnapshot:
        directory = self._dir(snapshot_id)
        try:
            meta = json.loads((directory / "snapshot.json").read_text())
            image = Image(
                name=str(meta["image"]),
                rootfs=Path(meta["rootfs"]),
                env=dict(meta["env"]),
                workdir=str(meta["workdir"]),
                uid_base=int(meta["uid_base"]),
            )
            return StoredSnapshot(
                snapshot_id,
                image,
                tuple(Path(p) for p in meta["layers"]),
                int(meta["size"]),
                dict(meta.get("dropped") or {}),
            )
        except (OSError, ValueError, KeyError, TypeError):
            raise SnapshotNotFound(f"no snapshot {snapshot_id} on this server") from None

    def ids(self) -> list[str]:
        return sorted(d.name for d in self.root.iterdir() if (d / "snapshot.json").is_file())

    def create(
        self,
        snapshot_id: str,
        upper: Path,
        sandbox_base: int,
        image: Image,
        stack: tuple[Path, ...],
    ) -> StoredSnapshot:
        """Copy ``upper`` (of the sandbox whose root is host uid ``sandbox_base``, made from
        ``image`` under the snapshot layers ``stack``) into a new snapshot."""
        final = self._dir(snapshot_id)
        if final.exists():
            raise EngineError(f"snapshot {snapshot_id} already exists")
        flatten = len(stack) + 1 > MAX_LAYERS
        totals = layer_copy.measure(upper)
        if flatten:
            for layer in stack:
                more = layer_copy.measure(layer)
                totals.bytes += more.bytes
                totals.entries += more.entries
        layer_copy.check_room(totals, self.root, self.reserve)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{snapshot_id}-", dir=self.root))
        try:
            layer = tmp / "layer"
            layer.mkdir()
            copied = layer_copy.LayerTotals()
            if flatten:
                for lower in reversed(stack):  # bottom first
                    layer_copy.apply_layer(lower, layer, layer_copy.keep_storage, copied)
            layer_copy.apply_layer(upper, layer, layer_copy.from_sandbox(sandbox_base), copied)
            layers = (final / "layer",) + (() if flatten else stack)
            meta = {
                "image": image.name,
                "rootfs": str(image.rootfs),
                "env": image.env,
                "workdir": image.workdir,
                "uid_base": image.uid_base,
                "layers": [str(p) for p in layers],
                "size": copied.bytes,
                "dropped": copied.dropped,
                "flattened": flatten,
            }
            (tmp / "snapshot.json").write_text(json.dumps(meta))
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(snapshot_id)

    def users(self, snapshot_id: str) -> list[str]:
        """The snapshots stacked on this one's layer."""
        layer = str(self._dir(snapshot_id) / "layer")
        found = []
        for other in self.ids():
            if other != snapshot_id:
                try:
                    if layer in {str(p) for p in self.get(other).layers}:
                        found.append(other)
                except SnapshotNotFound:
                    continue
        return found

    def delete(self, snapshot_id: str, mounted: Iterable[Path]) -> None:
        """Remove a snapshot that nothing uses (``mounted``: the layers sandboxes mount)."""
        directory = self._dir(snapshot_id)
        if not (directory / "snapshot.json").is_file():
            raise SnapshotNotFound(f"no snapshot {snapshot_id} on this server")
        if directory / "layer" in set(mounted):
            raise SnapshotInUse(
                f"snapshot {snapshot_id} is in use by a sandbox: delete the sandboxes spawned "
                "from it first"
            )
        children = self.users(snapshot_id)
        if children:
            raise SnapshotInUse(
                f"snapshot {snapshot_id} is the base of snapshot(s) {', '.join(children)}: "
                "delete those first"
            )
        # Out of sight first (a rename), then removed: never half a snapshot under its name.
        doomed = directory.with_name(f".tmp-deleting-{snapshot_id}")
        directory.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def base_images(self) -> set[Path]:
        """The image rootfs every snapshot stacks on (what an image prune must keep)."""
        return {self.get(i).image.rootfs for i in self.ids()}

    def recover(self) -> None:
        """Remove what a crash left of snapshots being made or deleted."""
        for d in self.root.iterdir():
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)


def image_of(rootfs: Path, name: str, uid_base: int) -> Image:
    """The image a sandbox was made from, as recorded beside its rootfs (store images) or the
    defaults of a host directory."""
    meta_file = rootfs.parent / "image.json"
    if uid_base and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        return Image(name, rootfs, dict(meta["env"]), str(meta["workdir"]), uid_base)
    return Image(name=name, rootfs=rootfs, uid_base=uid_base)


__all__ = [
    "MAX_LAYERS",
    "SnapshotInUse",
    "SnapshotNotFound",
    "SnapshotStore",
    "StoredSnapshot",
    "image_of",
]
