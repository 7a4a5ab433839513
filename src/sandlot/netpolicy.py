"""Egress policy options, shared by the control API (validation) and the engines (enforcement).

Koyeb's names: ``block_network`` and ``outbound_allowlist``. sandlot's default is stricter than
Koyeb's: with neither option a sandbox has **no** network. ``block_network=False`` opens full
outbound access; an ``outbound_allowlist`` of addresses or CIDRs opens exactly those networks
(bare addresses become /32 or /128).
"""

from __future__ import annotations

import ipaddress

from sandlot.engines.base import EngineError, NetworkMode


class EgressPolicyError(EngineError, ValueError):
    """An invalid egress option (a bad CIDR, or options that contradict each other)."""


def normalize_allowlist(entries: object) -> tuple[str, ...]:
    """CIDRs as given; bare addresses become /32 or /128. Clear errors otherwise."""
    if isinstance(entries, str) or not isinstance(entries, list | tuple):
        raise EgressPolicyError("outbound_allowlist must be a list of IP addresses or CIDRs")
    out = []
    for entry in entries:
        if not isinstance(entry, str):
            raise EgressPolicyError(f"outbound_allowlist entry {entry!r} is not a string")
        try:
            out.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
        except ValueError:
            raise EgressPolicyError(
                f"outbound_allowlist entry {entry!r} is not an IP address or CIDR"
            ) from None
    return tuple(dict.fromkeys(out))


def resolve_policy(
    block_network: bool | None, outbound_allowlist: object
) -> tuple[NetworkMode, tuple[str, ...] | None]:
    """(mode, allow-list) from the user's options; allow-list None means everywhere."""
    if outbound_allowlist is not None:
        if block_network:
            raise EgressPolicyError(
                "block_network=True contradicts an outbound_allowlist: pass one or the other"
            )
        return NetworkMode.OUTBOUND, normalize_allowlist(outbound_allowlist)
    if block_network is False:
        return NetworkMode.OUTBOUND, None
    return NetworkMode.NONE, None
