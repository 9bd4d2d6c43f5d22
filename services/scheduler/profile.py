"""Device profiles: the fitted cost-model constants of one (model, device kind), their fit, and their file format.

`instgenie profile` measures a worker's denoising step over a grid of (batch size, masked tokens, cache mode)
and its cache transfers over a range of sizes, then fits by least squares

    compute  = a * FLOPs(batch) + d * cached-attention FLOPs(batch) + c * requests + b
                                                      seconds per denoising step of a packed batch
    transfer = bytes / bandwidth + latency            object store -> host memory, and host memory -> device

and writes a JSON file. The per-request term c is the issue's `a * FLOPs + b` made honest: the step loop does
per-request work (scheduler step, inpaint blend, cache lookup) that FLOPs do not count, and it dominates on
small models (docs/results/profile.md has both fits). The two-term fit is kept in the profile's details for
comparison. The d term is the surcharge of split KV attention's masked pass over the template's cached keys
(engine/flops.py, CPU workers): a masked kernel over every cached row runs slower per FLOP than the dense work;
`kv_attention` says which KV attention the profiled engine ran, so the scheduler counts FLOPs the same way.
Format v2 adds both; a v1 file loads with d = 0 and "joint" (the FLOP count it was fitted with), under the
same profile id. The scheduler loads profiles (`--profile`) and predicts each worker's time with the one the worker
announces (`WorkerInfo.profile` = `Profile.profile_id`). Pure Python: the scheduler imports it
without torch or numpy.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = "instgenie.profile/v2"
#: files this code reads; v1 has no d term and counted KV attention as one joint key buffer
SCHEMAS = ("instgenie.profile/v1", SCHEMA)


@dataclass(frozen=True)
class LinearFit:
    """y = slope * x + intercept by ordinary least squares, with how well it fits."""

    slope: float
    intercept: float
    r2: float
    points: int
    rmse: float
    #: largest |residual| / observed over the points
    max_rel_residual: float

    def __call__(self, x: float) -> float:
        return self.slope * x + self.intercept

    @classmethod
    def fit(cls, xs: list[float], ys: list[float], *, nonnegative: bool = True) -> "LinearFit":
        """Least squares over (x, y) pairs. With `nonnegative`, a negative intercept (or slope) is pinned to zero
        and the other coefficient refitted: a time cannot be negative at x = 0, and noise must not say so."""
        n = len(xs)
        if n != len(ys) or n < 2:
            raise ValueError(f"a line needs at least 2 points, got {n}")
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:
            raise ValueError("every x is the same: the slope is undetermined")
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        intercept = my - slope * mx
        if nonnegative and intercept < 0:  # through the origin
            slope, intercept = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), 0.0
        if nonnegative and slope < 0:  # no dependence on x at all
            slope, intercept = 0.0, my
        return cls.of(slope, intercept, xs, ys)

    @classmethod
    def of(cls, slope: float, intercept: float, xs: list[float], ys: list[float]) -> "LinearFit":
        """These coefficients, with their R², RMSE and largest relative residual over the points."""
        n = len(xs)
        my = sum(ys) / n
        residuals = [y - (slope * x + intercept) for x, y in zip(xs, ys)]
        ss_res = sum(r * r for r in residuals)
        ss_tot = sum((y - my) ** 2 for y in ys)
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
        rel = max((abs(r) / abs(y) for r, y in zip(residuals, ys) if y), default=0.0)
        return cls(slope, intercept, r2, n, math.sqrt(ss_res / n), rel)


@dataclass(frozen=True)
class Regression:
    """y = sum(coef_i * x_i) by least squares over named regressors (a column of ones gives an intercept)."""

    names: tuple[str, ...]
    coefs: tuple[float, ...]
    r2: float
    points: int
    rmse: float
    max_rel_residual: float

    def __call__(self, row: list[float]) -> float:
        return sum(c * x for c, x in zip(self.coefs, row))

    def coef(self, name: str) -> float:
        return self.coefs[self.names.index(name)]

    @classmethod
    def fit(cls, names: list[str], rows: list[list[float]], ys: list[float]) -> "Regression":
        """Least squares; a coefficient that comes out negative is pinned to zero and the rest refitted (a time
        does not shrink with more FLOPs, requests or steps; noise must not say so)."""
        if len(rows) != len(ys) or len(rows) < len(names):
            raise ValueError(f"{len(names)} coefficients need at least as many points, got {len(rows)}")
        active = list(range(len(names)))
        while True:
            sol = _solve([[r[i] for i in active] for r in rows], ys)
            if sol is None:
                raise ValueError(f"the regressors {[names[i] for i in active]} are linearly dependent over these "
                                 "points; widen the grid")
            negative = [k for k, c in enumerate(sol) if c < 0]
            if not negative:
                break
            del active[min(negative, key=lambda k: sol[k])]
            if not active:
                sol = []
                break
        coefs = [0.0] * len(names)
        for k, i in enumerate(active):
            coefs[i] = sol[k]
        fitted = [sum(c * x for c, x in zip(coefs, r)) for r in rows]
        n, my = len(ys), sum(ys) / len(ys)
        ss_res = sum((y - f) ** 2 for y, f in zip(ys, fitted))
        ss_tot = sum((y - my) ** 2 for y in ys)
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
        rel = max((abs(y - f) / abs(y) for y, f in zip(ys, fitted) if y), default=0.0)
        return cls(tuple(names), tuple(coefs), r2, n, math.sqrt(ss_res / n), rel)


def _solve(rows: list[list[float]], ys: list[float]) -> list[float] | None:
    """Normal equations (X'X) b = X'y by Gaussian elimination with partial pivoting, columns scaled to unit
    norm first (FLOPs are ~1e9, request counts ~1: unscaled, the system is badly conditioned)."""
    k = len(rows[0]) if rows else 0
    scale = [math.sqrt(sum(r[j] ** 2 for r in rows)) or 1.0 for j in range(k)]
    xs = [[r[j] / scale[j] for j in range(k)] for r in rows]
    a = [[sum(x[i] * x[j] for x in xs) for j in range(k)] + [sum(x[i] * y for x, y in zip(xs, ys))]
         for i in range(k)]
    for col in range(k):
        piv = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-12:
            return None
        a[col], a[piv] = a[piv], a[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col])]
    return [a[i][k] / a[i][i] / scale[i] for i in range(k)]


@dataclass(frozen=True)
class Transfer:
    """Moving bytes between two tiers: seconds = nbytes / bandwidth + latency (per object)."""

    bandwidth: float  # bytes per second
    latency: float  # seconds per object
    r2: float = 1.0
    #: how it was obtained, in words ("measured: ...", "modelled: ...")
    source: str = ""

    def seconds(self, nbytes: int, objects: int = 1) -> float:
        if nbytes <= 0:
            return 0.0
        return nbytes / self.bandwidth + max(1, objects) * self.latency

    @classmethod
    def from_fit(cls, fit: LinearFit, source: str) -> "Transfer":
        """From a fit of seconds against bytes (slope = 1 / bandwidth)."""
        if fit.slope <= 0:
            raise ValueError(f"transfer time does not grow with size (slope {fit.slope}); measure larger sizes")
        return cls(1.0 / fit.slope, fit.intercept, fit.r2, source)


@dataclass
class Profile:
    """What one (model, device kind) costs: per-step compute, cache transfers, per-request pre/post-processing."""

    model_id: str
    device_kind: str  # "cpu", "cuda:NVIDIA H800", ...
    #: seconds per step = compute_a * FLOPs(batch) + compute_c * requests in the batch + compute_b
    compute_a: float
    compute_b: float
    compute_r2: float
    store_to_host: Transfer
    #: None: the worker reads caches in host memory in place (CPU), so there is no per-step device transfer
    host_to_device: Transfer | None = None
    #: pre-processing (mask, text encoding, template latents) and post-processing (decode, PNG) per request
    pre_seconds: float = 0.0
    post_seconds: float = 0.0
    compute_c: float = 0.0
    config_hash: str = ""
    #: seconds per FLOP of split KV attention's passes over cached keys, on top of compute_a (format v2)
    compute_d: float = 0.0
    #: how the profiled engine attends in KV mode: "joint" key buffer or "split" (engine/flops.py)
    kv_attention: str = "joint"
    #: everything else worth keeping: measured points and residuals, threads, versions, store, grid
    details: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Changes whenever a constant does: a worker and the scheduler agree on the profile, not just its name."""
        consts = [self.model_id, self.device_kind, self.config_hash, self.compute_a, self.compute_b, self.compute_c,
                  asdict(self.store_to_host), asdict(self.host_to_device) if self.host_to_device else None,
                  self.pre_seconds, self.post_seconds]
        if self.compute_d or self.kv_attention != "joint":  # appended only when set: a v1 file keeps its id
            consts += [self.compute_d, self.kv_attention]
        return hashlib.sha256(json.dumps(consts, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def profile_id(self) -> str:
        """What a worker announces: `<model>@<device kind>#<digest>`."""
        return f"{self.model_id}@{self.device_kind}#{self.digest}"

    @property
    def key(self) -> tuple[str, str]:
        return self.model_id, self.device_kind

    def step_seconds(self, flops: float, requests: int = 1, cached_flops: float = 0.0) -> float:
        """flops: the batch's FLOPs counted with `kv_attention`; cached_flops: its cached-key attention share."""
        return self.compute_a * flops + self.compute_d * cached_flops + self.compute_c * requests + self.compute_b

    # ------------------------------------------------------------------------------------------- files
    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "profile_id": self.profile_id, "model_id": self.model_id,
                "device_kind": self.device_kind, "config_hash": self.config_hash,
                "compute": {"form": "seconds = a * flops + d * cached_attention_flops + c * requests + b",
                            "a": self.compute_a, "b": self.compute_b, "c": self.compute_c, "d": self.compute_d,
                            "kv_attention": self.kv_attention, "r2": self.compute_r2},
                "store_to_host": asdict(self.store_to_host),
                "host_to_device": asdict(self.host_to_device) if self.host_to_device else None,
                "request": {"pre_seconds": self.pre_seconds, "post_seconds": self.post_seconds},
                "details": self.details}

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        if data.get("schema") not in SCHEMAS:
            raise ValueError(f"not a profile (schema {data.get('schema')!r}, expected one of {SCHEMAS})")
        try:
            compute, request = data["compute"], data.get("request", {})
            h2d = data.get("host_to_device")
            profile = cls(
                model_id=data["model_id"], device_kind=data["device_kind"], compute_a=float(compute["a"]),
                compute_b=float(compute["b"]), compute_c=float(compute.get("c", 0.0)),
                compute_r2=float(compute.get("r2", 0.0)),
                store_to_host=Transfer(**data["store_to_host"]),
                host_to_device=Transfer(**h2d) if h2d else None,
                pre_seconds=float(request.get("pre_seconds", 0.0)),
                post_seconds=float(request.get("post_seconds", 0.0)),
                config_hash=data.get("config_hash", ""), details=data.get("details", {}),
                compute_d=float(compute.get("d", 0.0)), kv_attention=str(compute.get("kv_attention", "joint")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed profile: {exc!r}") from None
        if profile.kv_attention not in ("joint", "split"):
            raise ValueError(f"malformed profile: kv_attention {profile.kv_attention!r}")
        constants = (profile.compute_a, profile.compute_b, profile.compute_c, profile.compute_d)
        if min(constants) < 0 or profile.store_to_host.bandwidth <= 0:
            raise ValueError(f"profile {profile.profile_id} has negative or zero constants")
        stated = data.get("profile_id")
        if stated and stated != profile.profile_id:
            raise ValueError(f"profile {stated!r} was edited after it was written (its constants now give "
                             f"{profile.profile_id!r}); measure it again")
        return profile

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def load_profiles(paths: list[str] | str) -> list[Profile]:
    """Profiles from files and directories (every *.json inside); a comma-separated string works too."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p.strip()]
    found: list[Profile] = []
    for entry in paths:
        p = Path(entry.strip())
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"no profile at {p}")
        found += [Profile.load(f) for f in files]
    return found
