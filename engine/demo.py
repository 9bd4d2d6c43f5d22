"""Engine demo: register templates, edit them mask-aware, and write the pictures to an output folder.

    python -m instgenie.engine.demo --out out [--model digits|flux-tiny|flux-small|PATH] [--mode kv|y]

With the default trained digits model each template is a real handwritten digit; the edit repaints a region
with another digit as the prompt. Every edit runs twice, cached (mask-aware) and as a full recompute, so the
picture shows what caching changes. A Flux preset (random weights) shows the same pipeline on photos.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .editor import Editor
from .latents import tensor_to_image
from .models.loader import load_model, preset_model
from .template_cache import DirectoryBlobStore, TemplateStore


def _templates(model, count: int):
    """(image, prompt, edit prompt, mask) tuples suited to the model."""
    h, w = model.info.resolution
    mask = np.zeros((h, w), dtype=np.uint8)
    if model.info.extra.get("kind") == "digits":
        from .models.digits import load_digits_dataset

        images, labels = load_digits_dataset("test")
        mask[:, w // 2:] = 255  # repaint the right half
        out = []
        for i in range(count):
            label = int(labels[i])
            out.append((tensor_to_image(images[i]), str(label), str((label + 1) % 10), mask))
        return out
    from skimage import data

    mask[h // 4: h // 2, w // 3: 2 * w // 3] = 255
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return [(Image.fromarray(photos[i % len(photos)]).convert("RGB").resize((w, h)), "a photo",
             "a red apple on a table", mask) for i in range(count)]


def _grid(rows: list[list[Image.Image]], scale: int) -> Image.Image:
    cell_w, cell_h = rows[0][0].size
    grid = Image.new("RGB", (cell_w * len(rows[0]) * scale, cell_h * len(rows) * scale))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((cell_w * scale, cell_h * scale), Image.NEAREST),
                       (c * cell_w * scale, r * cell_h * scale))
    return grid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    ap.add_argument("--model", default="digits", help="digits, a Flux preset name, or a model directory")
    ap.add_argument("--mode", default="kv", choices=["kv", "y"])
    ap.add_argument("--templates", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model) if Path(args.model).is_dir() else preset_model(args.model)
    editor = Editor(model, TemplateStore(DirectoryBlobStore(out / "store")))
    print(f"model {model.info.model_id}: {model.info.resolution[1]}x{model.info.resolution[0]}, "
          f"{model.num_blocks} blocks, guidance {model.info.guidance}")
    rows, report = [], []
    for i, (image, prompt, new_prompt, mask) in enumerate(_templates(model, args.templates)):
        t0 = time.perf_counter()
        manifest = editor.register_template(image, prompt, mode=args.mode, seed=i)
        t_reg = time.perf_counter() - t0
        cached = editor.edit(manifest.template_id, mask, new_prompt, seed=100 + i)
        full = editor.edit(manifest.template_id, mask, new_prompt, seed=100 + i, path="full")
        rows.append([image, Image.fromarray(mask), cached.image, full.image])
        cached.image.save(out / f"edit-{i}-cached.png")
        full.image.save(out / f"edit-{i}-full.png")
        report.append({"template_id": manifest.template_id, "prompt": prompt, "edit_prompt": new_prompt,
                       "mask_ratio": round(cached.mask_ratio, 3), "register_s": round(t_reg, 3),
                       "edit_cached_s": round(cached.seconds, 3), "edit_full_s": round(full.seconds, 3)})
        print(f"template {manifest.template_id} ({prompt!r} -> {new_prompt!r}, mask {cached.mask_ratio:.0%}): "
              f"registered in {t_reg:.2f}s, edit {cached.seconds:.2f}s cached vs {full.seconds:.2f}s full")
    scale = max(1, 128 // model.info.resolution[0])
    _grid(rows, scale).save(out / "demo-grid.png")
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'demo-grid.png'} (columns: template, mask, cached edit, full recompute) and {out}/edit-*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
