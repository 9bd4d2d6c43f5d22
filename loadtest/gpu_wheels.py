"""Wheels of the GPU check's Python dependencies for an offline GPU box that brings its own CUDA torch.

    python -m loadtest.gpu_wheels [--dest .whl] [--python-version 3.12] [--list]

Run where the package registry is reachable. It takes the check's top-level dependencies (diffusers,
transformers, tokenizers, safetensors, huggingface_hub, pytest) at the versions this repository pins and tests
with (the ones installed in its venv), adds everything they require, leaves out what the box's own stack owns
(torch and its CUDA libraries, numpy, scipy, pillow, scikit-image...: compiled against each other there, so
they must not be shadowed), and downloads binary wheels for CPython `--python-version` on manylinux x86_64
with `--no-deps`. DEST/requirements.txt lists them; on the box:

    python3 -m venv --system-site-packages /tmp/gpuenv
    /tmp/gpuenv/bin/pip install --no-index --no-deps --find-links .whl -r .whl/requirements.txt

(docs/results/gpu.md has the whole procedure.)
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

TOP = ("diffusers", "transformers", "tokenizers", "safetensors", "huggingface_hub", "pytest")

#: provided by the GPU box's image and built against each other and its torch: never carried
BOX_OWNS = frozenset({
    "torch", "triton", "numpy", "scipy", "pillow", "scikit-image", "scikit-learn", "networkx", "sympy", "mpmath",
    "jinja2", "markupsafe", "imageio", "tifffile", "lazy-loader", "setuptools", "pip", "wheel",
})

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_24_x86_64")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _owned(name: str) -> bool:
    return name in BOX_OWNS or name.startswith(("nvidia-", "cuda-"))


def carried(top=TOP) -> dict[str, str]:
    """{name: version} of the installed closure of `top`, minus what the box owns (environment markers of this
    interpreter; extras not followed)."""
    found: dict[str, str] = {}
    pending = list(top)
    while pending:
        name = normalise(pending.pop())
        if name in found or _owned(name):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as exc:
            raise SystemExit(f"{name} is required but not installed here; run `make install` first") from exc
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                pending.append(req.name)
    return dict(sorted(found.items()))


def download(requirements: dict[str, str], dest: Path, python_version: str) -> list[Path]:
    """pip download of exactly these versions as binary wheels for the box's interpreter and platform."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", *platforms, "-d", str(dest),
           *(f"{name}=={version}" for name, version in requirements.items())]
    subprocess.run(cmd, check=True)
    (dest / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in requirements.items()))
    return sorted(dest.glob("*.whl"))


def _exclude_from_git(dest: Path) -> None:
    """A wheel folder inside the checkout stays out of git (and still travels with the working tree)."""
    root = Path(__file__).resolve().parent.parent
    exclude = root / ".git" / "info" / "exclude"
    try:
        rel = dest.resolve().relative_to(root)
    except ValueError:
        return
    line = f"/{rel.as_posix()}/"
    if not (root / ".git").is_dir():
        return
    exclude.parent.mkdir(exist_ok=True)
    if line not in (exclude.read_text().splitlines() if exclude.exists() else []):
        with exclude.open("a") as fh:
            fh.write(line + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=".whl")
    ap.add_argument("--python-version", default="3.12", help="the GPU box's Python (3.12 at last look)")
    ap.add_argument("--list", action="store_true", help="print what would be carried and stop")
    args = ap.parse_args(argv)
    reqs = carried()
    for name, version in reqs.items():
        print(f"{name}=={version}")
    if args.list:
        return 0
    dest = Path(args.dest)
    wheels = download(reqs, dest, args.python_version)
    _exclude_from_git(dest)
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
