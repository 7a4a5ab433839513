"""``python -m bench``: run every workload for sandlot and the alternatives, write the JSON,
render the docs. Sizes per mode are in :data:`MODES`; everything started is stopped and removed
in ``finally`` blocks (sandboxes, containers, daemons, mounts, temporary directories)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import machine
from bench.stats import Result, ratio, skipped

REPO = machine.REPO
DEFAULT_JSON = REPO / "bench" / "results" / "latest.json"
DEFAULT_DOCS = REPO / "docs"
#: Where a quick (or tiny) run writes unless told otherwise: its small samples are not the
#: published figures, so it must not overwrite the committed ``latest.json`` and
#: ``docs/benchmarks.md`` (git-ignored).
QUICK_DIR = REPO / "bench" / "results" / "quick"


@dataclass(frozen=True)
class Sizes:
    tti_n: int
    tti_n_alt: int
    exec_n: int
    exec_n_alt: int
    concurrency: tuple[int, ...]
    throughput_sandboxes: int
    throughput_ops: int
    throughput_ops_alt: int
    throughput_rounds: int
    stream_lines: int
    file_sizes: dict[str, int]
    file_rounds: int
    idle_count: int
    idle_count_alt: int
    idle_settle_s: float
    max_idle: int  # 0: skipped
    create_delete_concurrency: int
    create_delete_cycles: int
    create_delete_rounds: int
    stage_n: int
    wake_n: int
    profile_creates: int  # 0: no profile
    profile_execs: int
    memory_move: int  # bytes moved through each case of the peak-RSS figures
    #: gVisor's checkpoint/restore: memory written by a process, and rounds per size.
    checkpoint_sizes: dict[str, int] = field(default_factory=dict)
    checkpoint_rounds: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


MiB = 2**20
MODES: dict[str, Sizes] = {
    "full": Sizes(
        tti_n=30,
        tti_n_alt=15,
        exec_n=300,
        exec_n_alt=50,
        concurrency=(1, 4, 16),
        throughput_sandboxes=10,
        throughput_ops=96,
        throughput_ops_alt=48,
        throughput_rounds=5,
        stream_lines=100,
        file_sizes={"1KB": 1024, "1MB": MiB, "100MB": 100 * MiB},
        file_rounds=5,
        idle_count=100,
        idle_count_alt=20,
        idle_settle_s=3.0,
        max_idle=500,
        create_delete_concurrency=4,
        create_delete_cycles=12,
        create_delete_rounds=5,
        stage_n=10,
        wake_n=10,
        profile_creates=10,
        profile_execs=300,
        memory_move=1024 * MiB,
        checkpoint_sizes={"10MB": 10 * MiB, "100MB": 100 * MiB, "1GB": 1024 * MiB},
        checkpoint_rounds=5,
    ),
    "quick": Sizes(
        tti_n=5,
        tti_n_alt=3,
        exec_n=50,
        exec_n_alt=10,
        concurrency=(1, 4, 16),
        throughput_sandboxes=4,
        throughput_ops=32,
        throughput_ops_alt=16,
        throughput_rounds=2,
        stream_lines=20,
        file_sizes={"1KB": 1024, "1MB": MiB, "10MB": 10 * MiB},
        file_rounds=2,
        idle_count=5,
        idle_count_alt=3,
        idle_settle_s=1.0,
        max_idle=0,
        create_delete_concurrency=4,
        create_delete_cycles=4,
        create_delete_rounds=2,
        stage_n=3,
        wake_n=3,
        profile_creates=0,
        profile_execs=0,
        memory_move=256 * MiB,
        checkpoint_sizes={"10MB": 10 * MiB, "100MB": 100 * MiB},
        checkpoint_rounds=3,
    ),
    # For the CI test: every code path, the smallest samples.
    "tiny": Sizes(
        tti_n=2,
        tti_n_alt=2,
        exec_n=10,
        exec_n_alt=5,
        concurrency=(1, 4, 16),
        throughput_sandboxes=2,
        throughput_ops=16,
        throughput_ops_alt=16,
        throughput_rounds=1,
        stream_lines=5,
        file_sizes={"1KB": 1024, "64KB": 64 * 1024, "1MB": MiB},
        file_rounds=1,
        idle_count=2,
        idle_count_alt=2,
        idle_settle_s=0.5,
        max_idle=0,
        create_delete_concurrency=2,
        create_delete_cycles=2,
        create_delete_rounds=1,
        stage_n=1,
        wake_n=1,
        profile_creates=0,
        profile_execs=0,
        memory_move=16 * MiB,
        checkpoint_sizes={"10MB": 10 * MiB},
        checkpoint_rounds=1,
    ),
}

#: Every figure the JSON carries, with its unit and direction.
FIGURES: dict[str, dict[str, str]] = {
    "tti_cold_ms": {
        "unit": "ms",
        "better": "lower",
        "what": "create -> first `echo hi` returns (no pool)",
    },
    "tti_warm_ms": {"unit": "ms", "better": "lower", "what": "the same from a warm pool"},
    "exec_rtt_ms": {
        "unit": "ms",
        "better": "lower",
        "what": "`true` on a live sandbox: SDK -> server -> agent",
    },
    "exec_rtt_agent_ms": {
        "unit": "ms",
        "better": "lower",
        "what": "`true` straight to the agent's Unix socket (POST /run)",
    },
    "exec_throughput_per_s": {
        "unit": "execs/s",
        "better": "higher",
        "what": "execs of `true` per second at concurrency c",
    },
    "stream_latency_ms": {
        "unit": "ms",
        "better": "lower",
        "what": "a line printed in the sandbox -> received by the client",
    },
    "file_write_mb_s": {
        "unit": "MiB/s",
        "better": "higher",
        "what": "write a random binary file into the sandbox",
    },
    "file_read_mb_s": {
        "unit": "MiB/s",
        "better": "higher",
        "what": "read it back (checked byte for byte)",
    },
    "idle_sandbox_mib": {
        "unit": "MiB",
        "better": "lower",
        "what": "memory per idle sandbox, cgroup accounting",
    },
    "max_idle_sandboxes": {
        "unit": "sandboxes",
        "better": "higher",
        "what": "idle busybox sandboxes held at once",
    },
    "light_wake_ms": {
        "unit": "ms",
        "better": "lower",
        "what": "light sleep -> answering the next request",
    },
    "deep_wake_ms": {
        "unit": "ms",
        "better": "lower",
        "what": "deep sleep -> answering the next request",
    },
    "checkpoint_ms": {
        "unit": "ms",
        "better": "lower",
        "what": "gVisor sandbox: runsc checkpoint to disk, by the memory its process wrote",
    },
    "restore_ms": {
        "unit": "ms",
        "better": "lower",
        "what": "gVisor sandbox: restore from that checkpoint -> its agent answers",
    },
    "create_delete_per_s": {
        "unit": "cycles/s",
        "better": "higher",
        "what": "create + delete cycles per second, sustained",
    },
    "sdk_peak_rss_mib": {
        "unit": "MiB",
        "better": "lower",
        "what": "the SDK client's peak RSS above idle while moving the bytes through each "
        "(exec keeps its default 64 MiB of output)",
    },
    "server_peak_rss_mib": {
        "unit": "MiB",
        "better": "lower",
        "what": "the server's peak RSS above idle meanwhile",
    },
}
#: Figures measured by a part of their own (``--parts``), not by the backend they are filed under.
FIGURE_PARTS = {
    "sdk_peak_rss_mib": "memory",
    "server_peak_rss_mib": "memory",
    "checkpoint_ms": "gvisor",
    "restore_ms": "gvisor",
}
ALTERNATIVES = ("crun", "podman", "docker")


class Run:
    def __init__(self, mode: str, sizes: Sizes, verbose: bool = True) -> None:
        self.mode = mode
        self.sizes = sizes
        self.verbose = verbose
        self.t0 = time.perf_counter()
        self.figures: dict[str, dict[str, Any]] = {
            name: {**meta, "cases": {}} for name, meta in FIGURES.items()
        }
        self.errors: list[str] = []
        self.extra: dict[str, Any] = {}

    def log(self, msg: str) -> None:
        if self.verbose:
            print(
                f"[bench {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True
            )

    def put(self, figure: str, backend: str, result: Result, case: str = "-") -> None:
        self.figures[figure]["cases"].setdefault(case, {})[backend] = result

    def put_cases(self, figure: str, backend: str, results: dict[str, Result]) -> None:
        for case, result in results.items():
            self.put(figure, backend, result, case)

    def skip_figure(
        self,
        figure: str,
        reason: str,
        backends: tuple[str, ...] = ("sandlot",),
        cases: tuple[str, ...] = ("-",),
    ) -> None:
        for case in cases:
            for b in backends:
                self.put(figure, b, skipped(reason), case)

    def attempt(
        self,
        what: str,
        backend: str,
        figures: list[tuple[str, tuple[str, ...]]],
        fn: Callable[[], None],
    ) -> None:
        """Run one workload; on failure, record the figures as failed (a skip with the error)."""
        self.log(f"{backend}: {what}")
        try:
            fn()
        except Exception as exc:
            msg = f"failed: {type(exc).__name__}: {exc}"[:400]
            self.errors.append(f"{backend} {what}: {msg}")
            traceback.print_exc()
            for figure, cases in figures:
                for case in cases:
                    self.put(figure, backend, skipped(msg), case)

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        compute_ratios(self.figures)
        return {
            "meta": {
                **meta,
                "mode": self.mode,
                "duration_s": round(time.perf_counter() - self.t0, 1),
            },
            "sizes": asdict(self.sizes),
            "figures": self.figures,
            **self.extra,
            "errors": self.errors,
        }


def compute_ratios(figures: dict[str, dict[str, Any]]) -> None:
    """Each figure's ``ratios[case][alternative]``: sandlot's median / the alternative's."""
    for fig in figures.values():
        fig["ratios"] = {}
        for case, backends in fig["cases"].items():
            ours = backends.get("sandlot")
            r = {b: ratio(ours, res) for b, res in backends.items() if b != "sandlot"}
            fig["ratios"][case] = {b: v for b, v in r.items() if v is not None}


