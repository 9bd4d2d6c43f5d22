"""Placement at scale: a discrete-event simulation that drives the scheduler's own placement code.

    python -m loadtest.simulate --profile loadtest/profiles/flux-small-seed0@cpu.json \\
        --workers 8,32,128 --json out/simulation.json --md out/simulation.md --plots out/

The policies are `services/scheduler/placement.py` unchanged, with the scheduler's template heat and warm
planner (templates.py) and its online speed correction (predictions.py). Workers are simulated
(loadtest/simworker.py): step-level continuous batching, a host-memory LRU of templates, an object-store link,
with step and transfer times from a device profile (`instgenie profile`).

Trace (production-shaped, a pure function of the seed): Poisson arrivals, or bursty ones (a two-state
Markov-modulated Poisson process: bursts at 3x the mean rate a quarter of the time, the rest at 1/3x, same
mean); mask ratios from the paper's distributions (production mean 0.11, public 0.19: loadtest/trace.py);
templates drawn from a Zipf law over `--templates` (>= 500) templates; each template's step count from
`--template-steps` (one value, or a list drawn uniformly per template); its size (image tokens) from
`--template-tokens` likewise (default: the model's), which the cost model counts its FLOPs at; its cache bytes
from the model shape and its size (KV mode for Flux, O mode for a UNet). The arrival rate is `load` x the fleet's capacity, estimated from the profile (full batches of the
mean request).

Reported per (workers, policy): mean / P95 / P99 latency (arrival to answer), throughput, template cache hit
ratio (the template was resident on the chosen worker at placement), bytes read from the object store
(requests' loads and proactive warms), and the scheduler's CPU time per placement decision (thread CPU time
around `policy.choose`, views kept current incrementally as the scheduler keeps its registry).
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from instgenie.services.scheduler.costmodel import AnalyticalCostModel, CostModel, FittedCostModel, ModelShape
from instgenie.services.scheduler.placement import PlacementRequest, make_policy
from instgenie.services.scheduler.predictions import WorkerAccuracy, summarise
from instgenie.services.scheduler.profile import Profile
from instgenie.services.scheduler.templates import TemplateHeat, WarmPlanner

from . import simreport
from .outputs import write_outputs
from .simworker import SimRequest, SimWorker
from .trace import MASK_DISTRIBUTIONS, sample_ratios

POLICY_NAMES = ("predicted-finish", "least-requests", "least-masked-tokens", "round-robin")


@dataclass
class SimConfig:
    workers: int = 8
    policy: str = "predicted-finish"
    load: float = 0.8
    requests: int = 4000
    arrivals: str = "poisson"  # or "bursty"
    dist: str = "production"
    templates: int = 500
    zipf: float = 1.0
    template_steps: tuple[int, ...] = (8,)
    #: image tokens of templates, one drawn per template (empty: every template the model's default size)
    template_tokens: tuple[int, ...] = ()
    max_batch: int = 8
    capacity_per_slot: int = 4
    host_templates: int = 8
    #: object store -> host bytes/s per worker (0: the profile's)
    store_bandwidth: float = 0.0
    #: true speed of the slowest workers relative to the profile, and the share of workers that slow
    slow_factor: float = 1.0
    slow_share: float = 0.0
    correction: bool = True
    warm: bool = True
    affinity_slack: float = 0.25
    seed: int = 0
    #: a client refused (every worker full) retries after this many seconds
    retry_after: float = 0.5


def shape_of(profile: Profile) -> ModelShape:
    s = profile.details.get("shape")
    if not s:
        raise ValueError(f"profile {profile.profile_id} carries no model shape (measure it with `instgenie profile`)")
    return ModelShape(**s)


def cache_bytes(shape: ModelShape, steps: int, element_bytes: int = 4, image_tokens: int = 0) -> int:
    """The cache of one template of `image_tokens` tokens (0: the model's default size): KV mode for Flux
    (README: 2 x steps x branches x blocks x N_img x hidden x bytes), O mode for a UNet (every self-attention
    block's output at its level, unet.ocache.o_cache_bytes)."""
    n = image_tokens or shape.image_tokens
    if shape.unet is not None:
        return steps * shape.branches * shape.unet.o_cache_elements(n) * element_bytes
    return 2 * steps * shape.branches * (shape.dual_blocks + shape.single_blocks) * n * shape.hidden * element_bytes


def capacity(profile: Profile, shape: ModelShape, cfg: SimConfig) -> float:
    """Requests/s one worker sustains with full batches of the mean request (as profiled)."""
    mean_ratio = {"production": 0.1113, "public": 0.1901}.get(cfg.dist, 0.15)
    size = round(float(np.mean(cfg.template_tokens))) if cfg.template_tokens else shape.image_tokens
    tokens = max(1, round(mean_ratio * size))
    cost = FittedCostModel(profile)  # the scheduler's own FLOP count and step time, d term included
    flops = cost.request_flops(shape, tokens, image_tokens=size)
    steps = float(np.mean(cfg.template_steps))
    b = cfg.max_batch
    per_step = cost.step_time(b * flops, b)
    return b / (steps * per_step)


def arrivals(rate: float, n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "poisson":
        return np.cumsum(rng.exponential(1.0 / rate, n))
    if kind != "bursty":
        raise ValueError(f"unknown arrival process {kind!r}")
    # Two-state MMPP: high (3x) a quarter of the time, low (1/3x) otherwise: mean rate = rate.
    hi, lo = 3.0 * rate, rate / 3.0
    share_hi = (rate - lo) / (hi - lo)
    mean_hi = 2.0  # seconds per burst
    mean_lo = mean_hi * (1 - share_hi) / share_hi
    out, t, state = [], 0.0, 0
    switch = rng.exponential(mean_lo)
    while len(out) < n:
        gap = rng.exponential(1.0 / (hi if state else lo))
        if t + gap > switch:
            t = switch
            state = 1 - state
            switch = t + rng.exponential(mean_hi if state else mean_lo)
            continue
        t += gap
        out.append(t)
    return np.asarray(out)


def make_trace(cfg: SimConfig, shape: ModelShape, rate: float, cost: CostModel | None = None) -> list[SimRequest]:
    """The requests of one run; their per-step FLOPs as `cost` counts them (the simulation's fitted model)."""
    cost = cost or AnalyticalCostModel()  # only its FLOP count is used here
    rng = np.random.default_rng(cfg.seed)
    times = arrivals(rate, cfg.requests, cfg.arrivals, rng)
    ratios = sample_ratios(cfg.dist, cfg.requests, rng)
    ranks = np.arange(1, cfg.templates + 1, dtype=float)
    weights = ranks ** -cfg.zipf
    picks = rng.choice(cfg.templates, size=cfg.requests, p=weights / weights.sum())
    steps_of = rng.choice(np.asarray(cfg.template_steps), size=cfg.templates)
    # drawn only when asked for: a trace of default-size templates stays what it was for its seed
    sizes_of = rng.choice(np.asarray(cfg.template_tokens), size=cfg.templates) if cfg.template_tokens else None
    reqs = []
    for i in range(cfg.requests):
        size = int(sizes_of[picks[i]]) if sizes_of is not None else shape.image_tokens
        tokens = max(1, int(round(ratios[i] * size)))
        steps = int(steps_of[picks[i]])
        reqs.append(SimRequest(i, float(times[i]), f"t{picks[i]:04d}", tokens, steps,
                               cost.request_flops(shape, tokens, image_tokens=size),
                               cache_bytes(shape, steps, image_tokens=size), image_tokens=size))
    return reqs


class Simulation:
    def __init__(self, cfg: SimConfig, profile: Profile):
        self.cfg = cfg
        self.profile = profile
        self.shape = shape_of(profile)
        if cfg.store_bandwidth:
            profile = replace(profile, store_to_host=replace(profile.store_to_host, bandwidth=cfg.store_bandwidth))
        self.cost = FittedCostModel(profile)  # what the scheduler believes and the devices do (x speed)
        self.policy = make_policy(cfg.policy, self.cost, cfg.affinity_slack)
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        rng = np.random.default_rng(cfg.seed + 1)
        slow = set(rng.choice(cfg.workers, size=int(round(cfg.slow_share * cfg.workers)), replace=False).tolist())
        self.workers = [SimWorker(f"w{i:03d}", self.shape, cfg.max_batch, self.cost,
                                  cfg.slow_factor if i in slow else 1.0, cfg.host_templates,
                                  cfg.max_batch * cfg.capacity_per_slot, self) for i in range(cfg.workers)]
        self.accuracy = {w.worker_id: WorkerAccuracy() for w in self.workers}
        self.heat = TemplateHeat(half_life=30.0, clock=lambda: self.now)
        self.planner = WarmPlanner()
        self.template_steps: dict[str, int] = {}
        self.done: list[SimRequest] = []
        self.decision_ns: list[int] = []
        self.view_ns: list[int] = []
        self.rejected = 0
        self.warms = 0

    def schedule(self, at: float, fn, *args) -> None:
        heapq.heappush(self._events, (at, next(self._seq), fn, args))

    def finished(self, req: SimRequest) -> None:
        self.done.append(req)
        acc = self.accuracy[req.worker.worker_id]
        acc.record_finish(req.predicted, req.finished - req.placed_at)
        if self.cfg.correction and req.first_step is not None and not req.overlapped_load:
            acc.record_compute(req.profiled_compute, req.last_step_end - req.first_step)

    def _views(self):
        return [w.view(self.now, self.cost, self.accuracy[w.worker_id].speed if self.cfg.correction else 1.0)
                for w in self.workers]

    def _arrive(self, now: float, req: SimRequest) -> None:
        req.attempts += 1
        if req.attempts == 1:
            self.heat.observe(req.template, self.shape.model_id, req.cache_bytes, now)
        t0 = time.thread_time_ns()
        views = self._views()
        t1 = time.thread_time_ns()
        choice = self.policy.choose(PlacementRequest(self.shape.model_id, req.template, req.tokens, req.steps,
                                                     req.cache_bytes, image_tokens=req.image_tokens), views)
        t2 = time.thread_time_ns()
        self.view_ns.append(t1 - t0)
        self.decision_ns.append(t2 - t1)
        if choice is None:
            self.rejected += 1
            self.schedule(now + self.cfg.retry_after, self._arrive, req)
            return
        req.predicted = choice.predicted_seconds
        worker = self.workers[int(choice.worker_id[1:])]
        worker.submit(req, now)

    def _plan_warms(self, now: float) -> None:
        views = self._views()
        free = {w.worker_id: len(w.host) < w.host_templates for w in self.workers}
        for action in self.planner.plan(views, self.heat.snapshot(now), now,
                                        host_free=lambda v, nbytes: free[v.worker_id]):
            worker = self.workers[int(action.worker_id[1:])]
            steps = self.template_steps[action.template_id]
            if worker.ensure(action.template_id, action.cache_bytes, steps, now):
                self.warms += 1
        if len(self.done) < self.cfg.requests:
            self.schedule(now + 0.5, self._plan_warms)

    def run(self, trace: list[SimRequest], drain: float = 600.0) -> dict:
        for req in trace:
            self.template_steps[req.template] = req.steps
            self.schedule(req.arrival, self._arrive, req)
        if self.cfg.warm and self.cfg.policy == "predicted-finish":
            self.schedule(0.5, self._plan_warms)
        end = trace[-1].arrival + drain
        wall = time.perf_counter()
        while self._events:
            at, _, fn, args = heapq.heappop(self._events)
            if at > end:
                break
            self.now = at
            fn(at, *args)
        return self.summary(trace, time.perf_counter() - wall)

    def summary(self, trace: list[SimRequest], wall: float) -> dict:
        lat = np.array([r.finished - r.arrival for r in self.done])
        tiers = [r.tier for r in trace if r.worker is not None]
        last = max((r.finished for r in self.done), default=0.0)
        span = last - trace[0].arrival if self.done else 0.0
        pairs = [p for a in self.accuracy.values() for p in a.errors]
        acc = summarise(pairs)
        speeds = [a.speed for a in self.accuracy.values()]
        dec = np.array(self.decision_ns) / 1e3
        views = np.array(self.view_ns) / 1e3
        return {
            "workers": self.cfg.workers, "policy": self.cfg.policy, "load": self.cfg.load,
            "requests": len(trace), "completed": len(self.done), "unfinished": len(trace) - len(self.done),
            "rejected_attempts": self.rejected,
            "latency_mean": float(lat.mean()) if len(lat) else None,
            "latency_p50": float(np.percentile(lat, 50)) if len(lat) else None,
            "latency_p95": float(np.percentile(lat, 95)) if len(lat) else None,
            "latency_p99": float(np.percentile(lat, 99)) if len(lat) else None,
            "throughput_rps": len(self.done) / span if span > 0 else 0.0,
            "hit_ratio": tiers.count("host") / len(tiers) if tiers else 0.0,
            "loading_ratio": tiers.count("loading") / len(tiers) if tiers else 0.0,
            "store_bytes": int(sum(w.bytes_loaded for w in self.workers)),
            "store_loads": int(sum(w.loads for w in self.workers)), "warms": self.warms,
            "decision_us_mean": float(dec.mean()) if len(dec) else None,
            "decision_us_p50": float(np.percentile(dec, 50)) if len(dec) else None,
            "decision_us_p99": float(np.percentile(dec, 99)) if len(dec) else None,
            "view_refresh_us_mean": float(views.mean()) if len(views) else None,
            "prediction_mean_abs_rel_error": acc.mean_abs_relative_error,
            "prediction_mean_error_seconds": acc.mean_error_seconds,
            "speed_min": min(speeds), "speed_max": max(speeds),
            "simulated_seconds": span, "wall_seconds": wall,
        }


def run_one(cfg: SimConfig, profile: Profile) -> dict:
    sim = Simulation(cfg, profile)
    rate = cfg.load * cfg.workers * capacity(profile, sim.shape, cfg)
    trace = make_trace(cfg, sim.shape, rate, sim.cost)
    row = sim.run(trace)
    row["rate"] = rate
    return row


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="device profile (instgenie profile) for times and the model")
    ap.add_argument("--workers", default="8,32,128")
    ap.add_argument("--policies", default=",".join(POLICY_NAMES))
    ap.add_argument("--loads", default="0.8", help="offered load as a share of the fleet's estimated capacity")
    ap.add_argument("--requests-per-worker", type=int, default=300, help="trace length = this x workers")
    ap.add_argument("--arrivals", default="poisson", choices=["poisson", "bursty"])
    ap.add_argument("--dists", default="production,public", help=f"mask ratio distributions: {sorted(MASK_DISTRIBUTIONS)}")
    ap.add_argument("--templates", type=int, default=500)
    ap.add_argument("--zipf", type=float, default=1.0, help="template popularity exponent")
    ap.add_argument("--template-steps", default="8", help="step counts of templates (one drawn per template)")
    ap.add_argument("--template-tokens", default="",
                    help="image tokens of templates, one drawn per template (default: the model's size)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--host-templates", type=int, default=8, help="templates a worker's host memory holds")
    ap.add_argument("--store-bandwidth", type=float, default=0.0,
                    help="object store -> host MB/s per worker (0: the profile's)")
    ap.add_argument("--slow-share", type=float, default=0.0, help="share of workers slower than profiled")
    ap.add_argument("--slow-factor", type=float, default=1.5, help="how much slower those are")
    ap.add_argument("--ablations", action="store_true",
                    help="also run predicted-finish without the warm planner and without the speed correction")
    ap.add_argument("--affinity-slack", type=float, default=0.25, help="as the scheduler's --affinity-slack")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="out/simulation.json")
    ap.add_argument("--md", default="out/simulation.md")
    ap.add_argument("--plots", default="", help="directory for PNG plots ('' = none)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = Profile.load(args.profile)
    steps = tuple(int(s) for s in args.template_steps.split(","))
    sizes = tuple(int(s) for s in args.template_tokens.split(",") if s.strip())
    rows = []
    variants = [(p, True, True) for p in args.policies.split(",")]
    if args.ablations:
        variants += [("predicted-finish", False, True), ("predicted-finish", True, False)]
    for workers in (int(w) for w in args.workers.split(",")):
        for load in (float(x) for x in args.loads.split(",")):
            for dist in args.dists.split(","):
                for policy, warm, correction in variants:
                    cfg = SimConfig(workers=workers, policy=policy, load=load, dist=dist,
                                    requests=args.requests_per_worker * workers, arrivals=args.arrivals,
                                    templates=args.templates, zipf=args.zipf, template_steps=steps,
                                    template_tokens=sizes,
                                    max_batch=args.max_batch, host_templates=args.host_templates,
                                    store_bandwidth=args.store_bandwidth * 1e6, slow_factor=args.slow_factor,
                                    slow_share=args.slow_share, correction=correction, warm=warm,
                                    affinity_slack=args.affinity_slack, seed=args.seed)
                    row = run_one(cfg, profile)
                    row.update(dist=dist, variant=simreport.variant_name(policy, warm, correction))
                    rows.append(row)
                    print(f"{workers:4d} workers {dist:10s} load {load:.2f} {row['variant']:28s} "
                          f"P95 {row['latency_p95']:.3f} s  hit {row['hit_ratio']:.2f}  "
                          f"decision {row['decision_us_mean']:.0f} us  ({row['wall_seconds']:.0f} s)", file=sys.stderr)
    cfg = vars(args) | {"profile_id": profile.profile_id, "template_steps": list(steps),
                        "template_tokens": list(sizes)}
    result = {"config": cfg, "rows": rows}
    if args.plots:
        result["plots"] = [str(p) for p in simreport.plots(result, args.plots)]
    md = simreport.markdown(result)
    write_outputs(result, md, args.json, args.md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
