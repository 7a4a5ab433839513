"""The kubernetes engine against a real kube-apiserver: the objects it makes (read back from the
API server), the agent reached at the Pod IP, sleep as scale to zero, delete and recovery.

What a kubelet would do to Pods is done by the loopback stand-in (support/loopkubelet.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from support.kube import ControlPlane
from support.loopkubelet import UNPULLABLE, LoopKubelet

from sandlot.engines.base import (
    EngineError,
    ImageError,
    NetworkMode,
    SandboxNotFound,
    SandboxSpec,
    SandboxState,
)
from sandlot.engines.kubernetes.engine import KubernetesEngine
from sandlot.engines.kubernetes.manifests import object_name
from sandlot.engines.kubernetes.settings import KubernetesSettings
from sandlot.instance_types import get_instance_type

pytestmark = pytest.mark.anyio


def _spec(sandbox_id: str, **kw: Any) -> SandboxSpec:
    base: dict[str, Any] = {
        "id": sandbox_id,
        "image": "docker.io/library/python:3.12-slim",
        "instance_type": get_instance_type("small"),
        "secret": "s3cret-" + sandbox_id,
    }
    return SandboxSpec(**{**base, **kw})


def _get(cp: ControlPlane, path: str) -> tuple[int, dict[str, Any]]:
    status, body = cp.request("GET", path)
    return status, json.loads(body)


def _objects(cp: ControlPlane, ns: str, sandbox_id: str) -> dict[str, int]:
    name = object_name(sandbox_id)
    paths = {
        "pod": f"/api/v1/namespaces/{ns}/pods/{name}",
        "secret": f"/api/v1/namespaces/{ns}/secrets/{name}",
        "pvc": f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}-workspace",
        "netpol": f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/{name}",
    }
    found = {}
    for kind, path in paths.items():
        status, body = cp.request("GET", path)
        # A claim being deleted waits for the pvc-protection controller (not running here) to
        # drop its finalizer: deleted as far as the API goes.
        if status == 200 and json.loads(body)["metadata"].get("deletionTimestamp"):
            status = 404
        found[kind] = status
    return found


async def _run(address: Any, secret: str, cmd: str) -> dict[str, Any]:
    async with httpx.AsyncClient(
        base_url=f"http://{address.host}:{address.port}",
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    ) as http:
        resp = await http.post("/run", json={"cmd": cmd})
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result


async def _healthy(address: Any) -> None:
    """The agent answers (a kubelet reports Running once the process starts, not once it
    listens: the server's own wait_healthy does the same)."""
    import anyio

    async with httpx.AsyncClient(base_url=f"http://{address.host}:{address.port}") as http:
        for _ in range(500):
            try:
                if (await http.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.02)
    raise AssertionError("agent never answered")


async def test_create_makes_a_pod_whose_agent_answers_at_the_pod_ip(
    kube_engine: KubernetesEngine, control_plane: ControlPlane, namespace: str
) -> None:
    spec = _spec("k8screate1", env={"GREETING": "hello from k8s", "weird name!": "x"})
    info = await kube_engine.create(spec)
    assert info.state is SandboxState.RUNNING
    assert info.agent_address.host is not None and info.agent_address.host.startswith("127.77.")
    await _healthy(info.agent_address)
    out = await _run(info.agent_address, spec.secret, "echo $GREETING")
    assert out["stdout"] == "hello from k8s\n"

    status, pod = _get(control_plane, f"/api/v1/namespaces/{namespace}/pods/sandlot-k8screate1")
    assert status == 200
    labels = pod["metadata"]["labels"]
    assert labels["sandlot.dev/sandbox"] == "k8screate1"
    assert labels["app.kubernetes.io/managed-by"] == "sandlot"
    container = pod["spec"]["containers"][0]
    # instance type -> requests and limits (small: 1 vCPU, 1 GiB, 4 GiB of disk)
    assert container["resources"]["limits"] == {
        "cpu": "1",
        "memory": "1Gi",
        "ephemeral-storage": "4Gi",
    }
    assert container["resources"]["requests"] == container["resources"]["limits"]
    # the agent comes from the runtime image through an init container, not from the image
    assert pod["spec"]["initContainers"][0]["image"] == kube_engine.settings.runtime_image
    assert container["command"][0] == "/.sandlot/runtime/bin/sandlot-init"
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert "runtimeClassName" not in pod["spec"]


async def test_secret_and_env_values_never_appear_in_the_pod_spec(
    kube_engine: KubernetesEngine, control_plane: ControlPlane, namespace: str
) -> None:
    spec = _spec("k8ssecret1", env={"API_KEY": "value-that-must-stay-secret"})
    await kube_engine.create(spec)
    _, pod = _get(control_plane, f"/api/v1/namespaces/{namespace}/pods/sandlot-k8ssecret1")
    text = json.dumps(pod)
    assert spec.secret not in text
    assert "value-that-must-stay-secret" not in text
    # ...they are in the Secret, which the Pod mounts (0400) and references by key
    _, secret = _get(control_plane, f"/api/v1/namespaces/{namespace}/secrets/sandlot-k8ssecret1")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["secret"] == spec.secret
    assert "value-that-must-stay-secret" in data.values()
    assert spec.secret not in json.dumps(secret["metadata"])
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert volume["secret"]["secretName"] == "sandlot-k8ssecret1"
    assert volume["secret"]["defaultMode"] == 0o400


async def test_gvisor_runtime_sets_the_runtime_class(
    kube_engine: KubernetesEngine, control_plane: ControlPlane, namespace: str
) -> None:
    # Without the cluster's RuntimeClass, the API server refuses the Pod: a clear error
    with pytest.raises(EngineError, match='RuntimeClass "gvisor" not found'):
        await kube_engine.create(_spec("k8sgvisor0", runtime="gvisor"))
    assert set(_objects(control_plane, namespace, "k8sgvisor0").values()) == {404}
    # The cluster admin's part (docs/kubernetes.md): a RuntimeClass for runsc's shim
    body = json.dumps(
        {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": "gvisor"},
            "handler": "runsc",
        }
    ).encode()
    status, _ = control_plane.request("POST", "/apis/node.k8s.io/v1/runtimeclasses", body)
    assert status in (201, 409)
    await kube_engine.create(_spec("k8sgvisor1", runtime="gvisor"))
    _, pod = _get(control_plane, f"/api/v1/namespaces/{namespace}/pods/sandlot-k8sgvisor1")
    assert pod["spec"]["runtimeClassName"] == "gvisor"


async def test_egress_policy_becomes_a_network_policy_and_changes_live(
    kube_engine: KubernetesEngine, control_plane: ControlPlane, namespace: str
) -> None:
    path = f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/sandlot-k8snet1"
    await kube_engine.create(_spec("k8snet1"))
    _, policy = _get(control_plane, path)
    assert policy["spec"]["podSelector"]["matchLabels"] == {"sandlot.dev/sandbox": "k8snet1"}
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"].get("egress", []) == []  # network "none": nothing out
    ingress = policy["spec"]["ingress"]
    assert ingress[0]["ports"] == [{"protocol": "TCP", "port": 7070}]

    def blocks() -> list[dict[str, Any]]:
        _, policy = _get(control_plane, path)
        return [
            to["ipBlock"]
            for rule in policy["spec"]["egress"]
            for to in rule.get("to", [])
            if "ipBlock" in to
        ]

    await kube_engine.set_network("k8snet1", NetworkMode.OUTBOUND, ("203.0.113.0/24",))
    assert blocks() == [{"cidr": "203.0.113.0/24"}]
    _, policy = _get(control_plane, path)
    dns = policy["spec"]["egress"][0]  # the cluster's DNS Pods, and only them
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}

    await kube_engine.set_network("k8snet1", NetworkMode.OUTBOUND, None)
    everywhere = blocks()
    assert everywhere[0]["cidr"] == "0.0.0.0/0"
    assert {"10.0.0.0/8", "169.254.0.0/16", "192.168.0.0/16"} <= set(everywhere[0]["except"])
    assert everywhere[1]["cidr"] == "::/0"


