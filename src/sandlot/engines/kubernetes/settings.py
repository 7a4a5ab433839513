"""How a sandlot server uses its cluster (``sandlot server --engine kubernetes ...``): the bottom
layer of the kubernetes engine, read by every other module of it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

#: The port the agent listens on in every sandbox Pod (its Pod IP's; nothing else reaches it
#: but the sandlot server, see :mod:`.policies`).
AGENT_PORT = 7070

#: The image holding the agent runtime at ``/.sandlot/runtime`` (``python -m sandlot.images
#: runtime-image`` builds it; docs/kubernetes.md). Tagged by sandlot's version.
DEFAULT_RUNTIME_IMAGE = "sandlot-runtime:latest"

#: Runtime (``SandboxSpec.runtime``) -> RuntimeClass name (None: the cluster's default runtime).
#: gVisor's containerd shim is usually installed as the RuntimeClass ``gvisor`` (handler
#: ``runsc``); ``--runtime-class gvisor=NAME`` changes it.
DEFAULT_RUNTIME_CLASSES: Mapping[str, str | None] = {"crun": None, "gvisor": "gvisor"}


#: What the ``default`` image (and its ``koyeb/sandbox`` aliases) means on a cluster: a
#: registry image with the same Debian and Python as the local default image.
DEFAULT_IMAGE = "docker.io/library/python:3.11-slim-bookworm"


DEFAULT_BLOCKED_CIDRS = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "fc00::/7",
    "fe80::/10",
    "::1/128",
)


@dataclass(frozen=True)
class KubernetesSettings:
    #: The namespace sandboxes live in (the server's Role grants rights there only).
    namespace: str = "sandlot"
    #: A kubeconfig file; None: the in-cluster service account, else ``~/.kube/config``.
    kubeconfig: str | None = None
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    #: The image of sandboxes created with the ``default`` image.
    default_image: str = DEFAULT_IMAGE
    runtime_classes: Mapping[str, str | None] = field(
        default_factory=lambda: dict(DEFAULT_RUNTIME_CLASSES)
    )
    #: StorageClass of the sandboxes' PersistentVolumeClaims (None: the cluster's default).
    storage_class: str | None = None
    #: Labels a Pod's ``nodeSelector`` must match (e.g. nodes that have the gVisor runtime).
    node_selector: Mapping[str, str] = field(default_factory=dict)
    #: How long a create or start waits for the Pod to run (image pulls included).
    start_timeout: float = 300.0
    #: ``imagePullPolicy`` of the sandboxes' containers.
    image_pull_policy: str = "IfNotPresent"
    #: Whether ``privileged`` sandboxes may be made (``--allow-privileged-pods``). Off by
    #: default: a privileged container is root on its node, with every other tenant's Pods on
    #: it, whatever the token's scope says.
    allow_privileged: bool = False
    #: Run each sandbox Pod in its own user namespace (``hostUsers: false``,
    #: ``--pod-user-namespaces``): root inside is an unprivileged uid on the node, as with the
    #: local engine. Off by default: it needs Kubernetes >= 1.33 (or the UserNamespacesSupport
    #: gate), a runtime that supports it (containerd >= 2.0, CRI-O >= 1.25) and a kernel with
    #: id-mapped mounts for the Pods' filesystems; where missing, Pods do not start.
    user_namespaces: bool = False
    #: Networks no sandbox reaches, whatever its egress policy or allowlist says: the cluster's
    #: own (Pods, Services, the API server, an in-cluster database) and the cloud's metadata
    #: service live in them. Private, shared and link-local ranges by default.
    blocked_cidrs: tuple[str, ...] = DEFAULT_BLOCKED_CIDRS
    #: The cluster DNS Pods outbound sandboxes may ask (namespace, Pod labels).
    dns_namespace: str = "kube-system"
    dns_pod_labels: Mapping[str, str] = field(default_factory=lambda: {"k8s-app": "kube-dns"})
    #: The server's own Pods' labels: the agents' NetworkPolicy admits them alone (and nothing
    #: else in the cluster) to the agent port.
    server_pod_labels: Mapping[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "sandlot-server"}
    )
