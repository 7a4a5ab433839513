"""Errors every layer may raise and the API layer answers: an :class:`ApiError` carries its HTTP
status, a stable code and a message for the client."""

from __future__ import annotations


class ApiError(Exception):
    """An error for the API's client: HTTP status, a stable code and a readable message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class WakeError(Exception):
    """A sleeping sandbox could not be woken (the gateway answers 503)."""


#: API tokens start with this; sandbox secrets never do (they are hex), so the gateway can refuse
#: to forward a token into a sandbox (see gateway/agent.py).
API_TOKEN_PREFIX = "sl_"
