"""Tables and plots of a placement simulation result (the JSON loadtest/simulate.py writes)."""
from __future__ import annotations

from pathlib import Path


def variant_name(policy: str, warm: bool, correction: bool) -> str:
    if policy != "predicted-finish" or (warm and correction):
        return policy
    return policy + ("" if warm else " - warming") + ("" if correction else " - correction")


def _f(value, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"Profile `{cfg['profile_id']}`; {cfg['templates']} templates (Zipf {cfg['zipf']:g}), template steps "
             f"{cfg['template_steps']}, max batch {cfg['max_batch']}, host memory {cfg['host_templates']} templates per "
             f"worker, store bandwidth {cfg['store_bandwidth'] or 'as profiled'} MB/s per worker, {cfg['arrivals']} "
             f"arrivals, {cfg['requests_per_worker']} requests per worker, seed {cfg['seed']}"
             + (f", {cfg['slow_share']:.0%} of workers {cfg['slow_factor']:g}x slower than profiled"
                if cfg["slow_share"] else ""), "",
             "| workers | masks | load | policy | P50 (s) | P95 (s) | P99 (s) | mean (s) | throughput (req/s) "
             "| cache hit | store GB | warms | decision CPU mean / p99 (µs) | prediction MAPE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['workers']} | {r['dist']} | {r['load']:.0%} | {r['variant']} | {_f(r['latency_p50'])} "
            f"| **{_f(r['latency_p95'])}** | {_f(r['latency_p99'])} | {_f(r['latency_mean'])} "
            f"| {r['throughput_rps']:.1f} | {r['hit_ratio']:.1%} | {r['store_bytes'] / 1e9:.2f} | {r['warms']} "
            f"| {_f(r['decision_us_mean'], '.0f')} / {_f(r['decision_us_p99'], '.0f')} "
            f"| {100 * r['prediction_mean_abs_rel_error']:.1f} % |")
    lines += ["", "P95 relative to predicted-finish (same workers, masks, load):", ""]
    lines += ["| workers | masks | load | " + " | ".join(_others(result)) + " |",
              "|---|---|---|" + "---|" * len(_others(result))]
    for key, row in _relative(result).items():
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:.0%} | " + " | ".join(
            "-" if row.get(o) is None else f"{row[o]:+.0%}" for o in _others(result)) + " |")
    return "\n".join(lines)


def _others(result: dict) -> list[str]:
    return [v for v in dict.fromkeys(r["variant"] for r in result["rows"]) if v != "predicted-finish"]


def _relative(result: dict) -> dict:
    base = {(r["workers"], r["dist"], r["load"]): r["latency_p95"] for r in result["rows"]
            if r["variant"] == "predicted-finish"}
    out: dict = {}
    for r in result["rows"]:
        key = (r["workers"], r["dist"], r["load"])
        if r["variant"] != "predicted-finish" and base.get(key) and r["latency_p95"] is not None:
            out.setdefault(key, {})[r["variant"]] = r["latency_p95"] / base[key] - 1.0
    return out


def plots(result: dict, out_dir: str | Path) -> list[Path]:
    """P95 latency by policy over fleet sizes (one panel per mask distribution), and decision CPU time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    dists = list(dict.fromkeys(r["dist"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    load = max(r["load"] for r in rows)
    fig, axes = plt.subplots(1, len(dists) + 1, figsize=(5 * (len(dists) + 1), 4), squeeze=False)
    for ax, dist in zip(axes[0], dists):
        for v in variants:
            pts = sorted((r["workers"], r["latency_p95"]) for r in rows
                         if r["variant"] == v and r["dist"] == dist and r["load"] == load)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers")
        ax.set_ylabel("P95 latency (s)")
        ax.set_title(f"{dist} masks, load {load:.0%}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    ax = axes[0][-1]
    pts = sorted((r["workers"], r["decision_us_mean"], r["decision_us_p99"]) for r in rows
                 if r["variant"] == "predicted-finish")
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="mean")
    ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="s", label="p99")
    ax.axhline(1000, color="grey", linestyle="--", label="1 ms target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers")
    ax.set_ylabel("µs CPU per placement decision")
    ax.set_title("predicted-finish decision time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "simulation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
