"""The network of a gVisor sandbox: gVisor's network stack behind a router namespace of ours,
in which the host's kernel filters, translates and forwards what the sandbox sends, so the
egress policy stays out of gVisor's reach and can change while the sandbox runs.

Why not crun's way (network.py): gVisor brings its own TCP/IP stack. In runsc's ``sandbox``
mode it copies, once at start, the *up* interfaces of the network namespace it joins: loopback
becomes gVisor's own 127.0.0.1 (a namespace whose ``lo`` is down gives it none at all), and
each other interface is driven through a raw packet socket, which bypasses the ``output`` hook
that crun's nftables table filters, and its addresses are taken off the host's side. So every
gVisor sandbox gets two namespaces, made by host root before runsc starts (runsc joins the
first by path before it makes the sandbox's user namespace: nothing in the sandbox holds a
capability over either):

- ``<sandbox>/netns``, the one runsc joins: ``lo`` up, and ``gv0`` (198.18.0.2/30, default
  route via .1), which gVisor takes over;
- ``<sandbox>/router``: ``gw0``, the other end of that veth pair (198.18.0.1), and, when the
  sandbox may go out, pasta's tap device (network.attach_pasta, ``--no-map-gw``: the host's
  loopback stays unreachable, exactly as for crun). Its kernel routes what arrives from gVisor:
  the ``forward`` hook of an nftables table (network.egress_ruleset) applies the policy, and
  masquerading gives the packets pasta's address.

Blocked or allowed is decided by pasta being there (the only route out) and by the table;
nothing in gVisor changes, so ``update_network`` works live. 198.18.0.0/15 is the benchmarking
range (RFC 2544), never a real destination. IPv4 only: gVisor's end has no IPv6 address. Both
namespaces go when the sandbox's directory is unmounted (``delete``); after a host reboot they
are made again. Measured on this 2-core host (busy): 54-93 ms per create (seven helper
programs: ip, nft, nsenter; one script would save most of it), ~0.1 s for a live update.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from sandlot.engines.local.network import NetworkSetupError

#: gVisor's end of the pair, and the host kernel's.
GVISOR_LINK, HOST_LINK = "gv0", "gw0"
GVISOR_ADDR, HOST_ADDR, PREFIX = "198.18.0.2", "198.18.0.1", 30

_CLONE_NEWNET = 0x40000000
_NS_GET_NSTYPE = 0xB703

#: ``ip -batch`` in the router's namespace: the pair, one end sent to the sandbox's (iproute2
#: takes a path for ``netns``).
_PAIR = """link set lo up
link add {host} type veth peer name {gvisor} netns {netns}
"""
#: In the sandbox's: lo up, gVisor's end addressed, its default route for gVisor to copy
#: (runsc takes the address off at every start, so it is set again every time).
_SANDBOX_SIDE = f"""link set lo up
link set {GVISOR_LINK} up
address replace {GVISOR_ADDR}/{PREFIX} dev {GVISOR_LINK}
route replace default via {HOST_ADDR} dev {GVISOR_LINK}
"""
_ROUTER_SIDE = f"""link set {HOST_LINK} up
address replace {HOST_ADDR}/{PREFIX} dev {HOST_LINK}
"""

#: The router's kernel: it forwards, and holds no IPv6 on the pair.
_SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    f"net/ipv6/conf/{HOST_LINK}/disable_ipv6": "1",
}

#: Fixed whatever the policy: the router answers nothing that gVisor starts towards the router
#: itself, and masquerades what it forwards out (to pasta's tap).
ROUTER_RULESET = f"""table inet sandlot_router
delete table inet sandlot_router
table inet sandlot_router {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{HOST_LINK}" ct state established,related accept
    iifname "{HOST_LINK}" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname != "{HOST_LINK}" masquerade
  }}
}}
"""


def netns_pin(directory: Path) -> Path:
    """The namespace runsc joins (gVisor's interfaces are copied from it)."""
    return directory / "netns"


def router_pin(directory: Path) -> Path:
    """The namespace where the host's kernel routes and filters for the sandbox."""
    return directory / "router"


def is_pinned(pin: Path) -> bool:
    """Whether ``pin`` holds a network namespace (after a host reboot the bind mount is gone)."""
    try:
        fd = os.open(pin, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE) == _CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def _run(argv: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, check=False, timeout=30
    )
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip()
        raise NetworkSetupError(f"cannot set up the gVisor sandbox's network: {reason}")


def _pin_new(pin: Path) -> None:
    pin.touch(mode=0o600, exist_ok=True)
    _run(["unshare", f"--net={pin}", "true"])


def prepare(directory: Path) -> Path:
    """Make (or repair) the sandbox's two namespaces before runsc starts; returns the pin of
    the one runsc joins. Blocking: call it from a worker thread."""
    for tool in ("ip", "nft", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            raise NetworkSetupError(f"gVisor sandboxes need {tool} (iproute2, nftables)")
    netns, router = netns_pin(directory), router_pin(directory)
    in_netns = ["nsenter", f"--net={netns}", "--"]
    in_router = ["nsenter", f"--net={router}", "--"]
    fresh = not (is_pinned(netns) and is_pinned(router))
    if fresh:  # first start, or after a host reboot: both made again
        for pin in (netns, router):
            _pin_new(pin)
        pair = _PAIR.format(host=HOST_LINK, gvisor=GVISOR_LINK, netns=netns)
        _run([*in_router, "ip", "-batch", "-"], pair)
        script = "".join(f"echo {value} > /proc/sys/{key}\n" for key, value in _SYSCTLS.items())
        # /proc/sys/net shows the namespace of whoever opens it: a child that joined it.
        _run([*in_router, "sh", "-ec", script])
        _run([*in_router, "nft", "-f", "-"], ROUTER_RULESET)
        _run([*in_router, "ip", "-batch", "-"], _ROUTER_SIDE)
    _run([*in_netns, "ip", "-batch", "-"], _SANDBOX_SIDE)
    return netns
