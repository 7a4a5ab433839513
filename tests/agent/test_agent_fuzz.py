"""Fuzz the agent from its own OpenAPI description with schemathesis (quick, bounded).

Checks: no 5xx, no crash, responses match the described schemas, statuses and content types.

The fuzzed agent must not be able to hurt the machine running the tests, since schemathesis
sends arbitrary paths to ``/delete_dir`` and arbitrary commands to ``/run``. So it runs as
``nobody`` from the system's bare Python, in a scratch directory it owns, and finds a fake
``sh`` first on its PATH that ignores the command. That needs root; elsewhere it is skipped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlib import SRC

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from schemathesis import checks as st_checks  # noqa: E402

SPEC = Path(SRC) / "sandlot" / "agent" / "openapi.json"
FUZZ_SECRET = "fuzz-secret"
SYSTEM_PYTHON = "/usr/bin/python3.11"

schema = schemathesis.openapi.from_path(str(SPEC))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fuzz_agent() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("fuzzing runs the agent as 'nobody', which needs root")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} not found")
    nobody = pwd.getpwnam("nobody")
    scratch = Path(tempfile.mkdtemp(prefix="sandlot-agent-fuzz-"))
    os.chmod(scratch, 0o755)
    fakebin = scratch / "bin"
    fakebin.mkdir()
    (fakebin / "sh").write_text("#!/bin/sh\nexit 0\n")  # ignores -c <fuzzed command>
    os.chmod(fakebin / "sh", 0o755)
    work = scratch / "work"
    work.mkdir()
    os.chown(work, nobody.pw_uid, nobody.pw_gid)
    port = _free_port()
    env = {
        "PATH": str(fakebin),
        "PYTHONPATH": SRC,
        "SANDBOX_SECRET": FUZZ_SECRET,
        "SANDLOT_AGENT_MAX_BODY": str(1 << 20),
    }
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-m", "sandlot.agent", "--listen", f"tcp:127.0.0.1:{port}"],
        cwd=work,
        env=env,
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "agent did not start"
                time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
        assert proc.poll() is None, "the agent died while being fuzzed"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)


CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
]


@schema.parametrize()
@hypothesis.settings(
    max_examples=int(os.environ.get("SANDLOT_FUZZ_EXAMPLES", "10")),
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
    database=None,
)
def test_fuzz(case: schemathesis.Case, fuzz_agent: str) -> None:
    case.call_and_validate(
        base_url=fuzz_agent,
        headers={"Authorization": f"Bearer {FUZZ_SECRET}"},
        checks=CHECKS,
        timeout=30,
    )


def test_fuzz_agent_survived(fuzz_agent: str) -> None:
    import httpx

    assert httpx.get(f"{fuzz_agent}/health").json() == {"status": "ok"}
    assert sys.version_info >= (3, 11)
