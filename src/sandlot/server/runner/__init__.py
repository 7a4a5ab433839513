"""The server's top layer: listening sockets, uvicorn and its protocol classes, HTTP/2 (see
docs/architecture.md)."""
