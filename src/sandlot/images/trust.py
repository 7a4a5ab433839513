"""Who may use which image: host paths and OCI layouts are the host's files, not a tenant's.

An image reference that names a host path (a root filesystem directory, or ``oci:PATH`` of an OCI
layout) makes the server, as root, mount or unpack that path. A tenant (an API token) that could
name one would boot the host's ``/usr`` or ``/proc/self/root`` as its sandbox, or have the server
unpack a layout the tenant wrote itself into its own sandbox's shared directory (whose host path
it can read in ``/proc/self/mountinfo``). So host paths are for trusted principals only:

- the owner of the server's local Unix socket (the host's administrator), anywhere;
- anybody, inside a directory the administrator listed (``sandlot server
  --trusted-image-dir DIR``): the path is resolved fully (symlinks, ``..``) and must stay inside.

Everyone else gets the built-in images and registry references. The refusal never echoes the
path: whether a host path exists is not a tenant's business either.

A registry reference is a request the server makes, as root, with the host's network: one that
names the host itself (``127.0.0.1:5000/x``, ``localhost``, a name that resolves to a loopback,
link-local or one of this host's own addresses) would let a tenant read images from a registry
only the host should reach, and make the server send requests to the host's private services
(link-local: the cloud's metadata service). Such registries are for the administrator too, or
for tenants when the administrator lists them (``sandlot server --trusted-registry HOST:PORT``).
The name is resolved once, here; skopeo resolves it again when it pulls, so a name whose DNS
answer changes in between (DNS rebinding) is not caught: an administrator who must exclude that
too should give the server a resolver that never answers with the host's addresses.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sandlot.engines.base import ImageError
from sandlot.images.store import host_path, is_registry_host, parse_oci, pulls_from


class ImageRefused(ImageError):
    """This principal may not use this image (HTTP 403)."""


REFUSED = (
    "images from host paths and OCI layouts are only for the server's administrator (its local "
    "socket) or in directories it trusts (sandlot server --trusted-image-dir); use a registry "
    "reference (such as 'python:3.12-slim') or a built-in image ('default', 'busybox')"
)

REGISTRY_REFUSED = (
    "registries on the server's own host (its loopback, link-local or own addresses) are only "
    "for the server's administrator (its local socket) or when it trusts them (sandlot server "
    "--trusted-registry HOST:PORT); use a registry reachable from elsewhere"
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address_here(address: IpAddress) -> bool:
    """``address`` is assigned to one of this host's interfaces: binding to it succeeds (the
    kernel refuses other addresses with EADDRNOTAVAIL; a host with ``ip_nonlocal_bind`` set
    would make every address look local, which refuses more, never less)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def _reaches_host(address: IpAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or _address_here(address)
    )


def names_this_host(registry: str) -> bool:
    """The registry ``host[:port]`` is this host, or a link-local neighbour: by its name
    (``localhost``), its address, or any address its name resolves to now. A name that does not
    resolve is not refused here (the pull fails on it anyway)."""
    host = registry
    if host.startswith("["):
        host = host[1 : host.index("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addresses: list[IpAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = []
        with contextlib.suppress(OSError, UnicodeError):
            for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
                with contextlib.suppress(ValueError):
                    addresses.append(ipaddress.ip_address(str(info[4][0]).partition("%")[0]))
    return any(_reaches_host(a) for a in addresses)


@dataclass(frozen=True)
class ImageTrust:
    #: Directories (resolved) in which anybody may use host paths as images.
    trusted_dirs: tuple[Path, ...] = ()
    #: Registries (``host[:port]``, as image references spell them) on this host that anybody
    #: may pull from.
    trusted_registries: tuple[str, ...] = ()

    @classmethod
    def from_dirs(cls, dirs: Iterable[str | Path], registries: Iterable[str] = ()) -> ImageTrust:
        """Resolve each directory now (a symlink given as a trusted directory is followed once,
        here, by the administrator's choice); each must exist."""
        resolved = []
        for d in dirs:
            path = Path(os.path.realpath(d))
            if not path.is_dir():
                raise ValueError(f"trusted image directory {str(d)!r} is not a directory")
            if path == Path("/"):
                raise ValueError("the host's root cannot be a trusted image directory")
            resolved.append(path)
        for registry in registries:
            if not is_registry_host(registry):
                raise ValueError(
                    f"trusted registry {registry!r} must be HOST[:PORT] as image references "
                    "spell it (such as '127.0.0.1:5000')"
                )
        return cls(tuple(resolved), tuple(registries))

    def check(self, ref: str, *, local: bool) -> str:
        """The reference to create from (a trusted directory's path fully resolved, so that
        what was checked is what is used), or :class:`ImageRefused`. ``local``: the principal
        is the local socket's owner. May resolve a registry's name: call it off the event loop."""
        if local:
            return ref
        registry = pulls_from(ref)
        if registry is not None:
            if registry not in self.trusted_registries and names_this_host(registry):
                raise ImageRefused(REGISTRY_REFUSED)
            return ref
        path = host_path(ref)
        if path is None:
            return ref
        if os.path.isabs(path) and "\0" not in path:
            resolved = Path(os.path.realpath(path))
            for trusted in self.trusted_dirs:
                if resolved.is_relative_to(trusted):
                    if ref.startswith("oci:"):
                        return f"oci:{resolved}:{parse_oci(ref[4:])[1]}"
                    return str(resolved)
        raise ImageRefused(REFUSED)
