"""deploy/kubernetes applied to the real API server, and its Role checked for real: the engine
runs every operation with the server's ServiceAccount token and nothing more, and what the
Role leaves out is refused (least privilege).

No kustomize binary here: the two transforms deploy/kubernetes/kustomization.yaml uses (the
namespace and the image tag) are applied by :func:`_kustomize`, for exactly those fields."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.kube import ControlPlane
from support.loopkubelet import LoopKubelet

from sandlot.engines.base import NetworkMode, SandboxSpec, SandboxState
from sandlot.engines.kubernetes.engine import KubernetesEngine
from sandlot.engines.kubernetes.settings import KubernetesSettings
from sandlot.instance_types import get_instance_type

DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "kubernetes"
NAMESPACE = "sandlot"

#: kind -> (API path prefix, namespaced)
_PATHS = {
    "Namespace": ("/api/v1", False),
    "ServiceAccount": ("/api/v1", True),
    "Service": ("/api/v1", True),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", True),
    "Deployment": ("/apis/apps/v1", True),
}


def _kustomize() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    namespace = kustomization["namespace"]
    images = {i["name"]: i for i in kustomization.get("images", [])}
    objects = []
    for name in kustomization["resources"]:
        for obj in yaml.safe_load_all((DEPLOY / name).read_text()):
            if _PATHS[obj["kind"]][1]:
                obj["metadata"]["namespace"] = namespace
            for subject in obj.get("subjects", []):
                if subject["kind"] == "ServiceAccount":
                    subject["namespace"] = namespace
            if obj["kind"] == "Deployment":
                for c in obj["spec"]["template"]["spec"]["containers"]:
                    if c["image"] in images:
                        c["image"] += ":" + images[c["image"]]["newTag"]
            objects.append(obj)
    return objects


def _plural(kind: str) -> str:
    return kind.lower() + ("es" if kind.endswith("s") else "s")


@pytest.fixture(scope="module")
def applied(control_plane: ControlPlane) -> Iterator[list[dict[str, Any]]]:
    objects = _kustomize()
    for obj in objects:
        prefix, namespaced = _PATHS[obj["kind"]]
        ns = f"/namespaces/{obj['metadata']['namespace']}" if namespaced else ""
        status, body = control_plane.request(
            "POST", f"{prefix}{ns}/{_plural(obj['kind'])}", json.dumps(obj).encode()
        )
        assert status == 201, (obj["kind"], body[:500])
    control_plane.namespace(NAMESPACE)  # + its default ServiceAccount (a controller's job)
    yield objects
    control_plane.request("DELETE", f"/api/v1/namespaces/{NAMESPACE}")


@pytest.fixture(scope="module")
def server_token(control_plane: ControlPlane, applied: list[dict[str, Any]]) -> str:
    """A token of the manifests' ServiceAccount (TokenRequest: what a Pod of the Deployment
    gets mounted), signed by the control plane's service-account key."""
    status, body = control_plane.request(
        "POST",
        f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/sandlot-server/token",
        json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest"}).encode(),
    )
    assert status == 201, body
    token: str = json.loads(body)["status"]["token"]
    return token


def test_the_manifests_apply(applied: list[dict[str, Any]], control_plane: ControlPlane) -> None:
    kinds = sorted(o["kind"] for o in applied)
    assert kinds == sorted(_PATHS)
    _, body = control_plane.request(
        "GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/sandlot-server"
    )
    deployment = json.loads(body)
    pod = deployment["spec"]["template"]
    # the label the sandboxes' NetworkPolicies admit to their agents
    assert pod["metadata"]["labels"] == dict(KubernetesSettings().server_pod_labels)
    assert pod["spec"]["serviceAccountName"] == "sandlot-server"
    assert pod["spec"]["containers"][0]["image"] == "sandlot-server:latest"


@pytest.mark.anyio
async def test_the_role_is_enough_for_every_engine_operation(
    control_plane: ControlPlane, server_token: str
) -> None:
    settings = KubernetesSettings(
        namespace=NAMESPACE,
        kubeconfig=str(control_plane.kubeconfig("sa-sandlot-server", server_token)),
        start_timeout=30,
    )
    engine = KubernetesEngine(settings)
    with LoopKubelet(control_plane, NAMESPACE):
        try:
            spec = SandboxSpec("rbac1", "debian", get_instance_type("nano"), secret="x")
            assert (await engine.create(spec)).state is SandboxState.RUNNING
            await engine.set_network("rbac1", NetworkMode.OUTBOUND, ("10.0.0.0/8",))
            await engine.stop("rbac1")
            assert (await engine.start("rbac1")).state is SandboxState.RUNNING
            assert [i.id for i in await engine.list()] == ["rbac1"]
            assert await engine.recover() == []
            elector = engine.leadership("replica-1")
            assert await elector.try_acquire()
            await elector.release()
            await engine.delete("rbac1")
            assert await engine.list() == []
        finally:
            await engine.close()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/nodes"),  # nothing cluster-wide
        ("GET", "/api/v1/namespaces/default/secrets"),  # nothing outside its namespace
        ("GET", "/api/v1/namespaces/kube-system/pods"),
        ("GET", "/api/v1/secrets"),
        ("POST", f"/api/v1/namespaces/{NAMESPACE}/pods/x/exec"),  # no way into a sandbox
        ("POST", f"/api/v1/namespaces/{NAMESPACE}/pods/x/portforward"),
        ("PUT", f"/api/v1/namespaces/{NAMESPACE}/secrets/sandlot-x"),  # no rewriting secrets
        ("POST", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"),
        ("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NAMESPACE}/roles"),
        ("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/sandlot-server"),
    ],
)
def test_the_role_refuses_the_rest(
    control_plane: ControlPlane, server_token: str, method: str, path: str
) -> None:
    status, body = control_plane.request(method, path, b"{}", token=server_token)
    assert status == 403, (status, body[:300])
