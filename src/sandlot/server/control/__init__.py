"""The control plane: the store, sandboxes' create/update/delete, the agents' connections,
lifecycle timers and warm pools (imports only the base modules; see docs/architecture.md)."""
