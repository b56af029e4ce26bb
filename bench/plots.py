"""PNG plots of a bench report (matplotlib, Agg backend: no display needed).

    python -m bench.plots REPORT_DIR...   # draw them again from report.json

latency_over_time.png   p50/p95/p99 per second for each leg, the scenario's phases shaded
latency_histogram.png   the latency distribution of each leg (HDR histogram buckets)
throughput_errors.png   answered/refused/failed per second against the target rate
comparison.png          direct vs nginx vs router: latency percentiles and CPU per request
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogFormatter  # noqa: E402

from bench.loadgen import Schedule  # noqa: E402

COLORS = {"direct": "#4c72b0", "nginx": "#55a868", "router": "#c44e52"}
_PHASE_SHADES = ("#f2f2f2", "#fde9d9", "#e3f1e0", "#e5e5f7")


def _plain_ticks(axis: Any) -> None:
    """Log axes labelled 20, 30, 50 rather than 2 x 10^1."""
    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _shade_phases(ax: Any, schedule: Schedule, label: bool) -> None:
    for i, (phase, (a, b)) in enumerate(zip(schedule.phases, schedule.bounds, strict=True)):
        ax.axvspan(a, b, color=_PHASE_SHADES[i % len(_PHASE_SHADES)], zorder=0)
        if i:
            ax.axvline(a, color="#888888", linestyle=":", linewidth=1)
        if label:
            ax.text((a + b) / 2, 1.01, f"{phase.name} ({phase.rate:g}/s)",
                    transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8,
                    color="#444444")


def latency_over_time(path: Path, legs: dict[str, dict[str, Any]], schedule: Schedule,
                      title: str) -> None:
    fig, axes = plt.subplots(len(legs), 1, figsize=(10, 2.6 * len(legs) + 1), sharex=True,
                             sharey=True, squeeze=False)
    vals = [w[k] for leg in legs.values() for w in leg["timeseries"]
            for k in ("p50_ms", "p99_ms") if w[k]]
    # A queue or a stall spans decades: log scale keeps the quiet seconds readable beside it.
    log = bool(vals) and max(vals) / max(min(vals), 1e-3) > 20
    for ax, (name, leg) in zip(axes[:, 0], legs.items(), strict=True):
        _shade_phases(ax, schedule, label=ax is axes[0, 0])
        ts = leg["timeseries"]
        t = [w["t"] + 0.5 for w in ts]
        for key, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
            ys = [w[key] if w[key] is not None else float("nan") for w in ts]
            ax.plot(t, ys, style, color=COLORS.get(name, "black"), marker=".",
                    label=key.split("_")[0])
        ax.set_ylabel(f"{name}\nlatency, ms{' (log)' if log else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    if log:
        axes[0, 0].set_yscale("log")
        _plain_ticks(axes[0, 0].yaxis)
    elif vals:
        axes[0, 0].set_ylim(0, max(vals) * 1.2)
    axes[-1, 0].set_xlim(0, schedule.duration)
    axes[-1, 0].set_xlabel("seconds since the leg started (each point: requests due in that "
                           "second)")
    fig.suptitle(f"{title}: latency per second, measured from each request's scheduled send "
                 "time", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latency_histogram(path: Path, legs: dict[str, dict[str, Any]], title: str) -> None:
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, leg in legs.items():
        buckets = leg["histogram_ms"]
        if not buckets:
            continue
        ax.stairs([b[2] for b in buckets], [b[0] for b in buckets] + [buckets[-1][1]],
                  color=COLORS.get(name, "black"), label=name, linewidth=1.5)
        lat = leg["latency_ms"]
        for p, style in (("p50", "-"), ("p99", "--")):
            ax.axvline(lat[p], color=COLORS.get(name, "black"), linestyle=style, alpha=0.6,
                       linewidth=1)
    edges = [b[i] for leg in legs.values() for b in leg["histogram_ms"] for i in (0, 1)]
    log = bool(edges) and max(edges) / max(min(edges), 1e-3) > 20
    if log:
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
    ax.set_xlabel(f"latency, ms{' (log)' if log else ''}; vertical lines: p50 (solid) and "
                  "p99 (dashed) per leg")
    ax.set_ylabel("requests per bucket")
    ax.set_title(f"{title}: latency distribution of successful requests (HDR histogram)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def throughput_errors(path: Path, legs: dict[str, dict[str, Any]], schedule: Schedule,
                      title: str) -> None:
    fig, axes = plt.subplots(len(legs), 1, figsize=(10, 2.4 * len(legs) + 1), sharex=True,
                             squeeze=False)
    for ax, (name, leg) in zip(axes[:, 0], legs.items(), strict=True):
        _shade_phases(ax, schedule, label=ax is axes[0, 0])
        ts = leg["timeseries"]
        t = [w["t"] + 0.5 for w in ts]
        ax.step([w["t"] for w in ts] + [ts[-1]["t"] + 1],
                [w["target_rate"] or 0 for w in ts] + [ts[-1]["target_rate"] or 0],
                where="post", color="black", linestyle="--", linewidth=1, label="target rate")
        ax.step(t, [w["ok_rps"] for w in ts], where="mid", color=COLORS.get(name, "black"),
                label="answered OK /s")
        if any(w["refused_rps"] for w in ts):
            ax.plot(t, [w["refused_rps"] for w in ts], color="#dd8452", marker=".",
                    label="refused as intended (429/402) /s")
        if any(w["withheld_rps"] for w in ts):
            ax.plot(t, [w["withheld_rps"] for w in ts], color="#8172b3", marker=".",
                    linestyle="--", label="withheld by the client (Retry-After) /s")
        ax.bar(t, [w["error_rps"] for w in ts], width=0.8, color="#d62728", alpha=0.7,
               label="errors /s")
        ax.set_ylabel(f"{name}\nrequests/s")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the leg started")
    fig.suptitle(f"{title}: throughput and errors per second", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def comparison_plot(path: Path, cmp: dict[str, Any], title: str) -> None:
    legs = cmp["legs"]
    names = list(legs)
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4.5))
    width = 0.25
    for i, p in enumerate(("p50", "p95", "p99")):
        vals = [legs[n][f"{p}_ms"] or 0 for n in names]
        bars = a1.bar([x + (i - 1) * width for x in range(len(names))], vals, width, label=p,
                      alpha=0.85)
        a1.bar_label(bars, fmt="%.1f", fontsize=7)
        added = cmp.get("added_ttft_ms") or cmp["added_ms"]  # streams: the first token
        hops = list(added)
        bars = a2.bar([x + (i - 1) * width for x in range(len(hops))],
                      [added[h][p] for h in hops], width, label=p, alpha=0.85)
        a2.bar_label(bars, fmt="%+.2f", fontsize=7)
    a1.set_xticks(range(len(names)), names)
    a1.set_ylabel("latency, ms")
    a1.set_title("latency percentiles")
    a1.legend(loc="lower right")
    ttft = "added_ttft_ms" in cmp
    a2.set_xticks(range(len(hops)), [f"{h} - direct" for h in hops])
    a2.axhline(0, color="black", linewidth=0.8)
    a2.set_ylabel(f"added {'time to first token' if ttft else 'latency'}, ms")
    a2.set_title(f"what the hop adds{' to the first token' if ttft else ''} "
                 "(percentile differences)")
    a2.legend(loc="best")
    cpu = [legs[n]["cpu_us_per_request"] or 0 for n in names]
    bars = a3.bar(names, cpu, color=[COLORS.get(n, "grey") for n in names])
    a3.bar_label(bars, fmt="%.0f", fontsize=8)
    a3.set_ylabel("CPU µs per request (all its processes)")
    a3.set_title("CPU per request of the server\n(direct: the mock backend itself)")
    fig.suptitle(f"{title}: the same load against the backend directly, through nginx and "
                 "through the router, in one run", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(out: Path, legs: dict[str, dict[str, Any]], schedule: Schedule,
              cmp: dict[str, Any] | None, title: str) -> list[str]:
    with_data = {n: leg for n, leg in legs.items() if leg["latency_ms"]}
    written = []
    if with_data:
        latency_over_time(out / "latency_over_time.png", with_data, schedule, title)
        latency_histogram(out / "latency_histogram.png", with_data, title)
        written += ["latency_over_time.png", "latency_histogram.png"]
    throughput_errors(out / "throughput_errors.png", legs, schedule, title)
    written.append("throughput_errors.png")
    if cmp:
        comparison_plot(out / "comparison.png", cmp, title)
        written.append("comparison.png")
    return written


def redraw(report_dir: Path) -> list[str]:
    """Draw the PNGs of an existing report directory again from its report.json."""
    import json

    from bench.loadgen import Phase

    doc = json.loads((report_dir / "report.json").read_text())
    schedule = Schedule([Phase(p["name"], p["end_s"] - p["start_s"], p["rate"])
                         for p in doc["phases"]])
    return write_all(report_dir, doc["legs"], schedule, doc["comparison"],
                     doc["scenario"]["name"])


if __name__ == "__main__":
    import sys

    for d in sys.argv[1:]:
        print(d, redraw(Path(d)))
