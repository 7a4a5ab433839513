"""The Kubernetes objects of one sandbox, as plain manifests (pure functions: no API calls).

A sandbox ``ID`` is, all named ``sandlot-ID`` and labelled ``sandlot.dev/sandbox=ID``:

- a **Secret**: the agent's bearer secret and the user's environment values (so neither ever
  appears in the Pod spec), plus the sandbox's spec (annotation ``sandlot.dev/spec``, without
  secrets). It lives as long as the sandbox, sleeping included: it is the engine's record, and
  the owner of the objects below (deleting it lets the garbage collector remove them too);
- a **PersistentVolumeClaim** (``sandlot-ID-workspace``) mounted at :data:`VOLUME_PATH`: what
  survives deep sleep, when the Pod is deleted (Kubernetes cannot freeze a Pod: sleep is scale
  to zero);
- a **NetworkPolicy**: the egress policy, and ingress to the agent from the server's Pods only
  (enforced only where the cluster's network plugin enforces NetworkPolicies);
- a **Pod**: an init container copies the agent runtime (a self-contained Python, see
  :mod:`sandlot.runtime.closure`) from :attr:`~.KubernetesSettings.runtime_image` into an
  ``emptyDir``, which the sandbox's container mounts read-only at ``/.sandlot/runtime`` and
  runs ``sandlot-init`` from: the agent needs nothing of the sandbox's image.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from sandlot.engines.base import NetworkMode, SandboxSpec
from sandlot.engines.kubernetes.settings import AGENT_PORT, KubernetesSettings
from sandlot.images.store import DEFAULT_IMAGE_ALIASES
from sandlot.paths import (
    SANDBOX_CONFIG_DIR,
    SANDBOX_MAIN_COMMAND_FILE,
    SANDBOX_PROCESS_JOURNAL,
    SANDBOX_RUNTIME_DIR,
)
from sandlot.runtime.closure import agent_command

Manifest = dict[str, Any]

MANAGED_BY = {"app.kubernetes.io/managed-by": "sandlot"}
SANDBOX_LABEL = "sandlot.dev/sandbox"
POOL_LABEL = "sandlot.dev/pool"
SPEC_ANNOTATION = "sandlot.dev/spec"
#: Selects every object this engine made.
SELECTOR = "app.kubernetes.io/managed-by=sandlot"

SANDBOX_CONTAINER = "sandbox"
#: Where the PersistentVolumeClaim is mounted: what a sandbox writes here survives deep sleep.
VOLUME_PATH = "/workspace"
#: The secret's key in the Secret, and the file the agent reads it from.
SECRET_KEY = "secret"
#: The main process's command line (``SandboxSpec.command``), in the Secret and its volume.
MAIN_KEY = "main"
_RUNTIME_COPY = "/.sandlot/runtime-copy"
_RUN_DIR = "/.sandlot/run"


def object_name(sandbox_id: str) -> str:
    return f"sandlot-{sandbox_id}"


def claim_name(sandbox_id: str) -> str:
    """The PersistentVolumeClaim's name: not the Secret's, which podman's kube play would take
    for the claim's volume when mounting the Secret (its names share one space there)."""
    return f"sandlot-{sandbox_id}-workspace"


def sandbox_id_of(metadata_labels: dict[str, str] | None) -> str | None:
    return (metadata_labels or {}).get(SANDBOX_LABEL)


def _labels(spec_id: str, pool: bool) -> dict[str, str]:
    return {**MANAGED_BY, SANDBOX_LABEL: spec_id, POOL_LABEL: "true" if pool else "false"}


def _quantity_mi(mb: int) -> str:
    return f"{mb}Mi"


def _cpu(vcpu: float) -> str:
    return f"{round(vcpu * 1000)}m"


def public_spec(spec: SandboxSpec) -> dict[str, Any]:
    """What the ``sandlot.dev/spec`` annotation keeps: enough to make the Pod again after deep
    sleep or a restart, and nothing secret (env values and the agent secret are in the
    Secret's data; registry credentials are not kept at all)."""
    return {
        "id": spec.id,
        "project": spec.project,
        "image": spec.image,
        "instance_type": spec.instance_type.name,
        "name": spec.name,
        "privileged": spec.privileged,
        "network": spec.network.value,
        "outbound_allowlist": (
            list(spec.outbound_allowlist) if spec.outbound_allowlist is not None else None
        ),
        "labels": dict(spec.labels),
        "pool": spec.pool,
        "runtime": spec.runtime,
        "env_names": list(spec.env),
    }


