"""Tables, headline and plots of a serving benchmark result (the JSON serving_bench writes)."""
from __future__ import annotations

from pathlib import Path


def _f(value, fmt: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def system_overheads(result: dict) -> dict[str, dict]:
    """Per engine system over all its runs: scheduling CPU ms per step and mean batch size (step-weighted)."""
    out: dict[str, dict] = {}
    for run in result["runs"] + result["capacity"]:
        s = run["stats"]
        acc = out.setdefault(run["system"], {"cpu": 0.0, "steps": 0, "batch_weighted": 0.0})
        if s.get("overhead_cpu_seconds") is not None:
            acc["cpu"] += s["overhead_cpu_seconds"]
        if s.get("steps") and s.get("mean_batch_size") is not None:
            acc["steps"] += s["steps"]
            acc["batch_weighted"] += s["mean_batch_size"] * s["steps"]
    return {name: {"overhead_ms_per_step": (1000 * a["cpu"] / a["steps"]) if a["steps"] and a["cpu"] else None,
                   "mean_batch_size": a["batch_weighted"] / a["steps"] if a["steps"] else None,
                   "steps": a["steps"]}
            for name, a in out.items()}


def headline(result: dict, load: float = 0.8) -> list[dict]:
    """Per distribution: (d) vs (a) max-throughput ratio, and mean-latency ratio at `load` x (a)'s capacity."""
    rows = []
    cap = {(c["system"], c["dist"]): c["throughput_rps"] for c in result["capacity"]}
    for dist in result["config"]["dists"]:
        a, d = cap.get(("diffusers-static", dist)), cap.get(("ours", dist))
        loads = sorted({r["load"] for r in result["runs"] if r["dist"] == dist})
        if not loads or a is None or d is None:
            continue
        at = min(loads, key=lambda x: abs(x - load))  # the measured load nearest to the one asked for
        at_load = {r["system"]: r for r in result["runs"] if r["dist"] == dist and r["load"] == at}
        ra, rd = at_load["diffusers-static"], at_load["ours"]
        rows.append({
            "dist": dist, "load": at, "rate": ra["rate"], "max_throughput_ratio": d / a if a else None,
            "latency_a": ra["latency_mean"], "latency_d": rd["latency_mean"],
            "mean_latency_ratio": (ra["latency_mean"] / rd["latency_mean"])
            if ra["latency_mean"] and rd["latency_mean"] else None,
            "throughput_a": ra["throughput_rps"], "throughput_d": rd["throughput_rps"],
            "unfinished_a": ra["unfinished"], "unfinished_d": rd["unfinished"],
        })
    return rows


def headline_text(result: dict) -> str:
    lines = []
    for h in headline(result):
        lines.append(
            f"{h['dist']} masks: max throughput (d) ours / (a) diffusers-static = {_f(h['max_throughput_ratio'])}x; "
            f"at {h['load']:.0%} of (a)'s capacity ({h['rate']:.2f} req/s): mean latency (a) {_f(h['latency_a'])} s "
            f"vs (d) {_f(h['latency_d'])} s, ratio (a)/(d) = {_f(h['mean_latency_ratio'])}x; achieved throughput "
            f"{_f(h['throughput_a'])} vs {_f(h['throughput_d'])} req/s; unfinished {h['unfinished_a']} vs "
            f"{h['unfinished_d']}"
        )
    return "\n".join(lines) or "(no headline: systems a and d were not both measured)"


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"## Serving benchmark: preset {cfg['preset']} ({cfg['resolution'][0]}x{cfg['resolution'][1]} px, "
        f"{cfg['image_tokens']} image tokens), {cfg['steps']} steps, max batch {cfg['max_batch_size']}, "
        f"{cfg['threads']} torch threads, {cfg['duration']:g} s Poisson traces, drain <= {cfg['drain']:g} s",
        "",
        "### Max sustainable throughput (closed burst)",
        "",
        result["method"]["capacity"],
        "",
        "| system | dist | requests | completed | max throughput (req/s) | rounds min-max | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["capacity"]:
        lines.append(f"| {c['system']} | {c['dist']} | {c['offered']} | {c['completed']} | "
                     f"{_f(c['throughput_rps'])} | {_f(c.get('throughput_min'))}-{_f(c.get('throughput_max'))} "
                     f"| {_f(c['stats'].get('mean_batch_size'), '.1f')} |")
    lines += [
        "",
        "### Poisson replays",
        "",
        result["method"]["replay"],
        "",
        "| system | dist | load | rate (req/s) | offered (req/s) | mean mask | offered | completed | failed "
        "| unfinished | throughput (req/s) | mean lat (s) | P95 lat (s) | mean queue (s) | P95 queue (s) | mean batch "
        "| sched. CPU ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["runs"], key=lambda r: (r["dist"], r["load"], r["system"])):
        s = r["stats"]
        lines.append(
            f"| {r['system']} | {r['dist']} | {r['load']:.0%} | {r['rate']:.2f} "
            f"| {r['offered'] / cfg['duration']:.2f} | {r['mean_token_ratio']:.3f} "
            f"| {r['offered']} | {r['completed']} | {r['failed']} | {r['unfinished']} | {_f(r['throughput_rps'])} "
            f"| {_f(r['latency_mean'])} | {_f(r['latency_p95'])} | {_f(r['queue_mean'])} | {_f(r['queue_p95'])} "
            f"| {_f(s.get('mean_batch_size'), '.1f')} | {_f(s.get('overhead_ms_per_step'), '.3f')} |"
        )
    lines += ["", "### Engine loop scheduling overhead (all runs; target < 1 ms CPU per step)", "",
              "| system | steps | sched. CPU ms/step | mean batch size |", "|---|---|---|---|"]
    for name, o in system_overheads(result).items():
        lines.append(f"| {name} | {o['steps']} | {_f(o['overhead_ms_per_step'], '.3f', 'n/a')} "
                     f"| {_f(o['mean_batch_size'], '.2f')} |")
    lines += ["", "### Headline", "", headline_text(result)]
    return "\n".join(lines)


def plots(result: dict, out_dir: str | Path) -> list[Path]:
    """Mean and P95 latency vs load per system (one figure per distribution), and a max-throughput bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    systems = list(dict.fromkeys(c["system"] for c in result["capacity"]))
    dists = result["config"]["dists"]
    for dist in dists:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, title in ((axes[0], "latency_mean", "mean latency"), (axes[1], "latency_p95", "P95 latency")):
            for name in systems:
                runs = sorted((r for r in result["runs"] if r["system"] == name and r["dist"] == dist),
                              key=lambda r: r["load"])
                pts = [(r["load"], r[key]) for r in runs if r[key] is not None]
                if pts:
                    ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax.set_xlabel("load (% of diffusers-static max throughput)")
            ax.set_ylabel("seconds")
            ax.set_title(f"{title}, {dist} masks")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        path = out_dir / f"serving_latency_{dist}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(dists))
    cap = {(c["system"], c["dist"]): c["throughput_rps"] or 0.0 for c in result["capacity"]}
    for i, dist in enumerate(dists):
        xs = [j + (i - (len(dists) - 1) / 2) * width for j in range(len(systems))]
        ax.bar(xs, [cap.get((s, dist), 0.0) for s in systems], width, label=f"{dist} masks")
    ax.set_xticks(range(len(systems)))
    ax.set_xticklabels(systems, rotation=15)
    ax.set_ylabel("requests / s")
    ax.set_title("max sustainable throughput (closed burst)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "serving_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
