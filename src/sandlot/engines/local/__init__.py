"""The local engine: crun sandboxes on this machine."""

from sandlot.engines.local.engine import LocalEngine, new_sandbox_id

__all__ = ["LocalEngine", "new_sandbox_id"]