async def test_deep_sleep_deletes_the_pod_and_keeps_secret_volume_and_policy(
    kube_engine: KubernetesEngine, control_plane: ControlPlane, namespace: str
) -> None:
    spec = _spec("k8ssleep1", env={"KEPT": "yes"})
    first = await kube_engine.create(spec)
    await kube_engine.stop("k8ssleep1")
    assert _objects(control_plane, namespace, "k8ssleep1") == {
        "pod": 404,
        "secret": 200,
        "pvc": 200,
        "netpol": 200,
    }
    assert (await kube_engine.inspect("k8ssleep1")).state is SandboxState.STOPPED
    assert [i.id for i in await kube_engine.list()] == ["k8ssleep1"]

    woken = await kube_engine.start("k8ssleep1")
    assert woken.state is SandboxState.RUNNING
    assert woken.agent_address != first.agent_address  # a new Pod, a new IP
    await _healthy(woken.agent_address)
    out = await _run(woken.agent_address, spec.secret, "echo $KEPT")  # same secret, same env
    assert out["stdout"] == "yes\n"


async def test_delete_removes_every_object_and_is_idempotent(
    kube_engine: KubernetesEngine, control_plane: ControlPlane, namespace: str, kubelet: LoopKubelet
) -> None:
    info = await kube_engine.create(_spec("k8sdel1"))
    await kube_engine.delete("k8sdel1")
    await kube_engine.delete("k8sdel1")
    assert set(_objects(control_plane, namespace, "k8sdel1").values()) == {404}
    assert info.agent_address.host not in kubelet.pod_ips()
    with pytest.raises(SandboxNotFound):
        await kube_engine.inspect("k8sdel1")
    assert await kube_engine.list() == []


