"""The control API: the app factory, route handlers, the one renderer of rows and the OpenAPI
document (imports gateway, control and the base modules; see docs/architecture.md)."""
