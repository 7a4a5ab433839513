"""sandlot's benchmark suite: sandlot side by side with raw crun, podman and docker, in one run.

``python -m bench`` (full) or ``python -m bench --quick`` writes ``bench/results/latest.json`` and
renders ``docs/benchmarks.md`` with PNG plots under ``docs/img/``. Needs root (the local engine and
the alternatives run containers). Modules:

- :mod:`bench.stats`    -- samples -> median / p95 / n, skips, ratios
- :mod:`bench.machine`  -- the machine, commit and date recorded with every run
- :mod:`bench.server`   -- a private sandlot server (own state dir and socket, host's images)
- :mod:`bench.sandlot_workloads` -- every figure, measured through the SDK (and the agent socket)
- :mod:`bench.alternatives` -- the same workloads for raw crun (the floor), podman and docker
- :mod:`bench.gvisor_checkpoint` -- gVisor checkpoint/restore times by the memory written
- :mod:`bench.stages`   -- where the time goes: engine stage timers and cProfile of the server
- :mod:`bench.report`   -- JSON -> docs/benchmarks.md tables and docs/img/*.png plots
- :mod:`bench.suite`    -- the run itself (sizes per mode, order, cleanup)
"""
