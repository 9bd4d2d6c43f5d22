"""The worker's engine side: model, template store with its host-memory tier, and the step-level engine loop.

Kept apart from the gRPC handlers so that it can be built, inspected and tested without a server. The model
loads on a background thread (`load()`); until it has, the worker answers NOT_SERVING.

Template manifests and base shards (the template's latents, noise and pixels) are memoised in host memory
beside the step shards, so edits of a template this worker already holds go on while the object store is
down; templates it does not hold fail with UNAVAILABLE (or, mid-edit, fall back to full compute).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from instgenie.engine.cache_provider import HostTierProvider
from instgenie.engine.editor import MAX_STEPS, Editor
from instgenie.engine.editors import editor_for
from instgenie.engine.flops import UNetShape
from instgenie.engine.models.loader import load_model, preset_model
from instgenie.engine.serving.loop import EngineLoop
from instgenie.engine.template_cache import TemplateManifest, TemplateStore
from instgenie.engine.tiers.host_cache import HostCache
from instgenie.worker.v1 import worker_service_pb2 as wpb

log = logging.getLogger(__name__)

PRESETS = ("digits", "flux-tiny", "flux-small", "flux-bench", "flux-wide", "flux-fill-tiny", "flux-fill-bench",
           "sd2-inpaint-tiny", "sd2-inpaint-bench")
BASE_SHARD = "base.safetensors"


@dataclass
class WorkerConfig:
    worker_id: str
    #: a preset name (digits, flux-tiny, ...) or a local model directory
    model: str = "digits"
    models_dir: str = "var/models"
    device: str = "cpu"
    max_batch_size: int = 8
    max_tokens_per_step: int | None = None
    pre_workers: int = 2
    post_workers: int = 1
    host_cache_bytes: int = 2 * 1024 ** 3
    #: "real" runs the model; "instant" is the mesh benchmark's stand-in whose steps take no time
    engine: str = "real"
    #: a cost-model profile file (`instgenie profile`) measured for this model and device kind
    profile: str = ""


class MemoTemplateStore(TemplateStore):
    """A TemplateStore that keeps manifests and base shards of recent templates (immutable once committed)."""

    def __init__(self, blobs, templates: int = 256, prefix: str = "templates"):
        super().__init__(blobs, prefix)
        self.templates = templates
        self._memo: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()

    def _remember(self, key, value):
        with self._lock:
            self._memo[key] = value
            self._memo.move_to_end(key)
            while len(self._memo) > 2 * self.templates:
                self._memo.popitem(last=False)
        return value

    def _recall(self, key):
        with self._lock:
            value = self._memo.get(key)
            if value is not None:
                self._memo.move_to_end(key)
            return value

    def manifest(self, template_id: str) -> TemplateManifest:
        return self._recall((template_id, "manifest")) or self._remember((template_id, "manifest"),
                                                                       super().manifest(template_id))

    def shard(self, manifest: TemplateManifest, name: str):
        if name != BASE_SHARD:
            return super().shard(manifest, name)
        key = (manifest.template_id, BASE_SHARD)
        return self._recall(key) or self._remember(key, super().shard(manifest, name))

    def forget(self, template_id: str) -> None:
        with self._lock:
            for key in [k for k in self._memo if k[0] == template_id]:
                del self._memo[key]

    def known_steps(self, template_id: str) -> int | None:
        manifest = self._recall((template_id, "manifest"))
        return manifest.steps if manifest is not None else None


class WorkerRuntime:
    def __init__(self, config: WorkerConfig, blobs):
        self.config = config
        self.blobs = blobs
        self.model = None
        self.editor: Editor | None = None
        self.loop: EngineLoop | None = None
        self.host: HostCache | None = None
        self.store: MemoTemplateStore | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.text_tokens = 0

    # ---------------------------------------------------------------------------------------- load
    def load(self) -> None:
        """Load the model and start the engine loop (blocking; run it off the event loop)."""
        try:
            self.store = MemoTemplateStore(self.blobs)
            self.host = HostCache(self.config.host_cache_bytes, name=f"{self.config.worker_id}-host")
            provider = HostTierProvider(self.store, self.host)
            if self.config.engine == "instant":
                from .standin import instant_editor

                self.editor = instant_editor(self.store, provider)
            else:
                self.model = self._load_model()
                self.editor = editor_for(self.model, self.store, cache=provider)
            self.text_tokens = self._text_tokens()
            self.loop = EngineLoop(self.editor, max_batch_size=self.config.max_batch_size,
                                   max_tokens_per_step=self.config.max_tokens_per_step,
                                   pre_workers=self.config.pre_workers, post_workers=self.config.post_workers)
            self.ready.set()
            log.info("model %s loaded on %s", self.editor.model.info.model_id, self.config.device)
        except BaseException as exc:  # noqa: BLE001 - reported through health and the log
            self.load_error = exc
            log.exception("model load failed")

    def _load_model(self):
        name = self.config.model
        if name in PRESETS:
            return preset_model(name, root=self.config.models_dir, device=self.config.device)
        if not Path(name).is_dir():
            raise FileNotFoundError(f"--model {name!r} is neither a preset {PRESETS} nor a local model directory")
        return load_model(name, device=self.config.device)

    def _text_tokens(self) -> int:
        try:
            return int(self.editor.model.text.encode([""]).prompt_embeds.shape[1])
        except Exception:  # noqa: BLE001 - only the cost model uses it
            return 0

    def close(self) -> None:
        if self.loop is not None:
            self.loop.stop(drain=False, timeout=10.0)
        if self.host is not None:
            self.host.close(wait=False)

    # ---------------------------------------------------------------------------------- describe
    def model_info(self) -> wpb.ModelInfo:
        model = self.editor.model
        info, tr = model.info, model.transformer
        h, w = info.resolution
        scale = model.codec.scale_factor
        element = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
        return wpb.ModelInfo(
            model_id=info.model_id, width=w, height=h, default_steps=info.default_steps, max_steps=MAX_STEPS,
            guidance=info.guidance, default_guidance_scale=info.default_guidance_scale, scale_factor=scale,
            image_tokens=self.editor.image_tokens((h, w)), text_tokens=self.text_tokens,
            hidden=int(getattr(tr, "inner_dim", 0)), dual_blocks=len(getattr(tr, "transformer_blocks", [])),
            single_blocks=len(getattr(tr, "single_transformer_blocks", [])),
            in_channels=int(tr.config.in_channels), out_channels=int(tr.config.out_channels or tr.config.in_channels),
            branches=2 if info.guidance == "cfg" else 1, element_bytes=element, config_hash=info.config_hash,
            cache_modes=list(self.editor.cache_modes), cell=int(self.editor.model.cell), family=info.family,
            unet=self._unet_shape(),
        )

    def _unet_shape(self) -> wpb.UNetShape | None:
        """A UNet's shape for the scheduler's FLOP count; None for a transformer or a UNet the count does not
        model (logged: the scheduler then predicts its steps from the per-step and per-request terms alone)."""
        if self.editor.model.info.family != "unet-inpaint":
            return None
        try:
            u = UNetShape.of(self.editor.model.transformer)
        except ValueError as exc:
            log.warning("the scheduler cannot count this UNet's FLOPs: %s", exc)
            return None
        return wpb.UNetShape(channels=u.channels, layers=u.layers, down_attention=u.down_attention,
                             up_attention=u.up_attention, transformer_layers=u.transformer_layers,
                             mid_attention=u.mid_attention, cross_attention_dim=u.cross_attention_dim,
                             time_embed_dim=u.time_embed_dim)

    def template_tiers(self) -> tuple[list[str], list[str]]:
        """(templates whose every step is in host memory, templates being loaded into it)."""
        steps: dict[str, set[int]] = {}
        for key in self.host.keys():
            if isinstance(key, tuple) and len(key) == 2:
                steps.setdefault(key[0], set()).add(key[1])
        resident, loading = [], []
        for tid, have in steps.items():
            total = self.store.known_steps(tid)
            if total is not None and len(have) >= total:
                resident.append(tid)
            else:
                loading.append(tid)
        return sorted(resident), sorted(loading)

    def profile_id(self) -> str:
        """The profile this worker announces: the `--profile` file's id, if it was measured for this model and
        device kind; "" otherwise (the scheduler then picks one of the same model and device kind, if any)."""
        if not self.config.profile:
            return ""
        from instgenie.services.scheduler.profile import Profile

        try:
            prof = Profile.load(self.config.profile)
        except (OSError, ValueError) as exc:
            log.error("--profile %s cannot be used: %s", self.config.profile, exc)
            return ""
        info = self.editor.model.info
        kind = "cpu" if self.config.device.startswith("cpu") else \
            f"cuda:{torch.cuda.get_device_name(torch.device(self.config.device))}"
        if prof.model_id != info.model_id or (prof.config_hash and prof.config_hash != info.config_hash):
            log.error("--profile %s was measured for model %s, this worker serves %s: not announced",
                      self.config.profile, prof.model_id, info.model_id)
            return ""
        if prof.device_kind != kind:
            log.error("--profile %s was measured on %s, this worker runs on %s: not announced",
                      self.config.profile, prof.device_kind, kind)
            return ""
        return prof.profile_id

    def is_resident(self, template_id: str) -> bool:
        total = self.store.known_steps(template_id)
        return total is not None and all((template_id, s) in self.host for s in range(total))

    def load_report(self, *, draining: bool, registrations: int) -> wpb.WorkerLoad:
        load = wpb.WorkerLoad(draining=draining, registrations=registrations)
        if not self.ready.is_set():
            return load
        snap = self.loop.snapshot()
        load.running.extend(_loads(snap.running))
        load.waiting.extend(_loads(snap.waiting))
        load.preparing = snap.preparing
        load.steps_run = snap.steps
        resident, loading = self.template_tiers()
        load.resident_templates.extend(resident)
        load.loading_templates.extend(loading)
        load.host_cache_bytes = self.host.bytes
        load.host_cache_budget_bytes = self.host.budget_bytes
        load.report_time.GetCurrentTime()
        return load


def _loads(items) -> list[wpb.RequestLoad]:
    return [wpb.RequestLoad(request_id=r.request_id, template_id=r.template_id, steps_done=r.steps_done,
                            total_steps=r.total_steps, tokens=r.tokens) for r in items]
