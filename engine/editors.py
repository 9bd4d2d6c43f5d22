"""The Editor of a model's family: Flux and FLUX.1-Fill share `Editor`; a UNet takes `UNetEditor`."""
from __future__ import annotations

from .editor import Editor


def editor_for(model, store, **kwargs) -> Editor:
    """An editor for `model` (an EditModel) on `store`; keyword arguments as Editor's."""
    if model.is_unet:
        from .unet.editor import UNetEditor

        return UNetEditor(model, store, **kwargs)
    return Editor(model, store, **kwargs)
