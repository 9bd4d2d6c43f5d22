"""Quality of cached (mask-aware) edits against a full recompute, on the trained digits model.

    python -m loadtest.quality_report --json out/quality.json [--templates 100] [--modes kv,y]

Templates are real handwritten test digits. Each is edited with masks of several sizes, once asking for the
template's own label and once for a different label, both with the cache (sparse path) and with a full
recompute of every token at every step (same noise, same blend). Reported per cell: PSNR and SSIM of cached vs
full inside the mask, and how often a digit classifier (an SVC trained on real digits) reads the requested
label, for full and for cached. Edits run batched through the engine's packed step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from instgenie.engine.editor import Editor
from instgenie.engine.latents import tensor_to_image
from instgenie.engine.models.digits import classify, load_digits_dataset
from instgenie.engine.models.loader import preset_model
from instgenie.engine.request import EditRequest
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore


def masks(resolution: tuple[int, int]) -> dict[str, np.ndarray]:
    """Token-aligned boxes covering about 10 %, 25 % and 50 % of the image, placed over the digit."""
    h, w = resolution
    out = {}
    for name, (mh, mw) in {"r0.10": (h // 4, h // 2 - 2), "r0.25": (h // 2, w // 2), "r0.50": (h, w // 2)}.items():
        m = np.zeros((h, w), dtype=np.uint8)
        top, left = (h - mh) // 2, w - mw - (w - mw) // 2
        m[top:top + mh, left:left + mw] = 255
        out[name] = m
    return out


def run_batch(editor: Editor, requests: list[EditRequest], batch: int) -> list:
    results = []
    for i in range(0, len(requests), batch):
        states = [editor.start(r) for r in requests[i:i + batch]]
        while not states[0].done:
            editor.step(states)
        results += [editor.finish(s) for s in states]
    return results


def region_metrics(cached: np.ndarray, full: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    sel = mask > 0
    mse = float(np.mean((cached[sel].astype(np.float64) - full[sel]) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
    _, ssim_map = structural_similarity(cached, full, data_range=255, full=True, win_size=5)
    return psnr, float(ssim_map[sel].mean())


def evaluate(editor: Editor, images, labels, mode: str, batch: int) -> list[dict]:
    manifests = [editor.register_template(tensor_to_image(img), str(int(lab)), mode=mode, seed=i)
                 for i, (img, lab) in enumerate(zip(images, labels))]
    rows = []
    for mask_name, mask in masks(editor.model.info.resolution).items():
        for kind in ("same", "new"):
            wanted = [int(lab) if kind == "same" else (int(lab) + 1) % 10 for lab in labels]
            reqs = {path: [EditRequest(m.template_id, mask, str(w), seed=1000 + i, path=path)
                           for i, (m, w) in enumerate(zip(manifests, wanted))] for path in ("sparse", "full")}
            cached = run_batch(editor, reqs["sparse"], batch)
            full = run_batch(editor, reqs["full"], batch)
            psnr, ssim = zip(*[region_metrics(np.asarray(c.image), np.asarray(f.image), mask)
                               for c, f in zip(cached, full)])

            def agreement(results):
                imgs = torch.stack([torch.from_numpy(np.asarray(r.image, dtype=np.float32) / 127.5 - 1)[None]
                                    for r in results])
                return float(np.mean(classify(imgs) == np.array(wanted)))

            finite = [p for p in psnr if np.isfinite(p)]
            rows.append({
                "mode": mode, "mask": mask_name, "mask_ratio": float(cached[0].mask_ratio), "prompt": kind,
                "templates": len(manifests), "psnr_db": float(np.mean(finite)) if finite else float("inf"),
                "psnr_identical": len(psnr) - len(finite), "ssim": float(np.mean(ssim)),
                "label_agreement_full": agreement(full), "label_agreement_cached": agreement(cached),
            })
            print(f"{mode} {mask_name} {kind}: done", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | mask (token ratio) | prompt | PSNR cached vs full (masked px) | SSIM (masked px) "
             "| label agreement full | label agreement cached |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['mask']} ({r['mask_ratio']:.2f}) | {r['prompt']} label | "
                     f"{r['psnr_db']:.1f} dB | {r['ssim']:.3f} | {r['label_agreement_full']:.1%} | "
                     f"{r['label_agreement_cached']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--templates", type=int, default=100)
    ap.add_argument("--modes", default="kv,y")
    ap.add_argument("--batch", type=int, default=25, help="edits packed per step")
    ap.add_argument("--store", default="var/quality-store")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    start = time.time()
    model = preset_model("digits")
    editor = Editor(model, TemplateStore(DirectoryBlobStore(args.store)), resident_templates=args.templates + 1)
    images, labels = load_digits_dataset("test")
    images, labels = images[: args.templates], labels[: args.templates]
    rows = []
    for mode in args.modes.split(","):
        rows += evaluate(editor, images, labels, mode, args.batch)
    table = markdown(rows)
    print(f"digits model, {len(labels)} test digits as templates, {model.info.default_steps} steps, "
          f"CFG {model.info.default_guidance_scale}\n")
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "seconds": time.time() - start}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
