"""A private sandlot server for the benchmark: its own state directory, database and Unix socket,
the host's already-built images (``/var/lib/sandlot/images``, what ``scripts/setup.sh`` builds).

It runs as ``sandlot server --engine bench.server:engine`` in a child process -- the way users run
it -- so the client's work in this process does not share a GIL with the server's. Stopping it
also deletes whatever sandbox is left, through a fresh LocalEngine on the same state directory
(mounts, cgroups and files), even when the run failed half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import REPO, make_tmp

IMAGES_ENV = "SANDLOT_BENCH_IMAGES_DIR"
ENGINE_STATE_ENV = "SANDLOT_BENCH_ENGINE_STATE"


def images_dir() -> Path:
    from sandlot.paths import state_dir

    configured = os.environ.get(IMAGES_ENV)
    return Path(configured) if configured else state_dir() / "images"


def engine() -> Any:
    """``--engine bench.server:engine``: a LocalEngine on the bench's state, the host's images."""
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore

    return LocalEngine(Path(os.environ[ENGINE_STATE_ENV]), images=ImageStore(images_dir()))


class BenchServer:
    """``with BenchServer() as srv: Sandbox.create(api_url=srv.url)``."""

    def __init__(
        self,
        *,
        profile_to: Path | None = None,
        engine_factory: str = "bench.server:engine",
        pools: tuple[str, ...] = (),
        searchable: bool = False,
    ) -> None:
        """``profile_to``: a server that profiles itself between :meth:`profile_start` and
        :meth:`profile_stop`, which writes the cProfile stats there. ``searchable``: its
        directory 0711, as gVisor sandboxes need (runsc's gofer reaches their files as their
        own uid)."""
        self.profile_to = profile_to
        self.searchable = searchable
        self.pools = pools
        self.engine_factory = "bench.server:engine_profiled" if profile_to else engine_factory
        self.tmp: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def state(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "state"

    @property
    def socket_path(self) -> str:
        assert self.tmp is not None
        return str(self.tmp / "run" / "s.sock")

    @property
    def url(self) -> str:
        return f"unix:{self.socket_path}"

    def agent_socket(self, sandbox_id: str) -> str:
        return str(self.state / "sandboxes" / sandbox_id / "agent.sock")

    def __enter__(self) -> BenchServer:
        # Short path: agent sockets live below it and Unix socket paths are limited to 107 bytes.
        self.tmp = make_tmp("slb-")
        if self.searchable:
            self.tmp.chmod(0o711)
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        assert self.tmp is not None
        # The host's images: expose the state dir's default store location to the engine.
        images = images_dir()
        env = dict(os.environ)
        env.update(
            {
                ENGINE_STATE_ENV: str(self.state),
                IMAGES_ENV: str(images),
                "SANDLOT_STATE_DIR": str(self.tmp / "server-state"),
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
            }
        )
        env.pop("SANDLOT_URL", None)
        if self.profile_to is not None:
            env["SANDLOT_BENCH_PROFILE"] = str(self.profile_to)
        argv = [
            sys.executable,
            "-m",
            "sandlot.cli",
            "server",
            "--listen",
            self.url,
            "--engine",
            self.engine_factory,
            "--database",
            f"sqlite:///{self.tmp / 'db.sqlite'}",
            "--log-level",
            "warning",
        ]
        for pool in self.pools:
            argv += ["--pool", pool]
        self.log = open(self.tmp / "server.log", "wb")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(self.tmp),
        )
        deadline = time.monotonic() + 120  # the first start may build the agent runtime
        import httpx

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("bench server exited at start: " + self.log_tail())
            if os.path.exists(self.socket_path):
                try:
                    with httpx.Client(
                        transport=httpx.HTTPTransport(uds=self.socket_path),
                        base_url="http://s",
                        timeout=5,
                    ) as c:
                        if c.get("/v1/sandboxes").status_code < 500:
                            return
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError("bench server did not start in 120 s: " + self.log_tail())
            time.sleep(0.05)

    def profile_start(self) -> None:
        assert self.proc is not None and self.profile_to is not None
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)

    def profile_stop(self) -> Path:
        assert self.proc is not None and self.profile_to is not None
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not self.profile_to.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the server wrote no profile")
            time.sleep(0.05)
        return self.profile_to

    def log_tail(self, lines: int = 15) -> str:
        assert self.tmp is not None
        try:
            text = (self.tmp / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def died(self) -> str | None:
        """Why the server is gone, if it exited on its own: its exit status and log tail."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"the server exited with status {self.proc.returncode}: {self.log_tail(25)}"

    def stop_server(self) -> None:
        death = self.died()
        if death:
            print(f"[bench] {death}", file=sys.stderr, flush=True)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_server()
        finally:
            if self.tmp is not None:
                try:
                    cleanup_state(self.state)
                finally:
                    with contextlib.suppress(Exception):
                        self.log.close()
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    self.tmp = None


def cleanup_state(state: Path) -> list[str]:
    """Delete every sandbox left under a bench engine state dir (mounts, cgroups, files)."""
    sandboxes = state / "sandboxes"
    if not sandboxes.is_dir() or not any(sandboxes.iterdir()):
        return []
    from sandlot.engines.local import LocalEngine
    from sandlot.images.store import ImageStore

    async def run() -> list[str]:
        eng = LocalEngine(state, images=ImageStore(images_dir()))
        ids = [d.name for d in sandboxes.iterdir() if d.is_dir()]
        for sandbox_id in ids:
            with contextlib.suppress(Exception):
                await eng.delete(sandbox_id)
        return ids

    return asyncio.run(run())


def engine_profiled() -> Any:
    """The same engine, in a server that profiles itself between SIGUSR1 (start) and SIGUSR2
    (stop and write ``$SANDLOT_BENCH_PROFILE``): a profile of the requests only, not of start-up.
    """
    import cProfile

    prof = cProfile.Profile()

    def start(_sig: int, _frame: Any) -> None:
        prof.enable()

    def stop(_sig: int, _frame: Any) -> None:
        prof.disable()
        prof.dump_stats(os.environ["SANDLOT_BENCH_PROFILE"] + ".tmp")
        os.rename(os.environ["SANDLOT_BENCH_PROFILE"] + ".tmp", os.environ["SANDLOT_BENCH_PROFILE"])

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return engine()


def engine_fast_ready_poll() -> Any:
    """An experiment, not a figure: the same engine, with the server's readiness poll capped at
    1 ms between probes (instead of a backoff 5, 10, 20, 40, 80, 100 ms). Patches the server's
    module in the server process only; used by :func:`bench.stages.ready_poll_experiment`."""
    import types

    import anyio

    from sandlot.server.control import agents

    real_sleep = anyio.sleep

    async def capped_sleep(delay: float) -> None:
        await real_sleep(min(delay, 0.001))

    class Shim(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(anyio, name)

    shim = Shim("anyio")
    shim.sleep = capped_sleep  # type: ignore[attr-defined]
    setattr(agents, "anyio", shim)  # noqa: B010 (mypy: a module attribute)
    return engine()
