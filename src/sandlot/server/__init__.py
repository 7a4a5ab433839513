"""The sandlot server: control API, gateway to the sandboxes' agents, state in SQL."""

from sandlot.server.app import ServerConfig, create_app
from sandlot.server.run import serve

__all__ = ["ServerConfig", "create_app", "serve"]
