"""Exposed ports and the TCP proxy: see :mod:`.service`."""
