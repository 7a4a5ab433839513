"""The kubernetes engine's fixtures, for tests/engines/kubernetes (its conftest imports them)
and tests/security/test_sec_kubernetes.py: one real control plane (etcd + kube-apiserver) per
session, and per test a fresh namespace, a loopback stand-in kubelet and an engine on it.
Skipped, with the reason, where etcd or the built kube-apiserver is missing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from sandlot.engines.kubernetes.settings import KubernetesSettings
from support import kube
from support.loopkubelet import LoopKubelet


@pytest.fixture(scope="session")
def control_plane() -> Iterator[kube.ControlPlane]:
    reason = kube.missing()
    if reason is not None:
        pytest.skip(reason)
    with kube.control_plane(users=("sandlot-server",)) as cp:
        yield cp


@pytest.fixture
def namespace(control_plane: kube.ControlPlane) -> Iterator[str]:
    name = control_plane.namespace()
    yield name
    control_plane.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture
def kubelet(control_plane: kube.ControlPlane, namespace: str) -> Iterator[LoopKubelet]:
    with LoopKubelet(control_plane, namespace) as k:
        yield k


@pytest.fixture
def kube_settings(control_plane: kube.ControlPlane, namespace: str) -> KubernetesSettings:
    return KubernetesSettings(
        namespace=namespace, kubeconfig=str(control_plane.kubeconfig()), start_timeout=30
    )


@pytest.fixture
async def kube_engine(
    kube_settings: KubernetesSettings, kubelet: LoopKubelet
) -> AsyncIterator[Any]:
    from sandlot.engines.kubernetes.engine import KubernetesEngine

    engine = KubernetesEngine(kube_settings)
    yield engine
    try:
        for info in await engine.list():
            await engine.delete(info.id)
    finally:
        await engine.close()
