"""``python -m sandlot.images build|list``: build the default image (used by scripts/setup.sh)."""

from __future__ import annotations

import sys

from sandlot.images.store import default_store


def main(argv: list[str]) -> int:
    store = default_store()
    if argv[:1] == ["build"]:
        image = store.default_image(progress=lambda line: print(f"  {line}", flush=True))
        print(f"default image: {image.rootfs}")
        store.busybox_image()
        return 0
    if argv[:1] == ["list"]:
        for entry in store.list():
            print(entry["name"], entry["path"])
        return 0
    print("usage: python -m sandlot.images build|list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
