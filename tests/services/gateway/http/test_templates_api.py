"""The JSON template API the web page uses: upload with streamed registration progress, list, image, delete;
/v1/models in OpenAI's list shape; health endpoints."""
from __future__ import annotations

import pytest

from .helpers import call, call_json, decode, events, png, unique_digit

pytestmark = pytest.mark.slow


def test_upload_watch_progress_list_image_and_delete(http_url):
    image = unique_digit(8)
    status, _, op = call_json(http_url, "POST", "/v1/templates", fields={
        "image": ("eight.png", png(image)), "prompt": "8", "name": "an eight", "steps": "12"})
    assert status == 202 and op["state"] in ("creating", "ready") and op["total_steps"] == 12
    template_id = op["template_id"]
    status, headers, raw = call(http_url, "GET", f"/v1/templates/{template_id}/events")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    states = [d for kind, d in events(raw) if kind == "operation"]
    assert states[-1]["done"] and states[-1]["state"] == "ready" and states[-1]["steps_done"] == 12
    assert [s["steps_done"] for s in states] == sorted(s["steps_done"] for s in states), "progress only grows"

    status, _, listing = call_json(http_url, "GET", "/v1/templates?page_size=1000")
    mine = [t for t in listing["data"] if t["id"] == template_id]
    assert status == 200 and len(mine) == 1
    assert mine[0]["name"] == "an eight" and mine[0]["state"] == "ready"
    assert (mine[0]["width"], mine[0]["steps"]) == (16, 12)
    status, headers, data = call(http_url, "GET", mine[0]["image_url"])
    assert status == 200 and headers["content-type"] == "image/png" and (decode(data) == image).all()
    # Another tenant sees neither the template nor its image.
    assert call(http_url, "GET", mine[0]["image_url"], tenant="beta")[0] == 404
    assert call(http_url, "GET", f"/v1/templates/{template_id}", tenant="beta")[0] == 404

    # The template is found by content from the OpenAI endpoint, until it is deleted.
    edit = {"image": ("eight.png", png(image)), "mask": ("m.png", _left_transparent()), "prompt": "3"}
    status, headers, _ = call_json(http_url, "POST", "/v1/images/edits", fields=edit)
    assert status == 200 and headers["x-instgenie-template-id"] == template_id
    assert headers["x-instgenie-template-source"] == "content_hash"
    status, _, body = call_json(http_url, "DELETE", f"/v1/templates/{template_id}")
    assert status == 200 and body["deleted"]
    assert call(http_url, "GET", f"/v1/templates/{template_id}")[0] == 404
    assert call(http_url, "GET", mine[0]["image_url"])[0] == 404
    status, headers, _ = call_json(http_url, "POST", "/v1/images/edits", fields=edit)
    assert status == 200 and headers["x-instgenie-template-source"] == "registered"
    assert headers["x-instgenie-template-id"] != template_id


def _left_transparent() -> bytes:
    import numpy as np

    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, :8, 3] = 0
    return png(rgba, "RGBA")


def test_bad_uploads_and_unknown_templates(http_url):
    status, _, body = call_json(http_url, "POST", "/v1/templates", fields={"prompt": "8"})
    assert status == 400 and body["error"]["param"] == "image"
    status, _, body = call_json(http_url, "POST", "/v1/templates", fields={
        "image": ("odd.png", png(unique_digit()[:15, :15])), "prompt": "8"})  # off the model's 2 px grid
    assert status == 400 and body["error"]["param"] == "image" and "15x15" in body["error"]["message"]
    status, _, body = call_json(http_url, "POST", "/v1/templates", fields={
        "image": ("d.png", png(unique_digit())), "cache_mode": "z"})
    assert status == 400 and body["error"]["param"] == "cache_mode"
    status, _, body = call_json(http_url, "GET", "/v1/templates/tpl-00000000000000000000/events")
    assert status == 404 and body["error"]["code"] == "template_not_found"
    assert call_json(http_url, "GET", "/v1/templates", tenant=None)[0] == 401


def test_models_and_health(http_url):
    status, _, body = call_json(http_url, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    digits = [m for m in body["data"] if m["id"] == "digits-16px"]
    assert digits and digits[0]["object"] == "model" and digits[0]["size"] == "16x16" and digits[0]["workers"] >= 1
    assert call_json(http_url, "GET", "/v1/models", tenant=None)[0] == 401
    assert call_json(http_url, "GET", "/healthz", tenant=None)[:3:2] == (200, {"status": "ok"})
    status, _, body = call_json(http_url, "GET", "/readyz", tenant=None)
    assert status == 200 and body["status"] == "ready"
    status, headers, page = call(http_url, "GET", "/web/", tenant=None)
    assert status == 200 and b"mask-canvas" in page and "default-src 'self'" in headers["content-security-policy"]
