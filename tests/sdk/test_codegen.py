"""The sync SDK is generated from the async one; the committed copy must be current, and both
must offer the same surface."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_script() -> object:
    spec = importlib.util.spec_from_file_location("unasync_script", ROOT / "scripts/unasync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_sync_code_is_generated(tmp_path: Path) -> None:
    script = _load_script()
    problems = script.stale_files(script.SYNC_DIR)  # type: ignore[attr-defined]
    assert problems == [], "run: python scripts/unasync.py\n" + "\n".join(problems)


def test_same_surface() -> None:
    from sandlot.sdk import (
        AsyncExecStream,
        AsyncFilesystem,
        AsyncSandbox,
        ExecStream,
        Filesystem,
        Sandbox,
    )

    for a, s in (
        (AsyncSandbox, Sandbox),
        (AsyncFilesystem, Filesystem),
        (AsyncExecStream, ExecStream),
    ):
        public_a = {n for n in dir(a) if not n.startswith("_")}
        public_s = {n for n in dir(s) if not n.startswith("_")}
        assert {"close" if n == "aclose" else n for n in public_a} == public_s, (a, s)
        for name in public_a:
            fa, fs = getattr(a, name), getattr(s, "close" if name == "aclose" else name)
            if callable(fa):
                assert list(inspect.signature(fa).parameters) == list(
                    inspect.signature(fs).parameters
                ), name


def test_seed_surface_exists() -> None:
    from sandlot import AsyncSandbox, Sandbox

    for cls in (Sandbox, AsyncSandbox):
        for name in (
            "create",
            "get_from_id",
            "list",
            "wait_ready",
            "wait_tcp_proxy_ready",
            "is_healthy",
            "get_sandbox_url",
            "get_tcp_proxy_info",
            "get_domain",
            "update_lifecycle",
            "delete",
            "exec",
            "exec_stream",
            "expose_port",
            "unexpose_port",
            "launch_process",
            "kill_process",
            "list_processes",
            "kill_all_processes",
        ):
            assert callable(getattr(cls, name)), name
        params = inspect.signature(cls.create).parameters
        for option in (
            "image",
            "name",
            "wait_ready",
            "instance_type",
            "exposed_port_protocol",
            "env",
            "region",
            "api_token",
            "timeout",
            "idle_timeout",
            "enable_tcp_proxy",
            "privileged",
            "registry_secret",
            "delete_after_delay",
            "delete_after_inactivity_delay",
            "_experimental_enable_light_sleep",
            "labels",
            "api_url",
        ):
            assert option in params, option
        assert params["timeout"].default == 300 and params["idle_timeout"].default == 300
        assert params["instance_type"].default == "micro" and params["wait_ready"].default
        assert inspect.signature(cls.exec).parameters["timeout"].default == 30
        wait = inspect.signature(cls.wait_ready).parameters
        assert wait["timeout"].default == 60 and wait["poll_interval"].default == 0.5
    from sandlot.sdk import Filesystem

    for name in (
        "mkdir",
        "list_dir",
        "delete_dir",
        "write_file",
        "write_files",
        "read_file",
        "rename_file",
        "rm",
        "exists",
        "is_file",
        "is_dir",
        "upload_file",
        "download_file",
    ):
        assert callable(getattr(Filesystem, name)), name
    assert (ROOT / "src/sandlot/py.typed").exists()
