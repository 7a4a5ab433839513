"""Outbound networking for sandboxes that ask for it, through user-mode networking (pasta).

A sandbox always has its own network namespace. By default it holds only ``lo``. With
``NetworkMode.OUTBOUND`` a ``pasta`` process (Debian ``passt``) attaches a tap interface to that
namespace and carries its TCP/UDP/ICMP through ordinary sockets of the host, so the host's routing
table and firewall still apply and no bridge, veth or iptables rule is created on the host.
``--no-map-gw`` keeps the host's loopback unreachable (pasta would otherwise map the gateway
address to it), and no port is forwarded in either direction.

The egress policy is an nftables table inside the sandbox's namespace, installed from the host
before pasta attaches: sandbox code has no CAP_NET_ADMIN, so it cannot lift it (a ``privileged``
sandbox has it within its own user namespace and can: privileged means trusted). Link-local
addresses (cloud metadata services) are always refused; with an allow-list, only the listed
networks and DNS to the sandbox's resolvers are reachable.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import time
from pathlib import Path

from sandlot.engines.base import EngineError
from sandlot.engines.local.oci_runtime import spawn


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


async def attach_pasta(netns: str, pid_file: Path, userns: Path | None = None) -> None:
    """Give the network namespace at ``netns`` (``/proc/PID/ns/net``, or a pinned one)
    outbound access; returns once configured.

    ``userns``: the sandbox's pinned user namespace, which owns the network namespace. pasta
    drops its capabilities before it opens the namespaces, and root keeps rights over a
    namespace without them only when it owns it; a sandbox's own uid owns it (userns.py), so
    pasta joins that user namespace first (and, without the rights to watch the sandbox's
    /proc entry, it does not quit by itself when the sandbox goes: detach_pasta stops it)."""
    if shutil.which("pasta") is None:
        raise NetworkSetupError("outbound networking needs pasta: apt-get install passt")
    result = await spawn(
        [
            "pasta",
            "--runas",
            "0:0",
            "--quiet",
            "--config-net",
            "--no-map-gw",
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--pid",
            str(pid_file),
            "--netns",
            netns,
            *(["--userns", str(userns)] if userns is not None else ["--netns-only"]),
        ]
    )
    if result.returncode != 0:
        raise NetworkSetupError(
            "pasta could not set up outbound networking: "
            f"{(result.stderr or result.stdout).decode().strip()}"
        )


def _pasta_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is still a pasta (pids are reused)."""
    try:
        pid = int(pid_file.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    # pasta is passt under another name (comm: "passt", "passt.avx2", "pasta", ...)
    return pid if comm.startswith(("pasta", "passt")) else None


def pasta_alive(pid_file: Path) -> bool:
    return _pasta_pid(pid_file) is not None


def detach_pasta(pid_file: Path) -> None:
    """Stop the sandbox's pasta; its interface goes with it."""
    pid = _pasta_pid(pid_file)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        # The interface is gone once pasta's tap fd is closed, i.e. once it has exited.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.002)
        with contextlib.suppress(OSError):
            pid_file.unlink()


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def egress_ruleset(
    allow: tuple[str, ...] | None, resolvers: list[str], forward_from: str | None = None
) -> str:
    """The nftables script for a sandbox with outbound access (``allow`` None: everywhere).

    ``forward_from``: the policy applies to what the namespace's kernel forwards from that
    interface (gVisor, gvisor_net.py) instead of what it sends itself (crun); anything else is
    refused with an ICMP error, so a refused connection fails at once rather than timing out."""
    hook = "output" if forward_from is None else "forward"
    lines = [
        "table inet sandlot_egress",
        "delete table inet sandlot_egress",
        "table inet sandlot_egress {",
        f"  chain {hook} {{",
        f"    type filter hook {hook} priority 0; policy drop;",
        '    oifname "lo" accept',
        "    ct state established,related accept",
    ]
    if forward_from is not None:
        lines.append(f'    iifname != "{forward_from}" drop')
    lines += [
        "    ip daddr 169.254.0.0/16 drop",
        "    ip6 daddr fe80::/10 drop",
    ]
    if allow is None:
        lines.append("    accept")
    else:
        v4 = [n for n in allow if ipaddress.ip_network(n).version == 4]
        v6 = [n for n in allow if ipaddress.ip_network(n).version == 6]
        if v4:
            lines.append(f"    ip daddr {{ {', '.join(v4)} }} accept")
        if v6:
            lines.append(f"    ip6 daddr {{ {', '.join(v6)} }} accept")
        for server in resolvers:
            family = "ip" if ipaddress.ip_address(server).version == 4 else "ip6"
            lines.append(f"    {family} daddr {server} udp dport 53 accept")
            lines.append(f"    {family} daddr {server} tcp dport 53 accept")
    if forward_from is not None:
        lines.append("    reject with icmpx admin-prohibited")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


async def apply_egress(
    netns: str, allow: tuple[str, ...] | None, forward_from: str | None = None
) -> None:
    """Install (or replace, atomically) the egress table in the network namespace at ``netns``
    (``/proc/PID/ns/net``, or a pinned one)."""
    if shutil.which("nft") is None:
        raise NetworkSetupError("egress policies need nftables: apt-get install nftables")
    script = egress_ruleset(allow, host_nameservers(), forward_from)
    result = await spawn(
        ["nsenter", f"--net={netns}", "--", "nft", "-f", "-"],
        input=script.encode(),
    )
    if result.returncode != 0:
        raise NetworkSetupError(
            f"cannot install the egress policy: {(result.stderr or result.stdout).decode()}"
        )
