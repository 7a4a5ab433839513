"""What every group of route handlers is bound to: the server's configuration, the control
plane, who is asking (:mod:`.auth`) and how rows are shown (:mod:`.render`)."""

from __future__ import annotations

from sandlot.server.api.auth import Auth
from sandlot.server.api.render import Renderer
from sandlot.server.config import ServerConfig
from sandlot.server.control.control import Control


class Handlers:
    def __init__(
        self, config: ServerConfig, control: Control, auth: Auth, render: Renderer
    ) -> None:
        self.config = config
        self.control = control
        self.store = control.store
        self.principal = auth.principal
        self.admin = auth.admin
        self.render = render
