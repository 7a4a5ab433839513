"""Traffic into sandboxes: the agent API proxy, exposed ports, the TCP proxy, tunnels and relays
(imports control and the base modules; see docs/architecture.md)."""
