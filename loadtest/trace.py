"""Poisson request traces for the serving benchmark: arrivals, templates, mask ratios, synthetic masks.

    python -m loadtest.trace --rate 2 --duration 60 --seed 0 --dist production --out trace.json

Arrivals are a Poisson process: exponential inter-arrival times of mean 1/rate from `numpy.random.Generator(seed)`,
kept while they fall before `duration`. Each request picks a template uniformly, a prompt and a noise seed, and a
mask ratio from a named distribution (the paper's Fig. 3 means, see `MASK_DISTRIBUTIONS`).

Masks are synthesised on the model's token grid (one token = `cell` x `cell` pixels: VAE factor 8 x Flux patch 2
= 16 px), so that the number of computed tokens is exactly round(ratio x tokens): the engine computes every token
a mask pixel touches, so a pixel-accurate shape at these small resolutions would inflate the effective ratio by
its ragged border. The shape is a random ellipse or rectangle (random centre and aspect ratio): the tokens are
ranked by their distance to the centre in that shape's metric and the nearest `n` are taken, which gives the exact
count even where the shape is cut by the image border. Everything is a pure function of the seed.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

#: name -> (alpha, beta) of the Beta distribution of mask ratios. Means 0.11 (production trace) and 0.19 (public
#: trace) as in the paper; concentration alpha+beta = 10 gives the right-skewed shape of its Fig. 3 (most masks
#: small, a long tail; s.d. 0.094 and 0.118). After clipping to RATIO_RANGE the means are 0.1113 and 0.1901.
MASK_DISTRIBUTIONS: dict[str, tuple[float, float]] = {
    "production": (1.1, 8.9),
    "public": (1.9, 8.1),
}
RATIO_RANGE = (0.02, 0.9)

#: edit prompts, picked uniformly (the tiny models' text encoders read bytes, so any text works)
PROMPTS = (
    "a red hat", "a small dog", "sunglasses", "a bunch of flowers", "a wooden sign", "a blue scarf",
    "a cup of tea", "a golden crown", "snow", "a neon light",
)
SHAPES = ("ellipse", "rectangle")


def sample_ratios(dist: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` mask ratios from the named distribution, clipped to RATIO_RANGE."""
    if dist not in MASK_DISTRIBUTIONS:
        raise ValueError(f"unknown mask distribution {dist!r}; choose one of {sorted(MASK_DISTRIBUTIONS)}")
    a, b = MASK_DISTRIBUTIONS[dist]
    return np.clip(rng.beta(a, b, size=n), *RATIO_RANGE)


