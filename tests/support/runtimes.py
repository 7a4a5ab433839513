"""Which sandbox runtimes a test runs on, in one place.

``SANDLOT_TEST_RUNTIMES`` (comma-separated, e.g. ``crun,gvisor``) runs every runtime-
parametrized test on each runtime it names: the full form. Unset, each test runs on crun, and
on gVisor too where it is marked as part of the representative gVisor subset
(``gvisor_by_default=True``) that fits the default run's time budget. gVisor cases skip with a
reason where runsc is not built.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

RUNSC_MISSING = "runsc is not installed (scripts/setup.sh builds it; SANDLOT_SKIP_RUNSC skips it)"


def selected_runtimes() -> list[str] | None:
    """The runtimes ``SANDLOT_TEST_RUNTIMES`` names, or None when it is unset."""
    raw = os.environ.get("SANDLOT_TEST_RUNTIMES", "").strip()
    if not raw:
        return None
    return [name.strip() for name in raw.split(",") if name.strip()]


def runtime_params(*, gvisor_by_default: bool = False) -> list[Any]:
    """``pytest.mark.parametrize("runtime", runtime_params(...))`` values."""
    chosen = selected_runtimes() or (["crun", "gvisor"] if gvisor_by_default else ["crun"])
    skip_gvisor = pytest.mark.skipif(shutil.which("runsc") is None, reason=RUNSC_MISSING)
    return [
        pytest.param(name, id=name, marks=[skip_gvisor] if name == "gvisor" else [])
        for name in chosen
    ]


@contextlib.contextmanager
def searchable_state_dir(prefix: str) -> Iterator[Path]:
    """A state directory for an engine that may run gVisor sandboxes: runsc's gofer reaches
    the sandbox's files as the sandbox's uid, so every parent must be searchable by all
    (pytest's own temporary directories are not). Whatever is left mounted under it, and
    the directory itself, go afterwards."""
    from sandlot.engines.local.mounts import mounts_under, unmount

    state = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    state.chmod(0o711)
    try:
        yield state
    finally:
        for point in mounts_under(state):
            unmount(point)
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def engine_state_for_runtimes(prefix: str) -> Iterator[Path]:
    """A test module's engine state directory where both runtimes work: skips without root
    and crun (as the suites' own ``state`` fixtures do), else :func:`searchable_state_dir`."""
    from support.local import local_engine_unavailable

    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    with searchable_state_dir(prefix) as state:
        yield state


# -- runtime as a fixture parameter (tests/sdk, the agent's survival tests) -------------------

FULL_FORM = "gVisor's full form only: SANDLOT_TEST_RUNTIMES=crun,gvisor runs it"

#: The parameters of a runtime fixture; :func:`skip_unless_selected` then picks, per case.
RUNTIME_PARAMS = [
    "crun",
    pytest.param(
        "gvisor", marks=pytest.mark.skipif(shutil.which("runsc") is None, reason=RUNSC_MISSING)
    ),
]


def skip_unless_selected(request: pytest.FixtureRequest, runtime: str) -> None:
    """Skip the case of ``runtime`` that this run leaves out (call it from the fixture): with
    ``SANDLOT_TEST_RUNTIMES`` set, the runtimes it names; unset, crun, and gVisor for the
    cases marked ``gvisor_default``."""
    chosen = selected_runtimes()
    if chosen is not None:
        if runtime not in chosen:
            pytest.skip(f"{runtime} is not in SANDLOT_TEST_RUNTIMES")
        return
    if runtime == "gvisor" and request.node.get_closest_marker("gvisor_default") is None:
        pytest.skip(FULL_FORM)


@pytest.fixture(params=RUNTIME_PARAMS, name="runtime")
def runtime_fixture(request: pytest.FixtureRequest) -> str:
    """``runtime``: the runtime of this case's sandboxes (import ``runtime_fixture`` into a
    test module to parametrize its cases by runtime)."""
    skip_unless_selected(request, request.param)
    return str(request.param)


def xfail_on_gvisor(
    request: pytest.FixtureRequest, runtime: str, reason: str, *, run: bool = True
) -> None:
    """Expect this case to fail on gVisor for ``reason`` (a known gap): strict, so it fails
    loudly once that gap is closed. ``run=False``: not even tried (its failure would spoil
    what later cases share with it)."""
    if runtime == "gvisor":
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason, run=run))
