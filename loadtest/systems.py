"""The four serving systems the benchmark compares, in-process on one model, behind one submit/start/stop API.

  diffusers-static   stock diffusers FluxInpaintPipeline, request-level static batching (the paper's baseline)
  ours-cb-nocache    EngineLoop, step-level continuous batching, path="full" (no mask-aware cache)
  ours-static-cache  EngineLoop(continuous=False), path="sparse" (mask-aware cache, static batching)
  ours               EngineLoop, continuous batching + mask-aware cache

Timing is taken the same way for all: `submitted` when the client hands the request over, `started` when it
starts being served (the baseline: its batch's pipeline call begins; ours: it is admitted to the running batch,
after its pre-processing in the loop's pre pool), `finished` when its image is ready.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from statistics import mean

import numpy as np
import torch
from PIL import Image

from instgenie.engine.editor import Editor
from instgenie.engine.request import EditRequest
from instgenie.engine.serving.loop import EngineLoop

from .trace import Trace, TraceRequest

#: skimage.data photos used as templates (shipped with scikit-image, no download)
TEMPLATE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")

SYSTEMS = {
    "a": "diffusers-static",
    "b": "ours-cb-nocache",
    "c": "ours-static-cache",
    "d": "ours",
}


def template_images(resolution: tuple[int, int], names=TEMPLATE_PHOTOS) -> list[Image.Image]:
    """The skimage photos, centre-cropped to the model's aspect ratio and resized to its resolution."""
    import skimage.data

    h, w = resolution
    images = []
    for name in names:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = min(img.width / w, img.height / h)
        cw, ch = round(w * scale), round(h * scale)
        left, top = (img.width - cw) // 2, (img.height - ch) // 2
        images.append(img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.LANCZOS))
    return images


class Ticket:
    """One submitted request as the benchmark sees it, whichever system serves it."""

    def __init__(self, request: TraceRequest, future: cf.Future | None = None, submitted: float | None = None):
        self.request = request
        self.future = future or cf.Future()
        self.submitted = time.monotonic() if submitted is None else submitted
        self.started: float | None = None
        self.finished: float | None = None
        self.payload = None  # system-specific input prepared at submit time (the baseline's mask image)

    @property
    def queue_seconds(self) -> float | None:
        return None if self.started is None else self.started - self.submitted

    @property
    def latency_seconds(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted


class System(ABC):
    """A serving system: start() before a run, submit() per arrival, stop() after; stats() of that run."""

    name: str

    def __init__(self, trace_shape: Trace, max_batch_size: int):
        self.grid, self.cell = trace_shape.grid, trace_shape.cell
        self.max_batch_size = max_batch_size

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def submit(self, request: TraceRequest) -> Ticket: ...

    @abstractmethod
    def stop(self) -> None:
        """Stop now: whatever is unfinished is abandoned (the caller has already counted it)."""

    @abstractmethod
    def stats(self) -> dict: ...

    def mask(self, request: TraceRequest) -> np.ndarray:
        return request.mask(self.grid, self.cell)


class DiffusersStatic(System):
    """The stock pipeline: whenever idle, one pipeline call for up to max_batch_size waiting requests."""

    name = "diffusers-static"

    def __init__(self, model, images: list[Image.Image], steps: int, trace_shape: Trace, max_batch_size: int = 8):
        super().__init__(trace_shape, max_batch_size)
        self.model, self.images, self.steps = model, images, steps
        self._waiting: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batches: list[int] = []
        self._errors = 0

    def start(self) -> None:
        self._stopping, self._batches, self._errors = False, [], 0
        self._thread = threading.Thread(target=self._work, name="diffusers-static", daemon=True)
        self._thread.start()

    def submit(self, request: TraceRequest) -> Ticket:
        # The mask is built here, on the client's side, as a client would upload it (ours does the same).
        ticket = Ticket(request)
        ticket.payload = Image.fromarray(self.mask(request))  # uint8 2-D: mode L
        with self._cond:
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = [self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))]
            self._run(batch)

    def _run(self, batch: list[Ticket]) -> None:
        started = time.monotonic()
        for t in batch:
            t.started = started
        self._batches.append(len(batch))
        h, w = self.model.info.resolution
        try:
            with torch.inference_mode():
                out = self.model.pipeline(
                    prompt=[t.request.prompt for t in batch],
                    image=[self.images[t.request.template] for t in batch],
                    mask_image=[t.payload for t in batch],
                    height=h, width=w, strength=1.0, num_inference_steps=self.steps,
                    guidance_scale=self.model.info.default_guidance_scale,
                    generator=[torch.Generator("cpu").manual_seed(t.request.seed) for t in batch],
                    max_sequence_length=self.model.text.max_sequence_length, output_type="pil",
                )
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, the worker goes on
            self._errors += 1
            finished = time.monotonic()
            for t in batch:
                t.finished = finished
                t.future.set_exception(exc)
            return
        finished = time.monotonic()
        for t, image in zip(batch, out.images):
            t.finished = finished  # static batching: the whole batch returns together
            t.future.set_result(image)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            abandoned = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for t in abandoned:
            t.future.cancel()
        if self._thread is not None:
            self._thread.join(timeout=120)  # lets the running pipeline call end

    def stats(self) -> dict:
        return {"mean_batch_size": mean(self._batches) if self._batches else None, "batches": len(self._batches),
                "overhead_ms_per_step": None, "steps": len(self._batches) * self.steps, "batch_errors": self._errors}


