"""Read access to one template's cached activations for one denoising step and one guidance branch."""
from __future__ import annotations

from typing import Protocol

import torch

from ..validation import CACHE_MODES  # noqa: F401 - re-exported

# cache modes: "kv" keeps each block's image K/V (post QK-norm and RoPE, head-major (heads, N, head_dim));
# "y" keeps each block's image-token output (N, hidden)


def tensor_name(mode: str, block: int, part: str = "") -> str:
    """Name of a cached tensor inside a step shard, e.g. `kv.3.k`, `kv.3.v`, `y.3`."""
    return f"{mode}.{block}.{part}" if part else f"{mode}.{block}"


class BlockCache(Protocol):
    """What a forward pass needs from the cache: per block, tensors of one sequence (one request branch)."""

    def kv(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-token K and V of `block`, each (heads, N_img, head_dim): head-major, as attention kernels want."""
        ...

    def y(self, block: int) -> torch.Tensor:
        """Image-token output of `block`, (N_img, hidden)."""
        ...


class StepCache:
    """A BlockCache over a dict of step-shard tensors whose leading dim is the guidance branch."""

    def __init__(self, tensors: dict[str, torch.Tensor], branch: int = 0, device: torch.device | None = None):
        self.tensors = tensors
        self.branch = branch
        self.device = device

    def _get(self, name: str) -> torch.Tensor:
        t = self.tensors[name][self.branch]
        return t if self.device is None else t.to(self.device, non_blocking=True)

    def kv(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._get(tensor_name("kv", block, "k")), self._get(tensor_name("kv", block, "v"))

    def y(self, block: int) -> torch.Tensor:
        return self._get(tensor_name("y", block))
