"""Engines run sandboxes. The server talks to them only through :class:`~sandlot.engines.base.Engine`."""