async def test_an_image_that_cannot_be_pulled_fails_the_create_and_leaves_nothing(
    kube_engine: KubernetesEngine, control_plane: ControlPlane, namespace: str
) -> None:
    with pytest.raises(ImageError, match="cannot be pulled: ErrImagePull"):
        await kube_engine.create(_spec("k8sbadimg1", image=UNPULLABLE))
    assert set(_objects(control_plane, namespace, "k8sbadimg1").values()) == {404}


async def test_pool_pods_start_unclaimed_without_a_secret(
    kube_engine: KubernetesEngine, control_plane: ControlPlane, namespace: str
) -> None:
    info = await kube_engine.create(_spec("k8spool1", pool=True, secret=""))
    _, pod = _get(control_plane, f"/api/v1/namespaces/{namespace}/pods/sandlot-k8spool1")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["SANDBOX_AUTH_MODE"] == "pool"
    assert "SANDBOX_SECRET_FILE" not in env
    assert pod["metadata"]["labels"]["sandlot.dev/pool"] == "true"
    await _healthy(info.agent_address)
    # the first bearer token claims it; another is refused afterwards
    assert (await _run(info.agent_address, "claimer", "echo ok"))["stdout"] == "ok\n"
    with pytest.raises(httpx.HTTPStatusError):
        await _run(info.agent_address, "someone-else", "echo no")


async def test_recover_removes_pods_whose_secret_is_gone(
    kube_engine: KubernetesEngine, control_plane: ControlPlane, namespace: str
) -> None:
    """A create that died between its Pod and ... or a delete that died after the Secret:
    the Pod has no record left and is removed."""
    await kube_engine.create(_spec("k8sorphan1"))
    await kube_engine.create(_spec("k8skept1"))
    # The Secret alone goes (the garbage collector, which would take the Pod with it, does
    # not run on this control plane: exactly a crash's leftovers).
    status, _ = control_plane.request(
        "DELETE", f"/api/v1/namespaces/{namespace}/secrets/sandlot-k8sorphan1"
    )
    assert status == 200
    assert await kube_engine.recover() == ["k8sorphan1"]
    assert set(_objects(control_plane, namespace, "k8sorphan1").values()) == {404}
    assert [i.id for i in await kube_engine.list()] == ["k8skept1"]


