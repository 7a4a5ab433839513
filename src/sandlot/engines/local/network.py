"""Outbound networking for sandboxes that ask for it, through user-mode networking (pasta).

A sandbox always has its own network namespace. By default it holds only ``lo``. With
``NetworkMode.OUTBOUND`` a ``pasta`` process (Debian ``passt``) attaches a tap interface to that
namespace and carries its TCP/UDP/ICMP through ordinary sockets of the host, so the host's routing
table and firewall still apply and no bridge, veth or iptables rule is created on the host.
``--no-map-gw`` keeps the host's loopback unreachable (pasta would otherwise map the gateway
address to it), and no port is forwarded in either direction. Allow-lists (issue 7) will be
enforced by nftables rules inside the namespace, where sandbox code cannot lift them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path

from sandlot.engines.base import EngineError


class NetworkSetupError(EngineError):
    pass


def host_nameservers() -> list[str]:
    """The host's resolvers, minus loopback ones (a stub resolver on the host is unreachable)."""
    servers = []
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                addr = parts[1]
                if not addr.startswith("127.") and addr != "::1":
                    servers.append(addr)
    return servers


def resolv_conf(outbound: bool) -> str:
    if not outbound:
        return "# sandlot: this sandbox has no outbound network\n"
    lines = [f"nameserver {s}" for s in host_nameservers()] or ["# no usable host resolver"]
    return "\n".join(lines) + "\n"


async def attach_pasta(netns_pid: int, pid_file: Path) -> None:
    """Give the network namespace of ``netns_pid`` outbound access; returns once configured."""
    if shutil.which("pasta") is None:
        raise NetworkSetupError("outbound networking needs pasta: apt-get install passt")
    proc = await asyncio.create_subprocess_exec(
        "pasta", "--runas", "0:0", "--quiet", "--config-net", "--no-map-gw",
        "-t", "none", "-u", "none", "-T", "none", "-U", "none",
        "--pid", str(pid_file), "--netns", f"/proc/{netns_pid}/ns/net", "--netns-only",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise NetworkSetupError(
            f"pasta could not set up outbound networking: {(err or out).decode().strip()}"
        )


def detach_pasta(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    # Only signal it if it is still our pasta (pids are reused).
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return
    if comm.startswith("pasta"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
