"""Egress policy through the SDK and the server (Koyeb's option names, sandlot's stricter
default), against a peer host in a network namespace this test creates -- no other address."""

from __future__ import annotations

from pathlib import Path

import pytest
from engines.test_network import _peer

from sandlot import Sandbox, SandboxRequestError

pytestmark = pytest.mark.usefixtures("api_url")

FETCH = "timeout 5 wget -q -O- {url}"


def test_default_is_no_network_then_allowlist_then_blocked(tmp_path: Path) -> None:
    with _peer(tmp_path, 7) as url, Sandbox.create(image="busybox") as sb:
        assert sb.info["network"] == "none"
        assert sb.exec(FETCH.format(url=url)).code != 0
        sb.update_network(outbound_allowlist=["10.213.7.2"])
        assert sb.info["outbound_allowlist"] == ["10.213.7.2/32"]
        assert sb.exec(FETCH.format(url=url)).stdout == "hello from the peer\n"
        sb.update_network(block_network=True)
        assert sb.info["network"] == "none"
        assert sb.exec(FETCH.format(url=url)).code != 0


def test_allowlist_at_create_excludes_other_networks(tmp_path: Path) -> None:
    with (
        _peer(tmp_path, 7) as allowed,
        _peer(tmp_path, 8) as other,
        Sandbox.create(image="busybox", outbound_allowlist=["10.213.7.0/30"]) as sb,
    ):
        assert sb.exec(FETCH.format(url=allowed)).stdout == "hello from the peer\n"
        assert sb.exec(FETCH.format(url=other)).code != 0


def test_full_outbound(tmp_path: Path) -> None:
    with _peer(tmp_path, 7) as url, Sandbox.create(image="busybox", block_network=False) as sb:
        assert sb.info["network"] == "outbound" and sb.info["outbound_allowlist"] is None
        assert sb.exec(FETCH.format(url=url)).stdout == "hello from the peer\n"


@pytest.mark.parametrize(
    "options",
    [
        {"outbound_allowlist": ["not-a-cidr"]},
        {"outbound_allowlist": ["10.0.0.0/33"]},
        {"block_network": True, "outbound_allowlist": ["10.0.0.0/8"]},
        {"outbound_allowlist": "10.0.0.0/8"},
    ],
)
def test_bad_network_options(options: dict[str, object]) -> None:
    with pytest.raises(SandboxRequestError) as bad:
        Sandbox.create(image="busybox", **options)  # type: ignore[arg-type]
    assert bad.value.status_code == 400
    assert Sandbox.list() == []
