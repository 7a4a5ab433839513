"""The sync/async primitives ``scripts/unasync.py`` swaps: ``async_sleep`` in ``_async/``
becomes ``sync_sleep`` in ``_sync/``, and so on. Each pair does the same thing, once blocking
and once awaitable."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import httpx

from sandlot.sdk._connection import shared_ssl_context

T = TypeVar("T")


async def async_sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


def sync_sleep(seconds: float) -> None:
    time.sleep(seconds)


async def async_run_blocking(fn: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(lambda: fn(*args))


def sync_run_blocking(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


def async_uds_transport(path: str) -> httpx.AsyncBaseTransport:
    """The async SDK's transport to the local server (see :mod:`sandlot.sdk._uds`)."""
    from sandlot.sdk._uds import AsyncUnixTransport

    return AsyncUnixTransport(path)


def sync_uds_transport(path: str) -> httpx.BaseTransport:
    from sandlot.sdk._uds import UnixTransport

    return UnixTransport(path, shared_ssl_context())


def monotonic() -> float:
    return time.monotonic()
