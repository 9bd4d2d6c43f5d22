"""The wheels carried to an offline GPU box: the pinned versions, their whole closure, nothing the box owns."""
from __future__ import annotations

import re
from pathlib import Path

from loadtest import gpu_wheels

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    return {gpu_wheels.normalise(n): v for n, v in re.findall(r'"([A-Za-z0-9_.\-]+)==([^"]+)"', text)}


def test_carried_versions_are_the_pinned_ones_and_torch_is_left_to_the_box():
    carried = gpu_wheels.carried()
    pins = _pins()
    for name in gpu_wheels.TOP:
        key = gpu_wheels.normalise(name)
        assert carried[key] == pins[key], key  # exactly what the CPU suite tests with
    assert not {"torch", "numpy", "scipy", "pillow", "triton"} & set(carried)
    assert not [n for n in carried if n.startswith("nvidia-")]


def test_closure_includes_what_the_top_level_packages_require():
    carried = gpu_wheels.carried()
    # diffusers needs importlib_metadata; huggingface_hub its own transfer backend; pytest its plugin manager
    assert {"importlib-metadata", "hf-xet", "pluggy", "iniconfig"} <= set(carried)
    assert list(carried) == sorted(carried)
