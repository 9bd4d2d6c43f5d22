"""The load generator's report (loadtest/loadgen.py): JSON, a Markdown table and a PNG of latency against load."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np


def _pct(values, q: float):
    return float(np.percentile(values, q)) if len(values) else None


def summarise(level: dict) -> dict:
    records = level["records"]
    ok = [r for r in records if r["status"] == "OK"]
    lat = [r["latency"] for r in ok]
    queue = [r["queue_seconds"] for r in ok]
    last = max((r["sent_at"] + r["latency"] for r in records), default=0.0)
    sent_span = max((r["sent_at"] for r in records), default=0.0)
    ranks = Counter(r["template_rank"] for r in records)
    return {
        "offered_rate": level["rate"],
        "sent": len(records),
        "sent_rate": len(records) / sent_span if sent_span > 0 else None,
        "ok": len(ok),
        "errors": dict(Counter(r["status"] for r in records if r["status"] != "OK")),
        "throughput": len(ok) / last if last > 0 else None,
        "latency_p50": _pct(lat, 50), "latency_p95": _pct(lat, 95), "latency_p99": _pct(lat, 99),
        "latency_mean": float(np.mean(lat)) if lat else None,
        "queue_p50": _pct(queue, 50), "queue_p95": _pct(queue, 95),
        "mask_ratio_mean": float(np.mean([r["mask_ratio"] for r in records])) if records else None,
        "top_template_share": ranks.get(0, 0) / len(records) if records else None,
        "workers": dict(Counter(r["worker"] for r in ok)),
        **{k: v for k, v in level.get("engine", {}).items()},
    }


def _f(v, fmt=".2f"):
    return "-" if v is None else format(v, fmt)


def markdown(result: dict, summaries: list[dict]) -> str:
    c = result["config"]
    lines = [
        f"Model `{result['model']}` ({result['model_size'][0]}x{result['model_size'][1]}, "
        f"{result['default_steps']} steps), {result['templates']} templates with Zipf popularity (s = {c['zipf']}), "
        f"mask ratios from the `{c['dist']}` distribution, Poisson arrivals for {c['duration']:g} s per load "
        f"(at most {c['max_requests']} edits), unary `Edit` calls with a {c['deadline']:g} s deadline, seed "
        f"{c['seed']}.",
        "",
        "| offered /s | sent | sent /s | ok | errors | throughput /s | p50 s | p95 s | p99 s | queue p50 s | "
        "queue p95 s | mean batch | tokens/step | host-tier share | mean mask ratio | top template share |",
        "|" + "---|" * 16,
    ]
    for s in summaries:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())) or "0"
        lines.append(
            f"| {s['offered_rate']:g} | {s['sent']} | {_f(s['sent_rate'])} | {s['ok']} | {errors} | "
            f"{_f(s['throughput'])} | {_f(s['latency_p50'], '.3f')} | {_f(s['latency_p95'], '.3f')} | "
            f"{_f(s['latency_p99'], '.3f')} | {_f(s['queue_p50'], '.3f')} | {_f(s['queue_p95'], '.3f')} | "
            f"{_f(s.get('mean_batch_size'))} | {_f(s.get('mean_tokens_per_step'), '.0f')} | "
            f"{_f(s.get('host_tier_share'))} | {_f(s['mask_ratio_mean'], '.3f')} | "
            f"{_f(s['top_template_share'])} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rates = [s["offered_rate"] for s in summaries]
    for key, label in (("latency_p50", "p50"), ("latency_p95", "p95"), ("latency_p99", "p99")):
        a.plot(rates, [s[key] or np.nan for s in summaries], marker="o", label=f"latency {label}")
    a.plot(rates, [s["queue_p95"] or np.nan for s in summaries], marker="x", ls="--", label="worker queue p95")
    a.set_xlabel("offered load (edits/s)")
    a.set_ylabel("seconds")
    a2 = a.twinx()
    a2.plot(rates, [s["throughput"] or np.nan for s in summaries], color="k", marker="s", label="throughput")
    a2.set_ylabel("answered edits/s")
    a.legend(loc="upper left", fontsize=8)
    a2.legend(loc="lower right", fontsize=8)
    a.set_title("latency and throughput against offered load")
    for level, s in zip(result["levels"], summaries):
        lat = np.sort([r["latency"] for r in level["records"] if r["status"] == "OK"])
        if len(lat):
            b.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{s['offered_rate']:g}/s")
    b.set_xlabel("end-to-end latency (s)")
    b.set_ylabel("share of edits")
    b.set_title("latency CDF per offered load")
    b.legend(fontsize=8)
    fig.suptitle(f"InstGenIE local mesh: {result['model']}, {result['templates']} templates, "
                 f"{result['config']['dist']} masks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summaries = [summarise(level) for level in result["levels"]]
    result = {**result, "summary": summaries}
    paths = [out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png")]
    paths[0].write_text(json.dumps(result, indent=1))
    paths[1].write_text(markdown(result, summaries))
    plot(result, summaries, paths[2])
    return paths
