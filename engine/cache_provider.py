"""Where an edit's per-step cache shards come from: a small in-process memo, or the host-memory tier."""
from __future__ import annotations

from collections import OrderedDict
import threading
from typing import Callable, Protocol

from .template_cache import TemplateManifest, TemplateStore

StepGetter = Callable[[int], dict]


class CacheProvider(Protocol):
    def prefetch(self, manifest: TemplateManifest) -> None:
        """Start bringing the template's shards close, e.g. the moment a request is assigned."""
        ...

    def getter(self, manifest: TemplateManifest) -> StepGetter:
        """step -> that step's shard, waiting only for that step if it is still on its way."""
        ...

    def forget(self, template_id: str) -> None: ...


class MemoProvider:
    """Keeps every step of the few most recently used templates in memory; loads on first use.

    Entries are keyed by template id *and* manifest checksum, so a template deleted and registered again under
    the same id can never be served from the shards of its previous incarnation.
    """

    def __init__(self, store: TemplateStore, templates: int = 4):
        self.store = store
        self.templates = templates
        self._resident: OrderedDict[tuple[str, str], dict[int, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def prefetch(self, manifest: TemplateManifest) -> None:
        return None  # loads lazily; the host tier is the component that prefetches

    def getter(self, manifest: TemplateManifest) -> StepGetter:
        tid = (manifest.template_id, manifest.checksum)
        with self._lock:
            if tid not in self._resident:
                self._resident[tid] = {}
                while len(self._resident) > self.templates:
                    self._resident.popitem(last=False)
            self._resident.move_to_end(tid)
            steps = self._resident[tid]

        def get(step: int) -> dict:
            shard = steps.get(step)
            if shard is None:
                shard = self.store.step(manifest, step)
                steps[step] = shard
            return shard

        return get

    def forget(self, template_id: str) -> None:
        with self._lock:
            for key in [k for k in self._resident if k[0] == template_id]:
                del self._resident[key]


class HostTierProvider:
    """The worker's host-memory tier (an LRU by bytes) in front of the object store.

    `prefetch` queues every step shard of a template on the tier's prefetch pool, in step order; `getter`
    waits for one (template, step) key only, loading it on demand if it was evicted or never prefetched.
    A shard that fails its integrity check raises CacheIntegrityError and is not kept.
    """

    def __init__(self, store: TemplateStore, host_cache, timeout: float | None = 120.0):
        self.store = store
        self.host = host_cache
        self.timeout = timeout

    def _loader(self, manifest: TemplateManifest):
        return lambda key: self.store.step(manifest, key[1])

    def prefetch(self, manifest: TemplateManifest) -> None:
        keys = [(manifest.template_id, step) for step in range(manifest.steps)]
        self.host.prefetch(keys, self._loader(manifest))

    def getter(self, manifest: TemplateManifest) -> StepGetter:
        loader = self._loader(manifest)
        return lambda step: self.host.get((manifest.template_id, step), loader, self.timeout)

    def forget(self, template_id: str) -> None:
        for key in self.host.keys():
            if key[0] == template_id:
                self.host.invalidate(key)