def secret(spec: SandboxSpec) -> Manifest:
    """The sandbox's Secret. Env values are keyed ``env-N`` (a Secret's keys allow fewer
    characters than environment names do); the names, in order, are in the spec annotation."""
    data: dict[str, str] = {f"env-{i}": value for i, value in enumerate(spec.env.values())}
    if not spec.pool:
        data[SECRET_KEY] = spec.secret
    if spec.command is not None:
        data[MAIN_KEY] = spec.command  # a main process's line may carry credentials too
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": object_name(spec.id),
            "labels": _labels(spec.id, spec.pool),
            "annotations": {SPEC_ANNOTATION: json.dumps(public_spec(spec))},
        },
        "type": "Opaque",
        "stringData": data,
    }


def owned_by(secret_uid: str, sandbox_id: str) -> list[dict[str, Any]]:
    """The ownerReferences that make the Secret the owner of the sandbox's other objects."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "name": object_name(sandbox_id),
            "uid": secret_uid,
        }
    ]


def volume_claim(spec: SandboxSpec, settings: KubernetesSettings, owner: list[Any]) -> Manifest:
    claim: Manifest = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim_name(spec.id),
            "labels": _labels(spec.id, spec.pool),
            "ownerReferences": owner,
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": _quantity_mi(spec.instance_type.disk_mb)}},
        },
    }
    if settings.storage_class is not None:
        claim["spec"]["storageClassName"] = settings.storage_class
    return claim


def network_policy(
    sandbox_id: str,
    mode: NetworkMode,
    allowlist: tuple[str, ...] | None,
    settings: KubernetesSettings,
    owner: list[Any],
) -> Manifest:
    """Ingress: the agent port, from the server's Pods only. Egress: nothing (``none``), or the
    allowlist's networks (everywhere without one) less the operator's blocked ones
    (:attr:`~.KubernetesSettings.blocked_cidrs`: the cluster's own networks and the metadata
    service), plus the cluster's DNS Pods."""
    egress: list[dict[str, Any]] = []
    if mode is NetworkMode.OUTBOUND:
        wanted = allowlist if allowlist is not None else ("0.0.0.0/0", "::/0")
        egress.append(
            {
                "to": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": settings.dns_namespace}
                        },
                        "podSelector": {"matchLabels": dict(settings.dns_pod_labels)},
                    }
                ],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            }
        )
        blocks = ip_blocks(wanted, settings.blocked_cidrs)
        if blocks:
            egress.append({"to": [{"ipBlock": block} for block in blocks]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": object_name(sandbox_id),
            "labels": {**MANAGED_BY, SANDBOX_LABEL: sandbox_id},
            "ownerReferences": owner,
        },
        "spec": {
            "podSelector": {"matchLabels": {SANDBOX_LABEL: sandbox_id}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": dict(settings.server_pod_labels)}}],
                    "ports": [{"protocol": "TCP", "port": AGENT_PORT}],
                }
            ],
            "egress": egress,
        },
    }


def ip_blocks(wanted: tuple[str, ...], blocked: tuple[str, ...]) -> list[dict[str, Any]]:
    """``ipBlock``s reaching ``wanted`` but none of ``blocked``: a wanted network inside a
    blocked one is left out (a tenant's allowlist naming the cluster's own network reaches
    nothing), one holding blocked networks gets them as ``except``."""
    out: list[dict[str, Any]] = []
    nets = [ipaddress.ip_network(b, strict=False) for b in blocked]
    for cidr in wanted:
        net = ipaddress.ip_network(cidr, strict=False)
        same = [b for b in nets if b.version == net.version]
        if any(net.subnet_of(b) for b in same):  # type: ignore[arg-type]
            continue
        inside = [str(b) for b in same if b.subnet_of(net)]  # type: ignore[arg-type]
        block: dict[str, Any] = {"cidr": str(net)}
        if inside:
            block["except"] = inside
        out.append(block)
    return out


def _hostname(spec: SandboxSpec) -> str:
    name = (spec.name or spec.id).lower()[:63]
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name).strip("-")
    return name or spec.id[:12]


def image_of(spec: SandboxSpec, settings: KubernetesSettings) -> str:
    return settings.default_image if spec.image in DEFAULT_IMAGE_ALIASES else spec.image


