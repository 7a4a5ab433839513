"""A small real filesystem for tests that fill a disk: ext4 in a sparse file, loop-mounted."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def loop_filesystem(directory: Path, size_mb: int) -> Iterator[Path]:
    """Mount a fresh ext4 of ``size_mb`` (no root reserve; blocks are only written as used) at
    ``directory/mnt``; at exit it is unmounted (lazily: whatever a failed test left mounted
    below goes with it) and its image removed."""
    image, mnt = directory / "fs.img", directory / "mnt"
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,nodiscard", str(image)],
        check=True,
        capture_output=True,
    )
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "--recursive", "--lazy", str(mnt)], check=False)
        image.unlink(missing_ok=True)
