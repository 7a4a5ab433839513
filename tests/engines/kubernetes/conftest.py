"""The kubernetes engine's tests: a real control plane, a stand-in kubelet, an engine (the
fixtures live in support/kube_fixtures.py, shared with tests/security)."""

from support.kube_fixtures import (  # noqa: F401 - fixtures
    control_plane,
    kube_engine,
    kube_settings,
    kubelet,
    namespace,
)