def pod(
    spec: SandboxSpec,
    settings: KubernetesSettings,
    owner: list[Any],
    image_pull_secret: str | None = None,
) -> Manifest:
    """The sandbox's Pod. Its env carries names only; every value comes from the Secret."""
    it = spec.instance_type
    name = object_name(spec.id)
    env: list[dict[str, Any]] = [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": name, "key": f"env-{i}"}}}
        for i, k in enumerate(spec.env)
    ]
    env.append({"name": "SANDLOT_PROCESS_JOURNAL", "value": SANDBOX_PROCESS_JOURNAL})
    if spec.pool:
        env += [
            {"name": "SANDBOX_AUTH_MODE", "value": "pool"},
            {"name": "SANDBOX_SECRET_PATH", "value": f"{_RUN_DIR}/secret"},
        ]
    else:
        env.append({"name": "SANDBOX_SECRET_FILE", "value": f"{SANDBOX_CONFIG_DIR}/{SECRET_KEY}"})
    if spec.command is not None:
        env.append({"name": "SANDLOT_MAIN_COMMAND_FILE", "value": SANDBOX_MAIN_COMMAND_FILE})
    resources = {
        "cpu": _cpu(it.vcpu),
        "memory": _quantity_mi(it.memory_mb),
        "ephemeral-storage": _quantity_mi(it.disk_mb),
    }
    container: Manifest = {
        "name": SANDBOX_CONTAINER,
        "image": image_of(spec, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": agent_command(f"tcp:0.0.0.0:{AGENT_PORT}"),
        "env": env,
        "ports": [{"name": "agent", "containerPort": AGENT_PORT, "protocol": "TCP"}],
        "resources": {"requests": resources, "limits": resources},
        "readinessProbe": {
            "tcpSocket": {"port": AGENT_PORT},
            "periodSeconds": 1,
            "failureThreshold": 3,
        },
        "volumeMounts": [
            {"name": "runtime", "mountPath": SANDBOX_RUNTIME_DIR, "readOnly": True},
            {"name": "run", "mountPath": _RUN_DIR},
            {"name": "workspace", "mountPath": VOLUME_PATH},
        ],
        "securityContext": {"privileged": spec.privileged},
    }
    volumes: list[Manifest] = [
        {"name": "runtime", "emptyDir": {}},
        {"name": "run", "emptyDir": {"medium": "Memory"}},
        {"name": "workspace", "persistentVolumeClaim": {"claimName": claim_name(spec.id)}},
    ]
    items = [] if spec.pool else [{"key": SECRET_KEY, "path": SECRET_KEY}]
    if spec.command is not None:
        items.append({"key": MAIN_KEY, "path": MAIN_KEY})
    if items:
        container["volumeMounts"].append(
            {"name": "config", "mountPath": SANDBOX_CONFIG_DIR, "readOnly": True}
        )
        volumes.append(
            {
                "name": "config",
                "secret": {
                    "secretName": name,
                    "defaultMode": 0o400,
                    "items": items,
                    # Kubernetes' default, spelt out: podman 4.3's kube play dereferences it.
                    "optional": False,
                },
            }
        )
    pod_spec: Manifest = {
        "hostname": _hostname(spec),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 5,
        "initContainers": [
            {
                "name": "sandlot-runtime",
                "image": settings.runtime_image,
                "imagePullPolicy": settings.image_pull_policy,
                # The runtime image's own static busybox: nothing of a shell is assumed. -f:
                # an init container runs again into the same emptyDir when the Pod's sandbox
                # restarts (seen with podman kube play), and plain -a fails on the links.
                "command": [
                    f"{SANDBOX_RUNTIME_DIR}/bin/busybox",
                    "cp",
                    "-af",
                    f"{SANDBOX_RUNTIME_DIR}/.",
                    _RUNTIME_COPY,
                ],
                "volumeMounts": [{"name": "runtime", "mountPath": _RUNTIME_COPY}],
                "resources": {
                    "requests": {"cpu": "50m", "memory": "64Mi"},
                    "limits": {"cpu": "500m", "memory": "64Mi"},
                },
            }
        ],
        "containers": [container],
        "volumes": volumes,
    }
    runtime_class = settings.runtime_classes.get(spec.runtime)
    if runtime_class:
        pod_spec["runtimeClassName"] = runtime_class
    if settings.user_namespaces and not spec.privileged:  # privileged needs the node's users
        pod_spec["hostUsers"] = False
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if image_pull_secret is not None:
        pod_spec["imagePullSecrets"] = [{"name": image_pull_secret}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": _labels(spec.id, spec.pool),
            "ownerReferences": owner,
        },
        "spec": pod_spec,
    }


def registry_secret(spec: SandboxSpec, owner: list[Any]) -> Manifest | None:
    """A ``kubernetes.io/dockerconfigjson`` Secret for a private image, or None."""
    auth = spec.registry_auth
    if auth is None:
        return None
    import base64

    token = base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()
    config = {"auths": {auth.registry: {"auth": token}}}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": f"{object_name(spec.id)}-pull",
            "labels": {**MANAGED_BY, SANDBOX_LABEL: spec.id},
            "ownerReferences": owner,
        },
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": json.dumps(config)},
    }
