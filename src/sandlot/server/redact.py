"""Host paths never leave the server in a message.

Engine and runtime errors (crun, mount, mkfs, the kernel's own text) name the files they failed
on: bundle directories, disk images, socket links under the state directory. Such text reaches
API clients as error messages, a sandbox's ``error`` field and its events, and would tell a tenant
where the host keeps its state (a first step for any attack on it). Rather than trust every
message's author to remember, the few places where text leaves the server pass it through
:func:`hide_host_paths`, which replaces every path under sandlot's host directories with a
placeholder; the server's log keeps the full text.
"""

from __future__ import annotations

import functools
import re

from sandlot.paths import images_dir, state_dir

#: What a host path is replaced with.
PLACEHOLDER = "<host path>"
#: Host-wide directories of the local engine, whatever the state directory (runtime mounts,
#: socket links, the uid-range registry).
_HOST_WIDE = ("/run/sandlot", "/var/lib/sandlot-ids", "/var/lib/sandlot")


@functools.lru_cache(maxsize=8)
def _pattern(roots: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so a root inside another is not cut short; a path ends at whitespace or
    # a quote (how errors quote them).
    alternatives = "|".join(re.escape(r.rstrip("/")) for r in sorted(roots, key=len, reverse=True))
    return re.compile(rf"(?:{alternatives})(?:/[^\s'\"]*)?")


def hide_host_paths(text: str) -> str:
    """``text`` with every path under sandlot's host directories replaced by a placeholder."""
    if "/" not in text:
        return text
    roots = tuple({str(state_dir()), str(images_dir()), *_HOST_WIDE} - {"", "/"})
    return _pattern(roots).sub(PLACEHOLDER, text)
