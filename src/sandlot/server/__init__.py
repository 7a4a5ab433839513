"""The sandlot server: control API, gateway to the sandboxes' agents, state in SQL."""

from sandlot.server.api.app import create_app
from sandlot.server.config import ServerConfig
from sandlot.server.runner.serve import serve

__all__ = ["ServerConfig", "create_app", "serve"]
