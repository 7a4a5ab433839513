"""Sizes as people write them (``10G``) and read them (``1.5 KiB``), for image limits."""

from __future__ import annotations

import re


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``2048`` (bytes) → bytes."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 10G, 512M)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(match.group(1)) << (10 * power)


def human(n: int) -> str:
    """1536 → "1.5 KiB"."""
    value, units = float(n), ["B", "KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{n} B" if units[0] == "B" else f"{value:.1f} {units[0]}"