def _cases(sizes: Sizes) -> dict[str, tuple[str, ...]]:
    return {
        "throughput": tuple(f"c={c}" for c in sizes.concurrency),
        "files": tuple(sizes.file_sizes),
    }


def run_sandlot(run: Run) -> None:
    from bench.sandlot_workloads import SandlotBench
    from bench.server import BenchServer

    s = run.sizes
    cases = _cases(s)
    with BenchServer() as srv:
        sb = SandlotBench(srv, run.log)
        run.attempt("warm-up", "sandlot", [], sb.warm_up)

        def tti() -> None:
            run.put("tti_cold_ms", "sandlot", sb.tti_cold(s.tti_n))

        run.attempt("tti_cold_ms", "sandlot", [("tti_cold_ms", ("-",))], tti)

        def rtt() -> None:
            via_server, agent = sb.exec_rtt(s.exec_n)
            run.put("exec_rtt_ms", "sandlot", via_server)
            run.put("exec_rtt_agent_ms", "sandlot", agent)

        run.attempt(
            "exec_rtt_ms", "sandlot", [("exec_rtt_ms", ("-",)), ("exec_rtt_agent_ms", ("-",))], rtt
        )
        run.attempt(
            "exec_throughput_per_s",
            "sandlot",
            [("exec_throughput_per_s", cases["throughput"])],
            lambda: run.put_cases(
                "exec_throughput_per_s",
                "sandlot",
                sb.exec_throughput(
                    list(s.concurrency),
                    s.throughput_sandboxes,
                    s.throughput_ops,
                    s.throughput_rounds,
                ),
            ),
        )
        run.attempt(
            "stream_latency_ms",
            "sandlot",
            [("stream_latency_ms", ("-",))],
            lambda: run.put("stream_latency_ms", "sandlot", sb.stream_latency(s.stream_lines)),
        )

        def files() -> None:
            w, r = sb.files(s.file_sizes, s.file_rounds)
            run.put_cases("file_write_mb_s", "sandlot", w)
            run.put_cases("file_read_mb_s", "sandlot", r)

        run.attempt(
            "files",
            "sandlot",
            [("file_write_mb_s", cases["files"]), ("file_read_mb_s", cases["files"])],
            files,
        )
        run.attempt(
            "idle_sandbox_mib",
            "sandlot",
            [("idle_sandbox_mib", ("-",))],
            lambda: run.put(
                "idle_sandbox_mib", "sandlot", sb.idle_memory(s.idle_count, s.idle_settle_s)
            ),
        )
        run.attempt(
            "create_delete_per_s",
            "sandlot",
            [("create_delete_per_s", ("-",))],
            lambda: run.put(
                "create_delete_per_s",
                "sandlot",
                sb.create_delete(
                    s.create_delete_concurrency, s.create_delete_cycles, s.create_delete_rounds
                ),
            ),
        )
        for figure, light in (("light_wake_ms", True), ("deep_wake_ms", False)):
            run.attempt(
                figure,
                "sandlot",
                [(figure, ("-",))],
                lambda figure=figure, light=light: run.put(  # type: ignore[misc]
                    figure, "sandlot", sb.wake(s.wake_n, light)
                ),
            )
        if s.max_idle:

            def max_idle() -> None:
                res = sb.max_idle(s.max_idle, min_available_mib=3072, budget_s=900)
                run.put("max_idle_sandboxes", "sandlot", res)

            run.attempt("max_idle_sandboxes", "sandlot", [("max_idle_sandboxes", ("-",))], max_idle)
        else:
            run.skip_figure("max_idle_sandboxes", "full run only (python -m bench)")
    run_warm_pool(run)


