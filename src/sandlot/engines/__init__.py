"""Engines run sandboxes; the server talks to them only through
:class:`~sandlot.engines.base.Engine`."""
