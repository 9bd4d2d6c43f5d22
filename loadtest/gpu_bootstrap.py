"""Lets the GPU check run from a bare checkout: `instgenie.engine` importable with nothing of ours installed.

setup.py maps the top-level folders engine/ and services/ into the package `instgenie`; `pip install -e .`
installs that mapping as an import hook. A GPU box has no network and its own torch, so the check runs there
from the working tree with the carried wheels on PYTHONPATH (docs/results/gpu.md) and no install of this
project: this module reproduces the mapping by adding the checkout's root to `instgenie.__path__`. gpu_check
imports it first and hands it to its pytest child as a plugin (`-p loadtest.gpu_bootstrap`), which loads
before any conftest. Where the project is installed it changes nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure_importable() -> bool:
    """True if the mapping had to be added (a bare checkout), False if `instgenie.engine` already imported."""
    try:
        import instgenie.engine  # noqa: F401
        return False
    except ModuleNotFoundError as exc:
        if exc.name not in ("instgenie", "instgenie.engine"):
            raise  # a dependency of the engine is missing: say which
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import instgenie

    if str(ROOT) not in instgenie.__path__:  # instgenie.engine -> ROOT/engine, instgenie.services -> ROOT/services
        instgenie.__path__.append(str(ROOT))
    import instgenie.engine  # noqa: F401,F811 - fails loudly if the mapping did not help
    return True


ensure_importable()
