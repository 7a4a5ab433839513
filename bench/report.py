"""Render the results JSON as ``docs/benchmarks.md`` (tables with ratios) and PNG plots under
``docs/img/`` (matplotlib, Agg backend). The hand-written analysis ("where the time goes")
lives in ``bench/analysis.md`` and is included verbatim, so re-running the bench never loses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ANALYSIS = Path(__file__).with_name("analysis.md")
BACKENDS = ("sandlot", "gvisor", "crun", "podman", "docker")
COLORS = {
    "sandlot": "#2a7ab9",
    "gvisor": "#d35400",
    "sandlot (agent)": "#7fb3dd",
    "sandlot (warm pool)": "#7fb3dd",
    "crun": "#555555",
    "podman": "#8e44ad",
    "docker": "#1d9b6c",
}
TARGETS: list[tuple[str, str, str, float, str]] = [
    # figure, case, label, bound, "max"/"min"
    ("tti_cold_ms", "-", "cold create -> first echo", 100, "max"),
    ("tti_warm_ms", "-", "from a warm pool", 15, "max"),
    ("exec_rtt_ms", "-", "exec `true` round trip", 3, "max"),
    ("stream_latency_ms", "-", "streamed output latency", 5, "max"),
    ("file_write_mb_s", "100MB", "write 100 MB", 300, "min"),
    ("file_read_mb_s", "100MB", "read 100 MB", 300, "min"),
    ("idle_sandbox_mib", "-", "memory per idle sandbox", 8, "max"),
    ("max_idle_sandboxes", "-", "idle sandboxes at once", 500, "min"),
    ("light_wake_ms", "-", "light sleep -> awake", 5, "max"),
    *(
        (f"{who}_peak_rss_mib", case, f"{who} peak RSS above idle, {case}", 64, "max")
        for who in ("sdk", "server")
        for case in ("exec", "exec_stream", "upload", "download")
    ),
]
#: issue 15's gVisor targets: figure, case, label, bound, "max"/"min", the backend measured.
GVISOR_TARGETS: list[tuple[str, str, str, float, str, str]] = [
    ("tti_cold_ms", "-", "gVisor: cold create -> first echo", 250, "max", "gvisor"),
    ("exec_rtt_ms", "-", "gVisor: exec `true` round trip", 5, "max", "gvisor"),
    ("deep_wake_ms", "-", "gVisor: deep wake, memory kept", 50, "max", "gvisor"),
    ("restore_ms", "100MB", "gVisor: restore of a 100 MB sandbox", 150, "max", "sandlot"),
    ("checkpoint_ms", "1GB", "gVisor: checkpoint of 1 GB", 1000, "max", "sandlot"),
]


def _fmt(v: float | None) -> str:
    if v is None:
        return "\u2013"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _ratio_text(r: float | None) -> str:
    times = "\u00d7"  # the multiplication sign
    return "" if r is None else f"{times}{r:.2g}" if r < 10 else f"{times}{r:.0f}"


def _cell(res: dict[str, Any] | None, r: float | None = None) -> str:
    if res is None:
        return "n/a"
    if "skipped" in res:
        return "skipped"
    if "value" in res:
        return str(res["value"])
    text = _fmt(res["median"])
    return f"{text} ({_ratio_text(r)})" if r is not None else text


def _value(res: dict[str, Any] | None) -> float | None:
    if not res or "skipped" in res:
        return None
    return float(res["value"] if "value" in res else res["median"])


def render(results: dict[str, Any], docs: Path) -> None:
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    plots = _plots(results, img)
    text = _markdown(results, plots)
    (docs / "benchmarks.md").write_text(text)


# -- markdown --------------------------------------------------------------------------------------


def _markdown(res: dict[str, Any], plots: dict[str, str]) -> str:
    meta, figs = res["meta"], res["figures"]
    m = meta["machine"]
    out: list[str] = []
    w = out.append
    w("# Benchmarks")
    w("")
    w(
        "sandlot side by side with raw crun (the floor), podman and docker, measured in one run "
        "by `python -m bench` (the [suite](../bench/__init__.py)); this page is generated from "
        "[`bench/results/latest.json`](../bench/results/latest.json) — edit "
        "[`bench/analysis.md`](../bench/analysis.md) for the prose at the end."
    )
    w("")
    w(
        f"- **Run**: {meta['mode']} mode, {meta['date']}, commit `{meta['commit'][:12]}`"
        f"{' (with uncommitted changes in the work tree)' if meta.get('worktree_dirty') else ''}"
        f"{' — finished in parts, listed below' if meta.get('parts') else ''}, "
        f"{meta.get('duration_s', '?')} s"
    )
    for part in meta.get("parts", []):
        w(
            f"  - part `{part['parts']}`: {part['date']}, commit `{part['commit'][:12]}`, "
            f"{part.get('duration_s', '?')} s"
        )
    w(
        f"- **Machine**: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, kernel "
        f"{m['kernel']}, {m['os']}, cgroups {m['cgroups']}; load average at start "
        f"{m['load_avg_at_start']} (the machine is shared: treat small differences as noise)"
    )
    w("- **Versions**: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()))
    w(
        "- **Reading the numbers**: each figure is the median, the p95 (the bad tail: 95th "
        "percentile of latencies and memory, 5th percentile of rates) and n, the number of "
        "samples. The ratio is sandlot's median / the alternative's: below 1 is better for "
        "sandlot on ms and MiB, above 1 is better for sandlot on rates."
    )
    w("")
    w("## Targets (DESIGN.md)")
    w("")
    w("| target | bound | sandlot median | p95 | n | |")
    w("|---|---|---|---|---|---|")
    for fig, case, label, bound, kind, backend in [
        *((*t, "sandlot") for t in TARGETS),
        *GVISOR_TARGETS,
    ]:
        r = figs.get(fig, {}).get("cases", {}).get(case, {}).get(backend)
        unit = figs.get(fig, {}).get("unit", "")
        op = "≤" if kind == "max" else "≥"
        if r is None or "skipped" in r:
            why = r["skipped"] if r else "not measured in this run"
            w(
                f"| {label} (`{fig}`{'' if case == '-' else ' ' + case}) | {op} {bound:g} {unit} "
                f"| skipped: {why} | | | |"
            )
            continue
        v = _value(r)
        assert v is not None
        ok = v <= bound if kind == "max" else v >= bound
        p95 = _fmt(r.get("p95")) if "p95" in r else ""
        n = r.get("n", "")
        w(
            f"| {label} (`{fig}`{'' if case == '-' else ' ' + case}) | {op} {bound:g} {unit} | "
            f"{_fmt(v)} | {p95} | {n} | {'met' if ok else '**missed**'} |"
        )
    w("")
    w("## Side by side")
    w("")
    w("Medians, with the ratio sandlot / alternative in brackets.")
    w("")
    w("| figure | case | " + " | ".join(BACKENDS) + " |")
    w("|---|---|" + "---|" * len(BACKENDS))
    for name, fig in figs.items():
        for case, backends in fig["cases"].items():
            ratios = fig.get("ratios", {}).get(case, {})
            cells = [_cell(backends.get(b), ratios.get(b)) for b in BACKENDS]
            w(
                f"| `{name}` ({fig['unit']}) | {'' if case == '-' else case} | "
                + " | ".join(cells)
                + " |"
            )
    w("")
    for key, title in (
        ("tti", "Time to interactive"),
        ("exec", "Exec round trip"),
        ("throughput", "Exec throughput"),
        ("stream", "Streaming latency"),
        ("files", "File transfer"),
        ("idle", "Idle memory"),
        ("create_delete", "Create + delete, sustained"),
        ("stages", "Cold create, stage by stage"),
    ):
        if key in plots:
            w(f"![{title}](img/{plots[key]})")
            w("")
    w("## Every figure")
    w("")
    for name, fig in figs.items():
        w(f"### `{name}` — {fig['what']} ({fig['unit']}, {fig['better']} is better)")
        w("")
        w("| case | backend | median | p95 | n | sandlot / it | how |")
        w("|---|---|---|---|---|---|---|")
        for case, backends in fig["cases"].items():
            ratios = fig.get("ratios", {}).get(case, {})
            for b, r in backends.items():
                c = "" if case == "-" else case
                if "skipped" in r:
                    w(f"| {c} | {b} | skipped: {r['skipped']} | | | | |")
                elif "value" in r:
                    detail = ", ".join(f"{k}: {v}" for k, v in r.items() if k != "value")
                    w(f"| {c} | {b} | {r['value']} | | | | {detail} |")
                else:
                    how = r.get("how") or r.get("path") or r.get("source") or ""
                    extras = []
                    for k in ("create_ms", "first_exec_ms", "delete_ms"):
                        if k in r:
                            extras.append(f"{k.replace('_ms', '')} {_fmt(r[k]['median'])} ms")
                    if "host_helper" in r:
                        extras.append(
                            f"+ host-side {r['host_helper']} "
                            f"{_fmt(r['host_helper_pss_mib_median'])} MiB PSS each"
                        )
                    if "concurrency" in r:
                        extras.append(f"concurrency {r['concurrency']}")
                    if "running" in r:
                        extras.append(f"{r['running']} running")
                    if extras:
                        how = (how + "; " if how else "") + ", ".join(extras)
                    w(
                        f"| {c} | {b} | {_fmt(r['median'])} | {_fmt(r['p95'])} | {r['n']} | "
                        f"{_ratio_text(ratios.get(b))} | {how} |"
                    )
        w("")
    stages = res.get("stages")
    if stages:
        w("## Where the time goes: measured")
        w("")
        for key, st in stages.items():
            w(
                f"Local engine, image `{st['image']}`, {st['n']} samples: create → healthy agent "
                f"**{_fmt(st['create_to_healthy_ms'])} ms**, delete **{_fmt(st['delete_ms'])} ms** "
                f"(medians; `bench/stages.py` wraps the engine's own functions with timers)."
            )
            w("")
            w("| stage | median ms | what |")
            w("|---|---|---|")
            for row in st["create"] + st["delete"] + st.get("wake", []):
                w(f"| `{row['stage']}` | {_fmt(row['median_ms'])} | {row['what']} |")
            w("")
            if key == "engine_default":
                continue
    dec = res.get("exec_decomposition")
    if dec:
        w(
            f"The exec round trip taken apart on one live sandbox ({dec['n']} samples each, "
            "medians; `bench/stages.py:exec_decomposition`):"
        )
        w("")
        w("| path | median ms |")
        w("|---|---|")
        for row in dec["rows"]:
            w(f"| {row['path']} | {_fmt(row['median_ms'])} |")
        w("")
    fdec = res.get("file_write_decomposition")
    if fdec:
        w(
            f"A {fdec['bytes'] // 2**20} MiB binary file taken apart "
            "(`bench/stages.py:file_write_decomposition`, MiB/s):"
        )
        w("")
        w("| path | MiB/s |")
        w("|---|---|")
        for row in fdec["rows"]:
            w(f"| {row['path']} | {_fmt(row['mib_s'])} |")
        w("")
    prof = res.get("profile")
    exp = (prof or {}).get("ready_poll_experiment")
    if exp:
        a, b = exp["as_is"], exp["poll_1ms"]
        w(
            "Experiment: the server's readiness poll (backoff 5, 10, 20, 40, 80, 100 ms between "
            "`/health` probes) capped at 1 ms, same engine (`bench.server:engine_fast_ready_poll`)"
            f": cold create → first echo {_fmt(a['median'])} → **{_fmt(b['median'])} ms** "
            f"(p95 {_fmt(a['p95'])} → {_fmt(b['p95'])}; n = {b['n']})."
        )
        w("")
    if prof:
        w(
            "cProfile of the server process (functions by own time per operation; "
            f"{prof.get('note', '')})"
        )
        w("")
        for key, title in (
            ("server_create", "server, per create+delete"),
            ("server_exec", "server, per exec of `true`"),
            ("client_exec", "SDK client, per exec of `true`"),
        ):
            rows = prof.get(key) or []
            w(f"<details><summary>{title}</summary>")
            w("")
            w("| function | calls/op | own ms/op | cumulative ms/op |")
            w("|---|---|---|---|")
            for r in rows:
                w(
                    f"| `{r['function']}` | {r['calls_per_op']} | {r['own_ms_per_op']} | "
                    f"{r['cum_ms_per_op']} |"
                )
            w("")
            w("</details>")
            w("")
    if res.get("errors"):
        w("## Errors in this run")
        w("")
        for e in res["errors"]:
            w(f"- {e}")
        w("")
    if ANALYSIS.exists():
        w(ANALYSIS.read_text().rstrip())
        w("")
    return "\n".join(out)


# -- plots -----------------------------------------------------------------------------------------


def _plots(res: dict[str, Any], img: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    figs = res["figures"]
    made: dict[str, str] = {}
    stamp = f"{res['meta']['date']} · {res['meta']['commit'][:10]} · {res['meta']['mode']}"

    def save(fig: Any, key: str, name: str) -> None:
        fig.text(0.99, 0.01, stamp, ha="right", va="bottom", fontsize=7, color="#888")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(img / name, dpi=110)
        plt.close(fig)
        made[key] = name

    def bars(
        key: str,
        title: str,
        series: list[tuple[str, dict[str, Any] | None]],
        unit: str,
        better: str,
        name: str,
        log: bool = False,
    ) -> None:
        rows = [(label, r) for label, r in series if r and "skipped" not in r and "median" in r]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels = [label for label, _ in rows]
        med = [r["median"] for _, r in rows]
        tail = [r["p95"] for _, r in rows]
        lo = [max(0.0, m - t) for m, t in zip(med, tail, strict=True)]
        hi = [max(0.0, t - m) for m, t in zip(med, tail, strict=True)]
        colors = [COLORS.get(label, "#999") for label in labels]
        ax.bar(labels, med, color=colors, yerr=[lo, hi], capsize=4)
        for i, v in enumerate(med):
            ax.text(i, v, f" {_fmt(v)}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(f"{unit} (median; bar to p95)")
        ax.set_title(f"{title} — {better} is better", fontsize=10)
        if log:
            ax.set_yscale("log")
        save(fig, key, name)

    def series(fig: str, case: str = "-") -> list[tuple[str, dict[str, Any] | None]]:
        cases = figs.get(fig, {}).get("cases", {}).get(case, {})
        return [(b, cases.get(b)) for b in BACKENDS]

    warm = figs.get("tti_warm_ms", {}).get("cases", {}).get("-", {}).get("sandlot")
    cold = series("tti_cold_ms")
    bars(
        "tti",
        "create → first `echo hi`",
        [cold[0], ("sandlot (warm pool)", warm), *cold[1:]],
        "ms",
        "lower",
        "bench_tti_cold.png",
        log=True,
    )
    agent = figs.get("exec_rtt_agent_ms", {}).get("cases", {}).get("-", {}).get("sandlot")
    ex = series("exec_rtt_ms")
    bars(
        "exec",
        "exec `true` round trip",
        [ex[0], ("sandlot (agent)", agent), *ex[1:]],
        "ms",
        "lower",
        "bench_exec_rtt.png",
        log=True,
    )
    bars(
        "stream",
        "printed in the sandbox → received",
        series("stream_latency_ms"),
        "ms",
        "lower",
        "bench_stream_latency.png",
    )
    bars(
        "idle",
        "memory per idle sandbox (cgroup)",
        series("idle_sandbox_mib"),
        "MiB",
        "lower",
        "bench_idle_memory.png",
    )
    bars(
        "create_delete",
        "create + delete cycles per second",
        series("create_delete_per_s"),
        "cycles/s",
        "higher",
        "bench_create_delete.png",
    )

    # throughput: lines over concurrency
    tp = figs.get("exec_throughput_per_s", {}).get("cases", {})
    if tp:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        conc = list(tp)
        xs = [int(c.split("=")[1]) for c in conc]
        drew = False
        for b in BACKENDS:
            ys = [_value(tp[c].get(b)) for c in conc]
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                drew = True
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], marker="o", label=b, color=COLORS[b]
                )
        if drew:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_yscale("log")
            ax.set_xlabel("concurrent callers")
            ax.set_ylabel("execs of `true` per second (median)")
            ax.set_title("exec throughput — higher is better", fontsize=10)
            ax.legend(fontsize=8)
            save(fig, "throughput", "bench_exec_throughput.png")
        else:
            plt.close(fig)

    # files: write and read, grouped by size
    fw = figs.get("file_write_mb_s", {}).get("cases", {})
    fr = figs.get("file_read_mb_s", {}).get("cases", {})
    if fw:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        sizes = list(fw)
        present = [
            b for b in BACKENDS if any(_value(d.get(s, {}).get(b)) for d in (fw, fr) for s in sizes)
        ]
        width = 0.8 / max(1, len(present))
        for ax, data, title in ((axes[0], fw, "write"), (axes[1], fr, "read")):
            for i, b in enumerate(present):
                ys = [_value(data.get(s, {}).get(b)) or 0 for s in sizes]
                if any(ys):
                    ax.bar(
                        [j + i * width for j in range(len(sizes))],
                        ys,
                        width,
                        label=b,
                        color=COLORS[b],
                    )
            ax.set_xticks([j + width * (len(present) - 1) / 2 for j in range(len(sizes))], sizes)
            ax.set_yscale("log")
            ax.set_title(f"file {title} — higher is better", fontsize=10)
        axes[0].set_ylabel("MiB/s (median)")
        axes[1].legend(fontsize=8)
        save(fig, "files", "bench_files.png")

    st = res.get("stages", {}).get("engine_default")
    if st:
        rows = [
            r for r in st["create"] if r["stage"] not in ("_prepare", "mounts.mount_disk_image")
        ]
        # mkfs alone = disk image total - its loop mount
        total = {r["stage"]: r["median_ms"] for r in st["create"]}
        mkfs = total.get("mounts.mount_disk_image", 0) - total.get(
            "mounts.mount_existing_disk_image", 0
        )
        rest = total.get("_prepare", 0) - sum(
            total.get(k, 0)
            for k in (
                "mounts.mount_disk_image",
                "userns.create_pinned",
                "idmap.userns_fd",
                "idmap.mount_idmapped",
                "mounts.mount_overlay",
                "build_config",
            )
        )
        labels = [r["stage"] for r in rows] + ["mkfs.ext4 (disk quota)", "rest of _prepare"]
        values = [r["median_ms"] for r in rows] + [mkfs, max(0.0, rest)]
        order = sorted(range(len(values)), key=lambda i: values[i])
        fig, ax = plt.subplots(figsize=(7, 3.8))
        ax.barh([labels[i] for i in order], [values[i] for i in order], color="#2a7ab9")
        for y, i in enumerate(order):
            ax.text(values[i], y, f" {_fmt(values[i])}", va="center", fontsize=8)
        ax.set_xlabel("ms (median)")
        ax.set_title(
            f"cold create stages (engine only; total {_fmt(st['create_to_healthy_ms'])}"
            " ms to a healthy agent)",
            fontsize=10,
        )
        ax.tick_params(axis="y", labelsize=8)
        save(fig, "stages", "bench_create_stages.png")
    return made