class EngineSystem(System):
    """Our engine loop on a shared Editor, with the continuous/static switch and the edit path."""

    def __init__(self, name: str, editor: Editor, template_ids: list[str], trace_shape: Trace, *, continuous: bool,
                 path: str, max_batch_size: int = 8):
        super().__init__(trace_shape, max_batch_size)
        self.name, self.editor, self.template_ids = name, editor, template_ids
        self.continuous, self.path = continuous, path
        self.loop: EngineLoop | None = None

    def start(self) -> None:
        # a fresh loop per run, so that its stats cover that run only
        self.loop = EngineLoop(self.editor, max_batch_size=self.max_batch_size, continuous=self.continuous)

    def submit(self, request: TraceRequest) -> Ticket:
        req = EditRequest(template_id=self.template_ids[request.template], mask=self.mask(request),
                          prompt=request.prompt, seed=request.seed, path=self.path)
        handle = self.loop.submit(req)
        ticket = Ticket(request, handle.future, submitted=handle.timing.submitted)

        def copy_timing(_future, ticket=ticket, timing=handle.timing):
            # the loop stamps `finished` before it resolves the future, so it is there by now
            ticket.started, ticket.finished = timing.admitted, timing.finished

        handle.future.add_done_callback(copy_timing)
        return ticket

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop(drain=False, timeout=120)

    def stats(self) -> dict:
        loop = self.loop
        sizes = loop.scheduler.stats.batch_sizes
        steps = loop.stats.steps
        return {"mean_batch_size": mean(sizes) if sizes else None, "steps": steps,
                "overhead_ms_per_step": 1000 * loop.stats.overhead_cpu_seconds / steps if steps else None,
                "overhead_cpu_seconds": loop.stats.overhead_cpu_seconds,
                "step_seconds_mean": loop.stats.step_seconds / steps if steps else None,
                "isolations": loop.stats.isolations}


def register_templates(editor: Editor, images: list[Image.Image], steps: int, names=TEMPLATE_PHOTOS) -> list[str]:
    """Full run once per template photo with its cache recorded; returns the template ids."""
    return [editor.register_template(img, f"a photo: {name}", steps=steps, seed=i).template_id
            for i, (img, name) in enumerate(zip(images, names))]


def build_systems(keys: list[str], model, editor: Editor, images: list[Image.Image], template_ids: list[str],
                  steps: int, trace_shape: Trace, max_batch_size: int) -> dict[str, System]:
    """System key (a-d) -> system, all on the same model and templates."""
    systems: dict[str, System] = {}
    for key in keys:
        if key == "a":
            systems[key] = DiffusersStatic(model, images, steps, trace_shape, max_batch_size)
        elif key in ("b", "c", "d"):
            continuous = key != "c"
            path = "full" if key == "b" else "sparse"
            systems[key] = EngineSystem(SYSTEMS[key], editor, template_ids, trace_shape, continuous=continuous,
                                        path=path, max_batch_size=max_batch_size)
        else:
            raise ValueError(f"unknown system {key!r}; choose from {sorted(SYSTEMS)}")
    return systems
