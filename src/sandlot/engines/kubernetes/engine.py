"""The kubernetes engine: each sandbox a Pod on a cluster (objects in :mod:`.manifests`).

The server reaches each agent at its Pod IP (:data:`~.settings.AGENT_PORT`), exactly as it
reaches a local agent's socket: exec, files, exposed ports and the TCP proxy all go through the
agent, so nothing else of a sandbox (no Service, no Ingress) is made.

Sleep: Kubernetes has no way to freeze a Pod's processes, so this engine has no light sleep
(:attr:`KubernetesEngine.can_freeze` is False and the server sleeps deep instead); deep sleep
deletes the Pod and keeps its Secret, NetworkPolicy and PersistentVolumeClaim (what the sandbox
wrote under :data:`~.manifests.VOLUME_PATH`); waking makes the Pod again from the spec the Secret
keeps.

Measured against a local kube-apiserver (tests/engines/kubernetes, bench part ``kubernetes``):
see docs/kubernetes.md.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
from collections.abc import Awaitable
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from sandlot.agent.commands import HIDDEN_ENV
from sandlot.engines.base import (
    AgentAddress,
    EngineError,
    EngineUnavailableError,
    ImageError,
    NetworkMode,
    SandboxInfo,
    SandboxNotFound,
    SandboxSpec,
    SandboxState,
)
from sandlot.engines.kubernetes import manifests
from sandlot.engines.kubernetes.lease import LeaseElector
from sandlot.engines.kubernetes.manifests import (
    MAIN_KEY,
    SECRET_KEY,
    SPEC_ANNOTATION,
    object_name,
)
from sandlot.engines.kubernetes.podwatch import Pod, PodWatcher
from sandlot.engines.kubernetes.rawjson import json_of
from sandlot.engines.kubernetes.settings import AGENT_PORT, KubernetesSettings
from sandlot.instance_types import get_instance_type

log = logging.getLogger("sandlot.engines.kubernetes")

#: Container states that no waiting will fix: the create fails at once with the reason.
_IMAGE_FAILURES = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName"})
_START_FAILURES = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
)


def _state_of(pod: Pod | None) -> SandboxState:
    if pod is None:
        return SandboxState.STOPPED
    phase = pod.get("status", {}).get("phase")
    if phase == "Running" and pod["status"].get("podIP"):
        return SandboxState.RUNNING
    if phase in ("Failed", "Succeeded"):
        return SandboxState.ERROR
    return SandboxState.CREATING


def _failure(pod: Pod) -> EngineError | None:
    """Why a Pod will not run (an image that cannot be pulled, a config error), or None."""
    status = pod.get("status", {})
    if status.get("phase") == "Failed":
        return EngineError(f"the sandbox's pod failed: {status.get('message') or 'no reason'}")
    for container in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in _IMAGE_FAILURES:
            which = "runtime image" if container.get("name") != "sandbox" else "image"
            return ImageError(f"the sandbox's {which} cannot be pulled: {reason}")
        if reason in _START_FAILURES:
            return EngineError(f"the sandbox's container cannot start: {reason}")
    return None


def _running(pod: Pod | None) -> Pod | EngineError | None:
    if pod is None:
        return None
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return None
    if _state_of(pod) is SandboxState.RUNNING:
        return pod
    return _failure(pod)


class KubernetesEngine:
    name = "kubernetes"
    #: No freezing of a Pod's processes: the server sleeps these sandboxes deep.
    can_freeze = False
    #: The namespace belongs to one deployment (one store, however many replicas): at start,
    #: the server removes sandboxes without a row and marks rows without a sandbox lost.
    exclusive = True

    def __init__(self, settings: KubernetesSettings | None = None) -> None:
        self.settings = settings or KubernetesSettings()
        self.namespace = self.settings.namespace
        self._client: client.ApiClient | None = None
        self._core: client.CoreV1Api | None = None
        self._net: client.NetworkingV1Api | None = None
        self._watcher: PodWatcher | None = None
        self._started = asyncio.Lock()

    # -- connection ----------------------------------------------------------------------------

    async def _connect(self) -> tuple[client.CoreV1Api, client.NetworkingV1Api, PodWatcher]:
        async with self._started:
            if self._core is None or self._net is None or self._watcher is None:
                cfg = client.Configuration()
                try:
                    if self.settings.kubeconfig is None and _in_cluster():
                        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
                    else:
                        await config.load_kube_config(
                            config_file=self.settings.kubeconfig, client_configuration=cfg
                        )
                except (config.ConfigException, OSError) as exc:
                    raise EngineUnavailableError(f"no usable Kubernetes config: {exc}") from None
                api = client.ApiClient(cfg)
                core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
                watcher = PodWatcher(core, self.namespace)
                try:
                    await watcher.start()
                except ApiException as exc:
                    await api.close()
                    raise EngineUnavailableError(
                        f"cannot list pods in namespace {self.namespace!r}: {_reason(exc)}"
                    ) from None
                except OSError as exc:
                    await api.close()
                    raise EngineUnavailableError(
                        f"the Kubernetes API is unreachable: {exc}"
                    ) from None
                self._client, self._core, self._net, self._watcher = api, core, net, watcher
            return self._core, self._net, self._watcher

    async def coordination(self) -> client.CoordinationV1Api:
        """The Leases' API on this engine's connection (for :mod:`.lease`)."""
        await self._connect()
        return client.CoordinationV1Api(self._client)

    def leadership(self, identity: str | None = None) -> LeaseElector:
        """Leader election among the server replicas that share this namespace."""
        return LeaseElector(self.coordination, self.namespace, identity=identity)

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.close()
        if self._client is not None:
            await self._client.close()
        self._client = self._core = self._net = self._watcher = None
        self._started = asyncio.Lock()  # a later use may come from another event loop

    # -- create / delete -----------------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        # The agent's own variables (its secret, pool mode, journal) come after the user's in
        # the Pod's env, and a later duplicate wins: a user's would be overridden, but refuse
        # them outright, as the local engine does, rather than rely on that order.
        bad_env = sorted(k for k in spec.env if k in HIDDEN_ENV or "=" in k or not k)
        if bad_env:
            raise EngineError(f"invalid or reserved environment variable names: {bad_env}")
        if spec.snapshot is not None:
            raise EngineError("snapshots are not available on the kubernetes engine yet")
        if spec.privileged and not self.settings.allow_privileged:
            raise EngineError(
                "privileged sandboxes are off on this cluster: a privileged Pod is root on its "
                "node (the operator may allow them: sandlot server --allow-privileged-pods)"
            )
        if spec.runtime not in self.settings.runtime_classes:
            known = ", ".join(self.settings.runtime_classes)
            raise EngineError(f"runtime {spec.runtime!r} is not offered here (one of: {known})")
        core, net, _ = await self._connect()
        ns = self.namespace
        try:
            # Raw JSON answers throughout (rawjson.py): building the client's models for
            # answers of which only a uid is read cost ~10% of the creates/s here.
            made = await _call(
                json_of(
                    core.create_namespaced_secret(
                        ns, _body(manifests.secret(spec)), _preload_content=False
                    )
                )
            )
            owner = manifests.owned_by(made["metadata"]["uid"], spec.id)
            pull = manifests.registry_secret(spec, owner)
            calls: list[Awaitable[Any]] = [
                json_of(
                    core.create_namespaced_persistent_volume_claim(
                        ns,
                        _body(manifests.volume_claim(spec, self.settings, owner)),
                        _preload_content=False,
                    )
                ),
                json_of(
                    net.create_namespaced_network_policy(
                        ns,
                        _body(
                            manifests.network_policy(
                                spec.id, spec.network, spec.outbound_allowlist, self.settings, owner
                            )
                        ),
                        _preload_content=False,
                    )
                ),
            ]
            if pull is not None:
                calls.append(
                    json_of(core.create_namespaced_secret(ns, _body(pull), _preload_content=False))
                )
            await _call(asyncio.gather(*calls))
            return await self._run_pod(spec, owner, pull is not None)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.delete(spec.id))
            raise

    async def _run_pod(self, spec: SandboxSpec, owner: list[Any], pull: bool) -> SandboxInfo:
        core, _, watcher = await self._connect()
        body = manifests.pod(
            spec, self.settings, owner, f"{object_name(spec.id)}-pull" if pull else None
        )
        try:
            await json_of(
                core.create_namespaced_pod(self.namespace, _body(body), _preload_content=False)
            )
        except ApiException as exc:
            # 409: another replica woke it first (a request to each at once): wait for that Pod.
            if exc.status != 409:
                await _call(_raise(exc))
        try:
            result = await watcher.wait(spec.id, _running, self.settings.start_timeout)
        except TimeoutError:
            raise EngineError(
                f"the sandbox's pod did not run within {self.settings.start_timeout:.0f} s"
            ) from None
        if isinstance(result, EngineError):
            raise result
        return self._info(spec.id, result)

    def _info(self, sandbox_id: str, pod: Pod | None) -> SandboxInfo:
        state = _state_of(pod)
        ip = (pod or {}).get("status", {}).get("podIP") or "0.0.0.0"
        detail = (pod or {}).get("status", {}).get("message", "") if pod else "pod deleted"
        return SandboxInfo(
            id=sandbox_id,
            state=state,
            agent_address=AgentAddress(host=ip, port=AGENT_PORT),
            detail=detail,
        )

    async def delete(self, sandbox_id: str) -> None:
        core, net, watcher = await self._connect()
        ns, name = self.namespace, object_name(sandbox_id)
        # The Pod first (its processes end at once: grace 0), then what it used.
        await _ignore_missing(core.delete_namespaced_pod(name, ns, grace_period_seconds=0))
        await asyncio.gather(
            _ignore_missing(core.delete_namespaced_secret(f"{name}-pull", ns)),
            _ignore_missing(
                core.delete_namespaced_persistent_volume_claim(manifests.claim_name(sandbox_id), ns)
            ),
            _ignore_missing(net.delete_namespaced_network_policy(name, ns)),
        )
        # The Secret last: it is the record list() and reconcile find a sandbox by.
        await _ignore_missing(core.delete_namespaced_secret(name, ns))
        with contextlib.suppress(TimeoutError):
            await watcher.wait(sandbox_id, lambda pod: True if pod is None else None, 30)

    # -- sleep ---------------------------------------------------------------------------------

    async def pause(self, sandbox_id: str) -> None:
        raise EngineError("light sleep is not available on Kubernetes (a pod cannot be frozen)")

    async def resume(self, sandbox_id: str) -> None:
        raise EngineError("light sleep is not available on Kubernetes (a pod cannot be frozen)")

    async def stop(self, sandbox_id: str) -> None:
        """Deep sleep: the Pod goes (scale to zero); its Secret, volume and policy stay."""
        core, _, watcher = await self._connect()
        await self._record(sandbox_id)  # SandboxNotFound for an unknown id
        await _ignore_missing(
            core.delete_namespaced_pod(
                object_name(sandbox_id), self.namespace, grace_period_seconds=0
            )
        )
        try:
            await watcher.wait(sandbox_id, lambda pod: True if pod is None else None, 60)
        except TimeoutError:
            raise EngineError("the sandbox's pod was not deleted within 60 s") from None

    async def start(self, sandbox_id: str) -> SandboxInfo:
        """Make the Pod again from the spec its Secret keeps (with the same secret)."""
        _, _, watcher = await self._connect()
        current = watcher.pods.get(sandbox_id)
        if current is not None and not current["metadata"].get("deletionTimestamp"):
            return await self._wait_running(sandbox_id)
        spec, owner, pull = await self._record(sandbox_id)
        return await self._run_pod(spec, owner, pull)

    async def _wait_running(self, sandbox_id: str) -> SandboxInfo:
        _, _, watcher = await self._connect()
        try:
            result = await watcher.wait(sandbox_id, _running, self.settings.start_timeout)
        except TimeoutError:
            raise EngineError("the sandbox's pod did not run in time") from None
        if isinstance(result, EngineError):
            raise result
        return self._info(sandbox_id, result)

    async def _record(self, sandbox_id: str) -> tuple[SandboxSpec, list[Any], bool]:
        """The sandbox's spec as its Secret keeps it, the ownerReferences, and whether it has
        an image pull Secret."""
        core, _, _ = await self._connect()
        try:
            made = await core.read_namespaced_secret(object_name(sandbox_id), self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise SandboxNotFound(f"sandbox {sandbox_id} not found") from None
            raise EngineError(f"reading sandbox {sandbox_id}: {_reason(exc)}") from None
        pull = False
        with contextlib.suppress(ApiException):
            await core.read_namespaced_secret(f"{object_name(sandbox_id)}-pull", self.namespace)
            pull = True
        return _spec_from(made), manifests.owned_by(made.metadata.uid, sandbox_id), pull

    # -- network -------------------------------------------------------------------------------

    async def set_network(
        self, sandbox_id: str, mode: NetworkMode, outbound_allowlist: tuple[str, ...] | None
    ) -> None:
        """Replace the sandbox's NetworkPolicy (enforced where the network plugin does)."""
        _, net, _ = await self._connect()
        _, owner, _ = await self._record(sandbox_id)
        body = manifests.network_policy(sandbox_id, mode, outbound_allowlist, self.settings, owner)
        await _call(
            net.replace_namespaced_network_policy(
                object_name(sandbox_id), self.namespace, _body(body)
            )
        )

    # -- state ---------------------------------------------------------------------------------

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        _, _, watcher = await self._connect()
        pod = watcher.pods.get(sandbox_id)
        if pod is None:
            await self._record(sandbox_id)  # SandboxNotFound unless asleep
        return self._info(sandbox_id, pod)

    async def list(self) -> builtins.list[SandboxInfo]:
        """Every sandbox with a Secret (sleeping ones included) or a Pod."""
        core, _, watcher = await self._connect()
        ids = set(watcher.pods) | set(await self._secret_ids(core))
        return [self._info(i, watcher.pods.get(i)) for i in sorted(ids)]

    async def _secret_ids(self, core: client.CoreV1Api) -> builtins.list[str]:
        listed = await json_of(
            core.list_namespaced_secret(
                self.namespace, label_selector=manifests.SELECTOR, _preload_content=False
            )
        )
        items = listed.get("items", [])
        return [
            i
            for item in items
            if (i := manifests.sandbox_id_of(item["metadata"].get("labels"))) is not None
            and not item["metadata"]["name"].endswith("-pull")
        ]

    async def recover(self) -> builtins.list[str]:
        """Pods whose Secret is gone: a create or delete that died half-way."""
        core, _, watcher = await self._connect()
        recorded = set(await self._secret_ids(core))
        orphans = [i for i in watcher.pods if i not in recorded]
        for sandbox_id in orphans:
            await self.delete(sandbox_id)
        return orphans


