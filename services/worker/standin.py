"""The mesh benchmark's stand-in engine: the digits model with real pre- and post-processing, but denoising
steps that take no time. It measures what the services add around an edit (`--engine instant`); never use it
to serve images (every edit returns its template)."""
from __future__ import annotations

from instgenie.engine.editor import Editor
from instgenie.engine.models.loader import preset_model


class InstantEditor(Editor):
    def step(self, states, use_cache=None) -> dict[str, str]:
        for state in states:
            state.step_index += 1  # the latents stay the template trajectory's start: no model call
        return {}


def instant_editor(store, cache) -> InstantEditor:
    return InstantEditor(preset_model("digits"), store, cache=cache)
