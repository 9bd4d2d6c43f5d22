"""Model fingerprints: one hash over every file that changes a template cache, cheap on every start.

A template cache is only valid for the exact weights that recorded it: transformer, VAE and text encoders
(and tokenizer, scheduler and model configs). The fingerprint hashes the full content of every such file in a
model directory. Hashing tens of gigabytes on every worker start would cost minutes, so each file's digest is
remembered in a small sidecar (in a cache folder, never in the model directory, which may be read-only),
keyed by the file's size, mtime, ctime and inode: a later start re-reads only files that changed. Small models
(under `cache_min_bytes`) are simply re-hashed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: files that never change what a model computes
_SKIP_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".md", ".txt.lock", ".lock")
CACHE_MIN_BYTES = 256 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024


def default_cache_dir() -> Path:
    env = os.environ.get("INSTGENIE_FINGERPRINT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "instgenie" / "fingerprints"


def model_files(root: Path) -> list[Path]:
    """Files under `root` that belong to the model (hidden files and pictures/docs excluded), sorted."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or p.name.lower().endswith(_SKIP_SUFFIXES):
            continue
        if p.is_file():
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime cannot be set back by a user (unlike mtime), so an edited file is always re-hashed
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def directory_fingerprint(root: str | Path, *, cache_dir: str | Path | None = None,
                          cache_min_bytes: int = CACHE_MIN_BYTES) -> str:
    """sha256 over (relative path, size, content sha256) of every model file under `root`."""
    root = Path(root).resolve()
    files = model_files(root)
    stats = {p: p.stat() for p in files}
    use_cache = sum(st.st_size for st in stats.values()) >= cache_min_bytes
    sidecar = Path(cache_dir or default_cache_dir()) / (hashlib.sha256(str(root).encode()).hexdigest()[:32] + ".json")
    known: dict = {}
    if use_cache:
        try:
            known = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            known = {}
        if not isinstance(known, dict):
            known = {}
    h = hashlib.sha256(b"instgenie-model-fingerprint-v1\n")
    fresh: dict[str, dict] = {}
    for p in files:
        rel = p.relative_to(root).as_posix()
        key = _stat_key(stats[p])
        entry = known.get(rel)
        if isinstance(entry, dict) and entry.get("stat") == key and isinstance(entry.get("sha256"), str):
            digest = entry["sha256"]
        else:
            digest = file_sha256(p)
        fresh[rel] = {"stat": key, "sha256": digest}
        h.update(f"{rel}\0{stats[p].st_size}\0{digest}\n".encode())
    if use_cache and fresh != known:
        _write_sidecar(sidecar, fresh)
    return h.hexdigest()


def _write_sidecar(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache folder only costs re-hashing on the next start
        log.info("cannot remember model file digests in %s: %s", path, exc)


def modules_fingerprint(*modules) -> str:
    """sha256 over the config and every weight of in-memory modules (for models built without a directory)."""
    import torch

    h = hashlib.sha256(b"instgenie-module-fingerprint-v1\n")
    for m in modules:
        if m is None:
            continue
        config = getattr(m, "config", None)
        if config is not None:
            h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
        if isinstance(m, torch.nn.Module):
            for name, t in sorted(m.state_dict().items()):
                h.update(name.encode())
                h.update(str(t.dtype).encode())
                h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def combine(weights_digest: str, dtype: str) -> str:
    """The config_hash recorded in manifests: weights digest + the dtype the model runs in."""
    return hashlib.sha256(f"{weights_digest}|{dtype}".encode()).hexdigest()[:32]