def synth_grid(ratio: float, grid: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A token-grid mask (bool, `grid` shape) of exactly round(ratio x cells) cells, and its shape parameters."""
    gh, gw = grid
    n = int(min(gh * gw, max(1, round(ratio * gh * gw))))
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    cy, cx = float(rng.uniform(0, gh)), float(rng.uniform(0, gw))
    aspect = float(math.exp(rng.uniform(math.log(0.5), math.log(2.0))))  # width / height
    yy, xx = np.mgrid[:gh, :gw]
    dy = (yy + 0.5 - cy) * math.sqrt(aspect)  # stretch so that the level sets have the drawn aspect ratio
    dx = (xx + 0.5 - cx) / math.sqrt(aspect)
    dist = np.hypot(dx, dy) if kind == "ellipse" else np.maximum(np.abs(dx), np.abs(dy))
    # a tiny seeded jitter breaks distance ties (grid symmetry) without depending on sort internals
    order = np.argsort(dist.ravel() + rng.uniform(0, 1e-6, size=dist.size), kind="stable")
    cells = np.zeros(gh * gw, dtype=bool)
    cells[order[:n]] = True
    return cells.reshape(gh, gw), {"kind": kind, "center": [round(cy, 3), round(cx, 3)], "aspect": round(aspect, 3)}


def grid_to_hex(cells: np.ndarray) -> str:
    return np.packbits(cells.ravel()).tobytes().hex()


def hex_to_grid(data: str, grid: tuple[int, int]) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(data), dtype=np.uint8))[: grid[0] * grid[1]]
    return bits.astype(bool).reshape(grid)


@dataclass
class TraceRequest:
    index: int
    arrival: float  # seconds after the trace start
    template: int  # index into the benchmark's template list
    ratio: float  # drawn mask ratio
    token_ratio: float  # ratio of the synthesised mask on the token grid (what the engine computes)
    shape: dict
    mask_bits: str  # token grid, packed bits as hex (row-major)
    prompt: str
    seed: int

    def token_grid(self, grid: tuple[int, int]) -> np.ndarray:
        return hex_to_grid(self.mask_bits, grid)

    def mask(self, grid: tuple[int, int], cell: int) -> np.ndarray:
        """The pixel mask, (grid x cell) pixels, uint8 0/255 (white = edit)."""
        cells = self.token_grid(grid)
        return np.kron(cells, np.ones((cell, cell), dtype=bool)).astype(np.uint8) * 255


@dataclass
class Trace:
    rate: float
    duration: float
    seed: int
    dist: str
    resolution: tuple[int, int]
    cell: int
    templates: int
    requests: list[TraceRequest] = field(default_factory=list)

    @property
    def grid(self) -> tuple[int, int]:
        return self.resolution[0] // self.cell, self.resolution[1] // self.cell

    def mask(self, request: TraceRequest) -> np.ndarray:
        return request.mask(self.grid, self.cell)

    def to_json(self) -> str:
        data = asdict(self)
        data["beta"] = list(MASK_DISTRIBUTIONS[self.dist])
        data["ratio_range"] = list(RATIO_RANGE)
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Trace":
        data = json.loads(text)
        data.pop("beta", None)
        data.pop("ratio_range", None)
        data["resolution"] = tuple(data["resolution"])
        data["requests"] = [TraceRequest(**r) for r in data["requests"]]
        return cls(**data)


def make_requests(arrivals: np.ndarray, dist: str, rng: np.random.Generator, grid: tuple[int, int],
                  templates: int) -> list[TraceRequest]:
    """One request per arrival time, every random draw from `rng` in a fixed order."""
    ratios = sample_ratios(dist, len(arrivals), rng)
    requests = []
    for i, (t, ratio) in enumerate(zip(arrivals, ratios)):
        cells, shape = synth_grid(float(ratio), grid, rng)
        requests.append(TraceRequest(
            index=i, arrival=round(float(t), 6), template=int(rng.integers(templates)), ratio=round(float(ratio), 6),
            token_ratio=float(cells.mean()), shape=shape, mask_bits=grid_to_hex(cells),
            prompt=PROMPTS[int(rng.integers(len(PROMPTS)))], seed=int(rng.integers(2**31)),
        ))
    return requests


def poisson_trace(rate: float, duration: float, seed: int, dist: str = "production",
                  resolution: tuple[int, int] = (256, 256), cell: int = 16, templates: int = 4) -> Trace:
    """Arrivals of a Poisson process of `rate` req/s over [0, duration), with their requests."""
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate} and {duration}")
    if resolution[0] % cell or resolution[1] % cell:
        raise ValueError(f"resolution {resolution} is not a multiple of the token cell {cell}")
    rng = np.random.default_rng(seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= duration:
            break
        arrivals.append(t)
    trace = Trace(rate, duration, seed, dist, tuple(resolution), cell, templates)
    trace.requests = make_requests(np.asarray(arrivals), dist, rng, trace.grid, templates)
    return trace


def burst(n: int, seed: int, dist: str = "production", resolution: tuple[int, int] = (256, 256), cell: int = 16,
          templates: int = 4) -> Trace:
    """`n` requests all arriving at t=0 (a closed burst, for saturation throughput)."""
    rng = np.random.default_rng(seed)
    trace = Trace(0.0, 0.0, seed, dist, tuple(resolution), cell, templates)
    trace.requests = make_requests(np.zeros(n), dist, rng, trace.grid, templates)
    return trace


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, required=True, help="mean arrivals per second")
    ap.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dist", default="production", choices=sorted(MASK_DISTRIBUTIONS))
    ap.add_argument("--resolution", type=int, default=256, help="square image size in pixels (flux-small: 256)")
    ap.add_argument("--cell", type=int, default=16, help="pixels per token side (VAE factor x patch size)")
    ap.add_argument("--templates", type=int, default=4)
    ap.add_argument("--out", required=True, help="write the trace JSON here")
    args = ap.parse_args(argv)
    trace = poisson_trace(args.rate, args.duration, args.seed, args.dist, (args.resolution, args.resolution),
                          args.cell, args.templates)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(trace.to_json())
    ratios = [r.token_ratio for r in trace.requests]
    print(f"{len(trace.requests)} requests over {args.duration:g} s (rate {args.rate:g}/s), "
          f"mean token ratio {np.mean(ratios) if ratios else float('nan'):.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