async def test_a_private_image_gets_its_own_pull_secret(
    kube_engine: KubernetesEngine, control_plane: ControlPlane, namespace: str
) -> None:
    from sandlot.engines.base import RegistryAuth

    auth = RegistryAuth("registry.example:5000", "robot", "pull-password")
    await kube_engine.create(_spec("k8spull1", registry_auth=auth))
    _, pod = _get(control_plane, f"/api/v1/namespaces/{namespace}/pods/sandlot-k8spull1")
    assert pod["spec"]["imagePullSecrets"] == [{"name": "sandlot-k8spull1-pull"}]
    assert "pull-password" not in json.dumps(pod)
    path = f"/api/v1/namespaces/{namespace}/secrets/sandlot-k8spull1-pull"
    _, pull = _get(control_plane, path)
    assert pull["type"] == "kubernetes.io/dockerconfigjson"
    config = json.loads(base64.b64decode(pull["data"][".dockerconfigjson"]))
    assert list(config["auths"]) == ["registry.example:5000"]  # for that registry only
    # kept through deep sleep (the Pod made again needs it), gone with the sandbox
    await kube_engine.stop("k8spull1")
    await kube_engine.start("k8spull1")
    _, pod = _get(control_plane, f"/api/v1/namespaces/{namespace}/pods/sandlot-k8spull1")
    assert pod["spec"]["imagePullSecrets"] == [{"name": "sandlot-k8spull1-pull"}]
    await kube_engine.delete("k8spull1")
    assert control_plane.request("GET", path)[0] == 404


async def test_pod_user_namespaces_set_host_users_false(
    kube_settings: KubernetesSettings,
    kubelet: LoopKubelet,
    control_plane: ControlPlane,
    namespace: str,
) -> None:
    import dataclasses

    engine = KubernetesEngine(dataclasses.replace(kube_settings, user_namespaces=True))
    try:
        await engine.create(_spec("k8susers1"))
        _, pod = _get(control_plane, f"/api/v1/namespaces/{namespace}/pods/sandlot-k8susers1")
        assert pod["spec"]["hostUsers"] is False
        await engine.delete("k8susers1")
    finally:
        await engine.close()


async def test_a_main_command_runs_from_the_secret_and_survives_deep_sleep(
    kube_engine: KubernetesEngine, control_plane: ControlPlane, namespace: str
) -> None:
    import anyio

    spec = _spec("k8smain1", command="echo main-ran >> main.log; exec sleep 600")
    info = await kube_engine.create(spec)
    _, pod = _get(control_plane, f"/api/v1/namespaces/{namespace}/pods/sandlot-k8smain1")
    assert "main-ran" not in json.dumps(pod)  # the line is in the Secret, like env values
    await _healthy(info.agent_address)
    for _ in range(250):
        out = await _run(info.agent_address, spec.secret, "cat main.log 2>/dev/null")
        if out["stdout"]:
            break
        await anyio.sleep(0.02)
    assert out["stdout"] == "main-ran\n"
    await kube_engine.stop("k8smain1")
    again = await kube_engine.start("k8smain1")  # the command comes back from the Secret
    _, pod = _get(control_plane, f"/api/v1/namespaces/{namespace}/pods/sandlot-k8smain1")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["SANDLOT_MAIN_COMMAND_FILE"] == "/.sandlot/config/main"
    assert again.state is SandboxState.RUNNING


async def test_snapshots_are_refused_with_a_message(kube_engine: KubernetesEngine) -> None:
    with pytest.raises(EngineError, match="snapshots are not available"):
        await kube_engine.create(_spec("k8ssnap1", snapshot="snap-1"))
