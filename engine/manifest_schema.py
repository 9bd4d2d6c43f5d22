"""Schema and checksum verification of template manifests: every field typed and ranged, nothing trusted unchecked.

A manifest decides which cache an edit runs on; a truncated, edited or hand-written one must never become a
silent edit on the wrong cache. Every failure here is CacheIntegrityError naming what is wrong.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import re

from .errors import CacheIntegrityError, InvalidTemplateIdError
from .ids import validate_template_id
from .validation import CACHE_MODES, MAX_STEPS, SEED_MAX, is_int, is_real

FORMAT_VERSION = 2
GUIDANCE_KINDS = ("none", "distilled", "cfg")
DTYPES = ("float32", "float16", "bfloat16", "float64")
BASE_SHARD = "base.safetensors"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def step_shard(step: int) -> str:
    return f"step-{step:04d}.safetensors"


def _positive(v) -> bool:
    return is_int(v) and v >= 1


#: field -> (check, what it must be); `checksum` and `shards` are checked on their own
FIELDS: dict = {
    "template_id": (lambda v: isinstance(v, str), "a template id"),
    "model_id": (lambda v: isinstance(v, str) and 0 < len(v) <= 256, "a non-empty string"),
    "config_hash": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{16,64}", v) is not None,
                    "a hex fingerprint"),
    "resolution": (lambda v: isinstance(v, list) and len(v) == 2 and all(_positive(x) for x in v),
                   "[height, width] in pixels"),
    "steps": (lambda v: is_int(v) and 1 <= v <= MAX_STEPS, f"an integer in [1, {MAX_STEPS}]"),
    "seed": (lambda v: is_int(v) and 0 <= v <= SEED_MAX, "an integer in [0, 2**64 - 1]"),
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "cache_mode": (lambda v: v in CACHE_MODES, f"one of {CACHE_MODES}"),
    "dtype": (lambda v: v in DTYPES, f"one of {DTYPES}"),
    "guidance": (lambda v: v in GUIDANCE_KINDS, f"one of {GUIDANCE_KINDS}"),
    "guidance_scale": (lambda v: is_real(v) and math.isfinite(v), "a finite number"),
    "branches": (lambda v: v in (1, 2) and is_int(v), "1 or 2"),
    "num_blocks": (_positive, "a positive integer"),
    "image_tokens": (_positive, "a positive integer"),
    "text_tokens": (_positive, "a positive integer"),
    "hidden": (_positive, "a positive integer"),
    "scheduler": (lambda v: isinstance(v, dict), "an object"),
    "shards": (lambda v: isinstance(v, dict), "an object"),
    "format_version": (lambda v: v == FORMAT_VERSION and is_int(v), f"{FORMAT_VERSION}"),
    "created_at": (lambda v: is_real(v) and math.isfinite(v) and v >= 0, "a finite time"),
    "image_sha256": (lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None, "a sha256 hex digest"),
    "checksum": (lambda v: isinstance(v, str), "a string"),
}


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def verified_manifest_dict(data: bytes, key: bytes | None = None, template_id: str | None = None) -> dict:
    """The manifest's fields (resolution as a tuple), after parsing, checksum and schema checks."""
    where = f"manifest of template {template_id!r}" if template_id else "template manifest"
    fix = "; re-register the template"

    def bad(why: str) -> CacheIntegrityError:
        return CacheIntegrityError(f"{where} {why}{fix}")

    try:
        d = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise bad(f"is not valid JSON (truncated or corrupt: {exc})") from None
    if not isinstance(d, dict):
        raise bad(f"is a JSON {type(d).__name__}, not an object")
    if d.get("format_version") != FORMAT_VERSION:
        raise bad(f"has format version {d.get('format_version')!r}; this engine reads version {FORMAT_VERSION}")
    missing, unknown = sorted(FIELDS.keys() - d.keys()), sorted(d.keys() - FIELDS.keys())
    if missing or unknown:
        raise bad(f"does not match the schema (missing {missing}, unknown {unknown})")
    _verify_checksum(d, key, bad)
    for name, (check, want) in FIELDS.items():
        try:
            ok = bool(check(d[name]))
        except TypeError:
            ok = False
        if not ok:
            raise bad(f"has an invalid {name!r}: must be {want}, got {d[name]!r:.80}")
    try:
        validate_template_id(d["template_id"])
    except InvalidTemplateIdError as exc:
        raise bad(f"holds an invalid template id ({exc})") from None
    if template_id is not None and d["template_id"] != template_id:
        raise bad(f"names template {d['template_id']!r}: it was copied from another template")
    if (d["branches"] == 2) != (d["guidance"] == "cfg"):
        raise bad(f"has {d['branches']} guidance branches with guidance {d['guidance']!r}")
    _check_shards(d["shards"], d["steps"], bad)
    d["resolution"] = tuple(d["resolution"])
    return d


def _verify_checksum(d: dict, key: bytes | None, bad) -> None:
    stored = d["checksum"]
    body = {k: v for k, v in d.items() if k != "checksum"}
    payload = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    kind, _, digest = stored.partition(":") if isinstance(stored, str) else ("", "", "")
    if key is not None and kind != "hmac-sha256":
        raise bad("is not signed, but this store requires signed manifests")
    if kind == "hmac-sha256":
        if key is None:
            raise bad("is signed, but this store has no signing key to verify it")
        want = hmac.new(key, payload, hashlib.sha256).hexdigest()
    elif kind == "sha256":
        want = hashlib.sha256(payload).hexdigest()
    else:
        raise bad(f"has an unknown checksum {stored!r:.40}")
    if not hmac.compare_digest(want, digest):
        raise bad("does not match its checksum (a field was edited, or the file is corrupt)")


def _check_shards(shards: dict, steps: int, bad) -> None:
    want = {BASE_SHARD} | {step_shard(i) for i in range(steps)}
    if set(shards) != want:
        extra, lost = sorted(set(shards) - want), sorted(want - set(shards))
        raise bad(f"lists the wrong shards for {steps} steps (missing {lost[:4]}, unexpected {extra[:4]})")
    for name, info in shards.items():
        ok = (isinstance(info, dict) and set(info) == {"sha256", "bytes"} and isinstance(info["sha256"], str)
              and _HEX64.fullmatch(info["sha256"]) is not None and _positive(info["bytes"]))
        if not ok:
            raise bad(f"has an invalid entry for shard {name!r}: {info!r:.80}")
