"""A real edit through a running gateway, for `helm test` and after any deploy: exit 0 when it worked, 1 when not.

    python -m instgenie.smoke --address instgenie-gateway:50051 --api-key-file /etc/instgenie/smoke/api-key

It waits until some model has a worker, registers a template from a built-in handwritten digit (resized to the
model's size), edits its right half with a mask, checks that the result decodes at the model's size and that
every pixel outside the mask equals the template's, then deletes the template. Each step prints one line; a
failure prints `smoke test FAILED: <what>` on stderr.

The unmasked pixels are compared exactly by default, which holds for pixel-space models (the digits model):
unmasked latents are pinned to the template's. A model behind a VAE decodes them again, so give it
`--max-pixel-diff` (a per-pixel tolerance, 0..255).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from instgenie.client import Client, InstGenIEError, Model, Unavailable


class SmokeFailure(Exception):
    """A check that did not hold; the message says which."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m instgenie.smoke", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", required=True, help="host:port of the gateway")
    ap.add_argument("--api-key-file", required=True, help="file holding one plain API key of any tenant")
    ap.add_argument("--model", default="", help="model to test (default: the first one a worker serves)")
    ap.add_argument("--template-prompt", default="3", help="prompt of the template (default 3, its digit)")
    ap.add_argument("--prompt", default="8", help="prompt of the edit (default 8)")
    ap.add_argument("--max-pixel-diff", type=int, default=0,
                    help="largest difference allowed between template and result outside the mask (default 0)")
    ap.add_argument("--wait-seconds", type=float, default=300.0,
                    help="how long to wait for a worker to serve a model (default 300)")
    ap.add_argument("--timeout", type=float, default=600.0, help="deadline of template creation and of the edit")
    ap.add_argument("--tls", action="store_true", help="connect with TLS")
    return ap.parse_args(argv)


def say(message: str) -> None:
    print(message, flush=True)


def read_key(path: str) -> str:
    try:
        key = Path(path).read_text().strip()
    except OSError as err:
        raise SmokeFailure(f"cannot read the API key file: {err}") from err
    if not key:
        raise SmokeFailure(f"the API key file {path} is empty")
    return key


def pick_model(client: Client, wanted: str, wait_seconds: float) -> Model:
    """The wanted model (or the first served one) once some worker serves it; workers register after start."""
    end = time.monotonic() + wait_seconds
    while True:
        try:
            models = client.list_models()
        except Unavailable:
            # Right after an install the gateway may not reach the scheduler yet: keep waiting.
            if time.monotonic() >= end:
                raise
            time.sleep(2.0)
            continue
        served = [m for m in models if m.workers > 0 and (not wanted or m.name == wanted)]
        if served:
            return served[0]
        if time.monotonic() >= end:
            known = ", ".join(f"{m.name} ({m.workers} workers)" for m in models) or "none"
            want = f"model {wanted!r}" if wanted else "any model"
            raise SmokeFailure(f"no worker serves {want} after {wait_seconds:g} s; models: {known}")
        time.sleep(2.0)


def template_image(width: int, height: int) -> Image.Image:
    """A handwritten 3 from the digits test split, resized to the model's size (16x16 is the digit itself)."""
    from instgenie.engine.latents import tensor_to_image
    from instgenie.engine.models.digits import load_digits_dataset

    images, labels = load_digits_dataset("test")
    digit = tensor_to_image(images[int(np.flatnonzero(labels.numpy() == 3)[0])])
    return digit if digit.size == (width, height) else digit.resize((width, height), Image.BILINEAR)


def right_half_mask(width: int, height: int) -> np.ndarray:
    """White (edit) on the right half; the boundary falls on every token grid of an even-sized image."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2:] = 255
    return mask


def check_result(template: Image.Image, result_png: bytes, mask: np.ndarray, max_diff: int) -> int:
    """Raises SmokeFailure unless the result decodes at the template's size and matches it outside the mask;
    returns the largest difference found there."""
    try:
        result = Image.open(io.BytesIO(result_png))
        result.load()
    except Exception as err:  # noqa: BLE001 - whatever PIL raises, the result is no image
        raise SmokeFailure(f"the edited image does not decode: {err}") from err
    if result.size != template.size:
        raise SmokeFailure(f"the edited image is {result.size[0]}x{result.size[1]}, "
                           f"the template {template.size[0]}x{template.size[1]}")
    got = np.asarray(result.convert(template.mode), dtype=np.int16)
    want = np.asarray(template, dtype=np.int16)
    keep = mask == 0
    diff = int(np.abs(got[keep] - want[keep]).max()) if keep.any() else 0
    if diff > max_diff:
        changed = int((np.abs(got - want).reshape(*mask.shape, -1).max(axis=-1)[keep] > max_diff).sum())
        raise SmokeFailure(f"{changed} unmasked pixels differ from the template (by up to {diff}; "
                           f"--max-pixel-diff {max_diff})")
    return diff


def run(args: argparse.Namespace) -> None:
    key = read_key(args.api_key_file)
    with Client(args.address, api_key=key, tls=args.tls, edit_timeout=args.timeout,
                create_timeout=args.timeout) as client:
        model = pick_model(client, args.model, args.wait_seconds)
        say(f"ok: gateway {args.address} answers; model {model.name} ({model.width}x{model.height}, "
            f"{model.workers} workers)")
        image = template_image(model.width, model.height)
        template = client.create_template(image, args.template_prompt, name="smoke test", model=model.name,
                                          request_id=f"smoke-{uuid.uuid4().hex}")
        say(f"ok: template {template.template_id} created ({template.steps} steps, cache "
            f"{template.cache_bytes / 1e6:.1f} MB)")
        failure: Exception | None = None
        try:
            mask = right_half_mask(model.width, model.height)
            result = client.edit(template.template_id, mask, args.prompt, seed=1)
            diff = check_result(image, result.image, mask, args.max_pixel_diff)
            say(f"ok: edit {result.request_id} on {result.worker or 'a worker'} in {result.total_seconds:.2f} s; "
                f"{result.mask_ratio:.0%} of the tokens computed; unmasked pixels within {diff} of the template")
        except (SmokeFailure, InstGenIEError) as err:
            failure = err
        # The template is deleted whatever happened, so repeated runs leave nothing behind.
        try:
            client.delete_template(template.template_id)
            say(f"ok: template {template.template_id} deleted")
        except InstGenIEError as err:
            if failure is None:
                raise SmokeFailure(f"template {template.template_id} could not be deleted: {err}") from err
            print(f"note: template {template.template_id} could not be deleted either: {err}", file=sys.stderr)
        if failure is not None:
            raise failure


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (SmokeFailure, InstGenIEError) as err:
        print(f"smoke test FAILED: {err}", file=sys.stderr)
        return 1
    say("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
