"""The local engine: crun sandboxes on this machine.

``LocalEngine`` is imported on first use: the image store (below the engine) uses this package's
kernel helpers (``idmap``: the storage uid range and its user namespace), and importing the engine
here eagerly would make that a cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandlot.engines.local.engine import LocalEngine, new_sandbox_id

__all__ = ["LocalEngine", "new_sandbox_id"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sandlot.engines.local import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