def run_warm_pool(run: Run) -> None:
    """tti_warm_ms needs a server with a warm pool; a server without ``--pool`` is a skip."""
    from bench.sandlot_workloads import SandlotBench
    from bench.server import BenchServer

    run.log("sandlot: tti_warm_ms")
    try:
        srv = BenchServer(pools=("default:micro=2",)).__enter__()
    except RuntimeError as exc:
        if "no such option" in str(exc).lower():
            run.skip_figure("tti_warm_ms", "this server has no warm pools yet (issue 5)")
        else:
            run.errors.append(f"sandlot tti_warm_ms: {exc}"[:400])
            run.skip_figure("tti_warm_ms", f"failed: server with a pool did not start: {exc}"[:400])
        return
    try:
        bench = SandlotBench(srv, run.log)
        run.attempt(
            "tti_warm_ms",
            "sandlot",
            [("tti_warm_ms", ("-",))],
            lambda: run.put("tti_warm_ms", "sandlot", bench.tti_warm(max(2, run.sizes.tti_n // 3))),
        )
    finally:
        srv.__exit__(None, None, None)


def run_alternative(run: Run, name: str, enabled: bool, why_off: str) -> None:
    from bench.alternatives import AltBench, Crun, Docker, Podman, Unavailable

    s = run.sizes
    cases = _cases(s)
    applicable = [
        ("tti_cold_ms", ("-",)),
        ("exec_rtt_ms", ("-",)),
        ("exec_throughput_per_s", cases["throughput"]),
        ("stream_latency_ms", ("-",)),
        ("file_write_mb_s", cases["files"]),
        ("file_read_mb_s", cases["files"]),
        ("idle_sandbox_mib", ("-",)),
        ("create_delete_per_s", ("-",)),
    ]

    def skip_all(reason: str) -> None:
        for figure, fig_cases in applicable:
            for case in fig_cases:
                run.put(figure, name, skipped(reason), case)

    if not enabled:
        skip_all(why_off)
        return
    rootfs = _default_rootfs()
    if rootfs is None:
        skip_all("the default image is not built (scripts/setup.sh)")
        return
    cls = {"crun": Crun, "docker": Docker, "podman": Podman}[name]
    run.log(f"{name}: starting")
    try:
        backend = cls(rootfs).__enter__()
    except Unavailable as exc:
        skip_all(f"cannot run here: {exc}")
        return
    except Exception as exc:
        run.errors.append(f"{name} start: {exc}")
        skip_all(f"failed to start: {type(exc).__name__}: {exc}"[:400])
        return
    try:
        alt = AltBench(backend, run.log)
        run.attempt(
            "tti_cold_ms",
            name,
            applicable[:1],
            lambda: run.put("tti_cold_ms", name, alt.tti_cold(s.tti_n_alt)),
        )
        run.attempt(
            "exec_rtt_ms",
            name,
            [("exec_rtt_ms", ("-",))],
            lambda: run.put("exec_rtt_ms", name, alt.exec_rtt(s.exec_n_alt)),
        )
        ops = s.throughput_ops if name == "crun" else s.throughput_ops_alt
        run.attempt(
            "exec_throughput_per_s",
            name,
            [applicable[2]],
            lambda: run.put_cases(
                "exec_throughput_per_s",
                name,
                alt.exec_throughput(
                    list(s.concurrency),
                    s.throughput_sandboxes,
                    ops,
                    max(1, s.throughput_rounds - 2) if name != "crun" else s.throughput_rounds,
                ),
            ),
        )
        run.attempt(
            "stream_latency_ms",
            name,
            [applicable[3]],
            lambda: run.put("stream_latency_ms", name, alt.stream_latency(s.stream_lines)),
        )

        def files() -> None:
            w, r = alt.files(s.file_sizes, max(1, min(s.file_rounds, 3)))
            run.put_cases("file_write_mb_s", name, w)
            run.put_cases("file_read_mb_s", name, r)

        run.attempt("files", name, applicable[4:6], files)
        run.attempt(
            "idle_sandbox_mib",
            name,
            [applicable[6]],
            lambda: run.put(
                "idle_sandbox_mib", name, alt.idle_memory(s.idle_count_alt, s.idle_settle_s)
            ),
        )
        run.attempt(
            "create_delete_per_s",
            name,
            [applicable[7]],
            lambda: run.put(
                "create_delete_per_s",
                name,
                alt.create_delete(
                    s.create_delete_concurrency,
                    s.create_delete_cycles,
                    max(1, s.create_delete_rounds - 2),
                ),
            ),
        )
    finally:
        run.log(f"{name}: stopping")
        backend.__exit__(None, None, None)


def run_gvisor(run: Run) -> None:
    """The gVisor column (sandlot's sandboxes with ``runtime="gvisor"``, through the same
    server and SDK as the sandlot column) and gVisor's own figures: checkpoint and restore by
    memory written (engine level, bench/gvisor_checkpoint.py), deep wake with memory kept."""
    import shutil

    s = run.sizes
    ours = [
        ("tti_cold_ms", ("-",)),
        ("exec_rtt_ms", ("-",)),
        ("exec_rtt_agent_ms", ("-",)),
        ("stream_latency_ms", ("-",)),
        ("idle_sandbox_mib", ("-",)),
        ("deep_wake_ms", ("-",)),
    ]
    sized = tuple(s.checkpoint_sizes)
    why = None
    if shutil.which("runsc") is None:
        why = "runsc is not installed (scripts/setup.sh builds it)"
    if why is not None:
        for figure, cases in ours:
            run.skip_figure(figure, why, ("gvisor",), cases)
        for figure in ("checkpoint_ms", "restore_ms"):
            run.skip_figure(figure, why, ("sandlot",), sized)
        return
    if run.mode == "tiny":  # the bench's own test: the engine-level figures only (~70 s less)
        for figure, cases in ours:
            run.skip_figure(figure, "tiny run: python -m bench --parts gvisor", ("gvisor",), cases)
    else:
        _gvisor_column(run, ours)

    def checkpoints() -> None:
        from bench import gvisor_checkpoint

        saves, restores = gvisor_checkpoint.measure(
            s.checkpoint_sizes, s.checkpoint_rounds, run.log
        )
        run.put_cases("checkpoint_ms", "sandlot", saves)
        run.put_cases("restore_ms", "sandlot", restores)

    run.attempt(
        "checkpoint/restore by memory",
        "sandlot",
        [("checkpoint_ms", sized), ("restore_ms", sized)],
        checkpoints,
    )


def _gvisor_column(run: Run, ours: list[tuple[str, tuple[str, ...]]]) -> None:
    """The gVisor column: the sandlot column's workloads with ``runtime="gvisor"``."""
    from bench.sandlot_workloads import SandlotBench
    from bench.server import BenchServer

    s = run.sizes
    with BenchServer(searchable=True) as srv:
        sb = SandlotBench(srv, run.log, runtime="gvisor")
        run.attempt("warm-up", "gvisor", [], lambda: sb.create().delete())
        run.attempt(
            "tti_cold_ms",
            "gvisor",
            ours[:1],
            lambda: run.put("tti_cold_ms", "gvisor", sb.tti_cold(s.tti_n_alt)),
        )

        def rtt() -> None:
            via_server, agent = sb.exec_rtt(s.exec_n_alt)
            run.put("exec_rtt_ms", "gvisor", via_server)
            run.put("exec_rtt_agent_ms", "gvisor", agent)

        run.attempt("exec_rtt_ms", "gvisor", ours[1:3], rtt)
        run.attempt(
            "stream_latency_ms",
            "gvisor",
            ours[3:4],
            lambda: run.put("stream_latency_ms", "gvisor", sb.stream_latency(s.stream_lines)),
        )
        run.attempt(
            "idle_sandbox_mib",
            "gvisor",
            ours[4:5],
            lambda: run.put(
                "idle_sandbox_mib", "gvisor", sb.idle_memory(s.idle_count_alt, s.idle_settle_s)
            ),
        )
        run.attempt(
            "deep_wake_ms",
            "gvisor",
            ours[5:6],
            lambda: run.put("deep_wake_ms", "gvisor", sb.wake(s.wake_n, light=False)),
        )


def run_memory(run: Run) -> None:
    from bench import memory

    figures = [(f, memory.CASES) for f in ("sdk_peak_rss_mib", "server_peak_rss_mib")]

    def measure() -> None:
        sdk, server = memory.peak_rss(run.sizes.memory_move, run.log)
        run.put_cases("sdk_peak_rss_mib", "sandlot", sdk)
        run.put_cases("server_peak_rss_mib", "sandlot", server)

    run.attempt("peak RSS while moving bytes", "sandlot", figures, measure)


def run_stages(run: Run) -> None:
    from bench import stages

    s = run.sizes

    def engine() -> None:
        run.extra["stages"] = {
            "engine_default": stages.engine_stages(s.stage_n, "default"),
            "engine_busybox": stages.engine_stages(s.stage_n, "busybox"),
        }

    run.attempt("engine stage timers", "sandlot", [], engine)
    if s.profile_creates:

        def profile() -> None:
            run.extra["profile"] = stages.profile_server(s.profile_creates, s.profile_execs)
            run.extra["profile"]["ready_poll_experiment"] = stages.ready_poll_experiment(
                s.profile_creates
            )

        run.attempt("cProfile of the server", "sandlot", [], profile)
    if s.profile_creates:
        big = max(s.file_sizes.values())
        run.attempt(
            "file write decomposition",
            "sandlot",
            [],
            lambda: run.extra.__setitem__(
                "file_write_decomposition", stages.file_write_decomposition(big, 1)
            ),
        )
    run.attempt(
        "exec decomposition",
        "sandlot",
        [],
        lambda: run.extra.__setitem__(
            "exec_decomposition", stages.exec_decomposition(max(20, s.exec_n))
        ),
    )


def _default_rootfs() -> Path | None:
    from bench.server import images_dir

    found = sorted(glob.glob(str(images_dir() / "default-*" / "rootfs")))
    return Path(found[-1]) if found else None


def _install_signal_handlers() -> None:
    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="small samples, smaller files, fewer sandboxes, no max_idle; "
        "docker/podman off unless asked",
    )
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    for alt in ALTERNATIVES:
        p.add_argument(
            f"--{alt}",
            dest=alt,
            action="store_true",
            default=None,
            help=f"include {alt} (default: on in a full run"
            f"{'' if alt != 'crun' else ' and in --quick'})",
        )
        p.add_argument(f"--no-{alt}", dest=alt, action="store_false", help=f"leave {alt} out")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile runs")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (default: bench/results/latest.json for a full run "
        "or --render-only, bench/results/quick/latest.json for --quick)",
    )
    p.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="where benchmarks.md and img/ go (default: docs/ for a full run or --render-only, "
        "bench/results/quick/ for --quick)",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="re-render the docs from --json without measuring",
    )
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"what to measure, comma-separated (default: all of {','.join(PARTS)})",
    )
    p.add_argument(
        "--merge-into",
        type=Path,
        default=None,
        help="finish an interrupted run: keep this JSON's results and add the parts "
        "measured now (recorded in meta.parts with their dates)",
    )
    return p.parse_args(argv)


