"""Engine fixtures: small seeded Flux presets saved and re-loaded through from_pretrained, and editors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instgenie.engine.editor import Editor
from instgenie.engine.models.loader import preset_model
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_root):
    """flux-tiny: 128 px, 64 image tokens, 1 dual + 2 single blocks, no guidance embedding."""
    return preset_model("flux-tiny", root=model_root)


@pytest.fixture(scope="session")
def small_model(model_root):
    """flux-small: 256 px, 256 image tokens, 2 + 4 blocks, guidance-distilled like FLUX.1-dev."""
    return preset_model("flux-small", root=model_root)


@pytest.fixture()
def tiny_editor(tiny_model, tmp_path):
    return Editor(tiny_model, TemplateStore(DirectoryBlobStore(tmp_path / "store")))


@pytest.fixture()
def small_editor(small_model, tmp_path):
    return Editor(small_model, TemplateStore(DirectoryBlobStore(tmp_path / "store")))


@pytest.fixture(scope="session")
def fill_model(model_root):
    """flux-fill-tiny: FLUX.1-Fill's input layout (384 channels) on flux-tiny's blocks, guidance-distilled."""
    return preset_model("flux-fill-tiny", root=model_root)


@pytest.fixture()
def fill_editor(fill_model, tmp_path):
    return Editor(fill_model, TemplateStore(DirectoryBlobStore(tmp_path / "store")))


@pytest.fixture(scope="session")
def unet_model(model_root):
    """sd2-inpaint-tiny: a 9-channel SD2-inpainting-shaped UNet (3 levels, 7 transformer blocks), tiny VAE + CLIP."""
    return preset_model("sd2-inpaint-tiny", root=model_root)


@pytest.fixture()
def unet_editor(unet_model, tmp_path):
    from instgenie.engine.unet.editor import UNetEditor

    return UNetEditor(unet_model, TemplateStore(DirectoryBlobStore(tmp_path / "store")))