def _spec_from(made: Any) -> SandboxSpec:
    saved = json.loads(made.metadata.annotations[SPEC_ANNOTATION])
    import base64

    data = {k: base64.b64decode(v).decode() for k, v in (made.data or {}).items()}
    env = {name: data.get(f"env-{i}", "") for i, name in enumerate(saved["env_names"])}
    allow = saved.get("outbound_allowlist")
    return SandboxSpec(
        id=saved["id"],
        image=saved["image"],
        instance_type=get_instance_type(saved["instance_type"]),
        secret=data.get(SECRET_KEY, ""),
        env=env,
        name=saved.get("name"),
        privileged=bool(saved.get("privileged")),
        network=NetworkMode(saved.get("network", "none")),
        outbound_allowlist=tuple(allow) if allow is not None else None,
        labels=saved.get("labels") or {},
        pool=bool(saved.get("pool")),
        runtime=saved.get("runtime", "crun"),
        project=saved.get("project", ""),
        command=data.get(MAIN_KEY),
    )


def _body(manifest: manifests.Manifest) -> Any:
    """A plain manifest where the client's signatures name its model classes (it sends both
    the same way; building models first would only cost time)."""
    return manifest


def _in_cluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _reason(exc: ApiException) -> str:
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{exc.status} {message or exc.reason}"


async def _call(awaitable: Awaitable[Any]) -> Any:
    """An API call whose failure becomes an :class:`EngineError` with the server's reason."""
    try:
        return await awaitable
    except ApiException as exc:
        if exc.status == 409:
            raise EngineError(f"already exists: {_reason(exc)}") from None
        if exc.status == 403:
            raise EngineUnavailableError(f"the server may not do this: {_reason(exc)}") from None
        raise EngineError(f"Kubernetes API: {_reason(exc)}") from None
    except OSError as exc:
        raise EngineUnavailableError(f"the Kubernetes API is unreachable: {exc}") from None


async def _raise(exc: BaseException) -> None:
    raise exc


async def _ignore_missing(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except ApiException as exc:
        if exc.status != 404:
            raise EngineError(f"Kubernetes API: {_reason(exc)}") from None
