"""Attacks on the kubernetes engine, against a real kube-apiserver (skipped where it is not
built): a tenant's env naming the agent's own variables, and secrets reaching the Pod spec
(which anyone allowed to read Pods, and every audit log, sees)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from support import kube_fixtures
from support.kube import ControlPlane

from sandlot.engines.base import EngineError, SandboxSpec
from sandlot.instance_types import get_instance_type

pytestmark = pytest.mark.anyio

# The kubernetes fixtures (support/kube_fixtures.py), made this module's own.
control_plane = kube_fixtures.control_plane
namespace = kube_fixtures.namespace
kubelet = kube_fixtures.kubelet
kube_settings = kube_fixtures.kube_settings
kube_engine = kube_fixtures.kube_engine


def _spec(sandbox_id: str, **kw: Any) -> SandboxSpec:
    return SandboxSpec(
        **{
            "id": sandbox_id,
            "image": "debian",
            "instance_type": get_instance_type("nano"),
            "secret": "the-agent-secret-" + sandbox_id,
            **kw,
        }
    )


@pytest.mark.parametrize(
    "name",
    ["SANDBOX_AUTH_MODE", "SANDBOX_SECRET", "SANDBOX_SECRET_FILE", "SANDLOT_PROCESS_JOURNAL"],
)
async def test_env_cannot_set_the_agents_own_variables(
    kube_engine: Any, control_plane: ControlPlane, namespace: str, name: str
) -> None:
    """``SANDBOX_AUTH_MODE=pool`` after the engine's own entry would make the agent accept the
    first bearer token anyone presents (a Pod's later duplicate env entry wins); the others
    would point the agent at another secret. Refused before anything is made."""
    with pytest.raises(EngineError, match="reserved environment variable"):
        await kube_engine.create(_spec("secenv1", env={name: "pool"}))
    status, _ = control_plane.request("GET", f"/api/v1/namespaces/{namespace}/pods/sandlot-secenv1")
    assert status == 404


async def test_no_secret_reaches_the_pod_or_its_annotations(
    kube_engine: Any, control_plane: ControlPlane, namespace: str
) -> None:
    spec = _spec(
        "secspec1",
        env={"TOKEN": "tenant-secret-value"},
        labels={"team": "a"},
    )
    await kube_engine.create(spec)
    for kind, name in (
        ("pods", "sandlot-secspec1"),
        ("secrets", "sandlot-secspec1"),
        ("persistentvolumeclaims", "sandlot-secspec1-workspace"),
    ):
        _, body = control_plane.request("GET", f"/api/v1/namespaces/{namespace}/{kind}/{name}")
        obj = json.loads(body)
        visible = json.dumps({"metadata": obj["metadata"], "spec": obj.get("spec")})
        assert spec.secret not in visible, kind
        assert "tenant-secret-value" not in visible, kind


async def test_privileged_pods_are_refused_unless_the_operator_allows_them(
    kube_engine: Any, kube_settings: Any, control_plane: ControlPlane, namespace: str
) -> None:
    """A token with the privileged scope asks for ``privileged=True``: on a cluster that is
    root on a node shared with other tenants' Pods. Refused by default."""
    with pytest.raises(EngineError, match="privileged sandboxes are off"):
        await kube_engine.create(_spec("secpriv1", privileged=True))
    status, _ = control_plane.request(
        "GET", f"/api/v1/namespaces/{namespace}/pods/sandlot-secpriv1"
    )
    assert status == 404

    import dataclasses

    from sandlot.engines.kubernetes.engine import KubernetesEngine

    allowing = KubernetesEngine(dataclasses.replace(kube_settings, allow_privileged=True))
    try:
        await allowing.create(_spec("secpriv2", privileged=True))
        _, body = control_plane.request(
            "GET", f"/api/v1/namespaces/{namespace}/pods/sandlot-secpriv2"
        )
        assert json.loads(body)["spec"]["containers"][0]["securityContext"]["privileged"] is True
        await allowing.delete("secpriv2")
    finally:
        await allowing.close()


async def test_an_allowlist_cannot_open_the_clusters_own_networks(
    kube_engine: Any, control_plane: ControlPlane, namespace: str
) -> None:
    """A tenant allowlists the cluster's Pod network (where an in-cluster PostgreSQL, the API
    server and other tenants' Pods answer) or the metadata service: the NetworkPolicy reaches
    none of it. Before, the allowlist went into the policy as given."""
    from sandlot.engines.base import NetworkMode

    await kube_engine.create(
        _spec(
            "secnet1",
            network=NetworkMode.OUTBOUND,
            outbound_allowlist=("10.0.0.0/8", "169.254.169.254/32", "0.0.0.0/1"),
        )
    )
    _, body = control_plane.request(
        "GET",
        f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/sandlot-secnet1",
    )
    blocks = [
        to["ipBlock"]
        for rule in json.loads(body)["spec"]["egress"]
        for to in rule.get("to", [])
        if "ipBlock" in to
    ]
    assert [b["cidr"] for b in blocks] == ["0.0.0.0/1"]  # the others are gone whole
    assert "10.0.0.0/8" in blocks[0]["except"] and "100.64.0.0/10" in blocks[0]["except"]