PARTS = ("sandlot", "gvisor", *ALTERNATIVES, "stages", "memory")


def _merge(old: dict[str, Any], new: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """``old`` with the backends and extras measured in ``new`` laid over it."""
    out: dict[str, Any] = json.loads(json.dumps(old))
    for name, fig in new["figures"].items():
        target = out["figures"].setdefault(name, {**fig, "cases": {}})
        for case, backends in fig["cases"].items():
            for backend, result in backends.items():
                if FIGURE_PARTS.get(name, backend) in parts:
                    target["cases"].setdefault(case, {})[backend] = result
    for key, value in new.items():
        if key not in ("meta", "sizes", "figures", "errors"):
            out[key] = value
    compute_ratios(out["figures"])
    out["errors"] = old.get("errors", []) + new.get("errors", [])
    first = {k: v for k, v in old["meta"].items() if k != "parts"}
    out["meta"]["parts"] = old["meta"].get("parts") or [
        {
            "parts": "earlier run (kept)",
            "date": first["date"],
            "commit": first["commit"],
            "duration_s": first.get("duration_s"),
        }
    ]
    out["meta"]["parts"].append(
        {
            "parts": ",".join(parts),
            "date": new["meta"]["date"],
            "commit": new["meta"]["commit"],
            "duration_s": new["meta"]["duration_s"],
        }
    )
    out["meta"]["duration_s"] = round(
        sum(p.get("duration_s") or 0 for p in out["meta"]["parts"]), 1
    )
    return out


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where the results JSON and the rendered docs go: what was asked, else the committed
    files for a full run (and for re-rendering them), else :data:`QUICK_DIR` for a quick run.
    (A quick run once overwrote the published figures with its small samples.)"""
    quick = (args.quick or args.tiny) and not args.render_only
    json_path = args.json or (QUICK_DIR / "latest.json" if quick else DEFAULT_JSON)
    docs = args.docs or (QUICK_DIR if quick else DEFAULT_DOCS)
    return json_path, docs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.json, args.docs = output_paths(args)
    from bench import report

    if args.render_only:
        report.render(json.loads(args.json.read_text()), args.docs)
        return 0
    if os.geteuid() != 0:
        print(
            "python -m bench needs root (the local engine and the alternatives run containers)",
            file=sys.stderr,
        )
        return 2
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = MODES[mode]
    if args.no_profile:
        sizes = MODES[mode].__class__(**{**asdict(sizes), "profile_creates": 0})
    _install_signal_handlers()
    meta = machine.describe()
    run = Run(mode, sizes)
    run.log(f"mode {mode}; machine {meta['machine']}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"unknown --parts {unknown}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    previous = json.loads(args.merge_into.read_text()) if args.merge_into else None
    try:
        if "sandlot" in parts:
            run_sandlot(run)
        if "gvisor" in parts:
            run_gvisor(run)
        for alt in ALTERNATIVES:
            if alt not in parts:
                continue
            wanted = getattr(args, alt)
            default_on = mode == "full" or alt == "crun"
            enabled = default_on if wanted is None else wanted
            run_alternative(run, alt, enabled, f"left out of this run (--{alt} to include)")
        if "stages" in parts:
            run_stages(run)
        if "memory" in parts:
            run_memory(run)
    except KeyboardInterrupt:
        run.errors.append("interrupted")
        raise
    finally:
        results = run.finish(meta)
        if previous is not None:
            results = _merge(previous, results, parts)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        run.log(f"wrote {args.json}")
    report.render(results, args.docs)
    run.log(f"rendered {args.docs / 'benchmarks.md'}")
    print(f"results: {args.json}\nreport: {args.docs / 'benchmarks.md'}")
    missing = [f for f, fig in results["figures"].items() if not fig["cases"]]
    if missing:
        print(f"figures with nothing recorded: {missing}", file=sys.stderr)
        return 1
    return 0
