"""Headline, table and plots of a load-balancing benchmark result (the JSON loadtest/balance_bench.py writes)."""
from __future__ import annotations

from pathlib import Path

BASE, OURS = "least-requests", "predicted-finish"


def _f(value, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def headline(result: dict) -> dict:
    """At the highest load least-requests sustains: predicted-finish's P95 against least-requests'."""
    runs = result["runs"]
    sustained = sorted(r["load"] for r in runs if r["policy"] == BASE and r["sustained"])
    out: dict = {"base": BASE, "policy": OURS, "load": sustained[-1] if sustained else None}
    if out["load"] is None:
        out["text"] = f"{BASE} sustained none of the loads"
        return out
    at = {r["policy"]: r for r in runs if r["load"] == out["load"]}
    base, ours = at.get(BASE), at.get(OURS)
    if not base or not ours or not base["latency_p95"] or not ours["latency_p95"]:
        out["text"] = "no comparison at that load"
        return out
    out.update(p95_base=base["latency_p95"], p95_ours=ours["latency_p95"],
               reduction=1.0 - ours["latency_p95"] / base["latency_p95"],
               mean_base=base["latency_mean"], mean_ours=ours["latency_mean"],
               hit_base=base["hit_ratio"], hit_ours=ours["hit_ratio"])
    out["text"] = (f"at load {out['load']:.0%} (the highest {BASE} sustains, {base['rate']:.1f} req/s): P95 {OURS} "
                   f"{ours['latency_p95']:.3f} s vs {BASE} {base['latency_p95']:.3f} s, "
                   + (f"{100 * out['reduction']:.0f} % lower" if out["reduction"] >= 0
                      else f"{-100 * out['reduction']:.0f} % higher")
                   + f" (target: >= 20 % lower); mean {ours['latency_mean']:.3f} vs "
                   f"{base['latency_mean']:.3f} s; cache hits {ours['hit_ratio']:.0%} vs {base['hit_ratio']:.0%}")
    return out


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"Model {c['model']} ({c['steps']} steps), 2 CPU workers x 1 torch thread, max batch "
             f"{c['max_batch_size']}; {c['templates']} templates (Zipf {c['zipf']:g}) of {c['template_cache_mb']:.2f} MB, "
             f"host memory {c['host_cache_mb']:.1f} MB per worker ({c['host_templates']:g} templates); "
             + (f"object-store reads capped at {c['store_mbps']:g} MB/s per worker (a template load "
                f"{c['template_cache_mb'] / c['store_mbps']:.2f} s); " if c.get('store_mbps') else "")
             + f"{c['dist']} masks; Poisson arrivals for {c['duration']:g} s per run, {c.get('rounds', 1)} traces per load "
             f"(latencies pooled), drain <= {c['drain']:g} s; "
             f"capacity (least-requests burst) {c['capacity_rps']:.2f} req/s; profile `{c['profile_id']}` "
             f"(compute R² {c['profile_r2']:.4f}); {c['wall_seconds']} s in all.", "",
             "| load | rate (req/s) | policy | completed | failed | unfinished | throughput (req/s) | mean (s) "
             "| P50 (s) | P95 (s) | P95 per round (s) | P99 (s) | cache hit | prediction MAPE | worker speeds | machine load | sustained |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["runs"], key=lambda r: (r["load"], r["policy"])):
        speeds = ", ".join(f"{v:.2f}" for v in r["speeds"].values())
        lines.append(f"| {r['load']:.0%} | {r['rate']:.1f} | {r['policy']} | {r['completed']}/{r['offered']} "
                     f"| {r['failed']} | {r['unfinished']} | {r['throughput_rps']:.1f} | {_f(r['latency_mean'])} "
                     f"| {_f(r['latency_p50'])} | **{_f(r['latency_p95'])}** "
                     f"| {', '.join(_f(x, '.2f') for x in r.get('round_p95', []))} | {_f(r['latency_p99'])} "
                     f"| {r['hit_ratio']:.0%} | {100 * r['prediction_mape']:.0f} % | {speeds} "
                     f"| {r.get('loadavg_1min', float('nan')):.1f} | {'yes' if r['sustained'] else 'no'} |")
    lines += ["", "Headline: " + result.get("headline", headline(result))["text"]]
    return "\n".join(lines)


def plots(result: dict, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    policies = list(dict.fromkeys(r["policy"] for r in runs))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in policies:
        mine = sorted((r for r in runs if r["policy"] == name), key=lambda r: r["load"])
        x = [100 * r["load"] for r in mine]
        for ax, key in ((axes[0], "latency_p95"), (axes[1], "latency_mean")):
            ax.plot(x, [r[key] for r in mine], marker="o", label=name)
        axes[2].plot(x, [r["hit_ratio"] for r in mine], marker="o", label=name)
    for ax, title, unit in ((axes[0], "P95 latency", "seconds"), (axes[1], "mean latency", "seconds"),
                            (axes[2], "template cache hit ratio", "share of placements")):
        ax.set_xlabel("load (% of least-requests burst capacity)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = out_dir / "balance.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
