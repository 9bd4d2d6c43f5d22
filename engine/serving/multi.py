"""One engine loop over several models: an Editor facade that routes each request to its template's model."""
from __future__ import annotations

from ..editor import Editor
from ..errors import CacheMismatchError
from ..request import EditResult, RequestState


class MultiEditor:
    """The Editor methods the engine loop calls (prefetch, start, step, finish), over editors of several models.

    The template's manifest names the model that recorded it, so a request goes to that model's editor. The batch
    key starts with the model id, so a step only ever holds one model's requests (step.batch_key) and the loop
    alternates between models as it does between resolutions. All editors must share one template store.
    """

    def __init__(self, editors: list[Editor]):
        if not editors:
            raise ValueError("MultiEditor needs at least one editor")
        self.editors = {e.model.info.model_id: e for e in editors}
        if len(self.editors) != len(editors):
            raise ValueError("two editors serve the same model id")
        self.store = editors[0].store
        if any(e.store is not self.store for e in editors):
            raise ValueError("the editors of a MultiEditor must share one template store")

    def for_template(self, template_id: str) -> Editor:
        manifest = self.store.manifest(template_id)
        editor = self.editors.get(manifest.model_id)
        if editor is None:
            raise CacheMismatchError(f"template {template_id!r} was registered with model {manifest.model_id!r}; "
                                     f"this engine serves {sorted(self.editors)}")
        return editor

    def prefetch(self, template_id: str) -> None:
        self.for_template(template_id).prefetch(template_id)

    def start(self, request) -> RequestState:
        return self.for_template(request.template_id).start(request)

    def step(self, states: list[RequestState], use_cache=None) -> dict[str, str]:
        return self.editors[states[0].manifest.model_id].step(states, use_cache) if states else {}

    def finish(self, state: RequestState) -> EditResult:
        return self.editors[state.manifest.model_id].finish(state)
