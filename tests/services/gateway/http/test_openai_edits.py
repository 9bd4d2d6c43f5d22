"""The real `openai` package against the gateway's POST /v1/images/edits: masks, template cache, formats, n."""
from __future__ import annotations

import base64
import time
import urllib.request

import numpy as np
import openai
import pytest

from tests.services.mesh_helpers import TENANTS, channel, create_template, digit, stub

from .helpers import call, decode, openai_mask, png, right_half, unique_digit

pytestmark = pytest.mark.slow


def edit(client, image: np.ndarray, mask: bytes | None, prompt: str = "8", **kwargs):
    extra = kwargs.pop("extra_body", {})
    args = {"mask": ("mask.png", mask)} if mask is not None else {}
    return client.images.edit(image=("image.png", png(image)), prompt=prompt, extra_body=extra, **args, **kwargs)


def test_unmasked_pixels_are_the_templates_and_the_second_call_hits_the_template_cache(openai_client):
    image, region = unique_digit(), right_half()
    first = openai_client.images.with_raw_response.edit(
        image=("digit.png", png(image)), mask=("mask.png", openai_mask(region)), prompt="8",
        extra_body={"seed": 7})
    assert first.headers["x-instgenie-template-source"] == "registered"
    body = first.parse()
    report = body.model_extra["instgenie"]
    assert report["template_source"] == "registered" and report["registration_seconds"] > 0
    out = decode(base64.b64decode(body.data[0].b64_json))
    assert out.shape == image.shape
    assert np.array_equal(out[~region], image[~region]), "pixels outside the mask are the template's"
    assert not np.array_equal(out[region], image[region]), "the masked region was edited"
    assert body.size == "16x16" and body.output_format == "png"

    second = edit(openai_client, image, openai_mask(region), extra_body={"seed": 7})
    again = second.model_extra["instgenie"]
    assert again["template_source"] == "content_hash"
    assert again["template_id"] == report["template_id"] and again["registration_seconds"] == 0
    assert again["results"][0]["degraded_reason"] == ""  # computed from the template's cache
    assert again["results"][0]["mask_ratio"] == pytest.approx(0.5)
    # Same template, mask, prompt and seed: the same image.
    assert np.array_equal(decode(base64.b64decode(second.data[0].b64_json)), out)


def test_a_template_registered_over_grpc_is_found_by_its_content(mesh, openai_client):
    image = unique_digit(4)
    with channel(mesh) as ch:
        template_id = create_template(stub(ch), image=image, prompt="4")
    resp = edit(openai_client, image, openai_mask(right_half()), prompt="9")
    report = resp.model_extra["instgenie"]
    assert report["template_source"] == "content_hash" and report["template_id"] == template_id
    # The content index is per tenant: the same picture is unknown to another tenant.
    with openai.OpenAI(base_url=mesh.http_url + "/v1", api_key=TENANTS["beta"], max_retries=0) as beta:
        theirs = edit(beta, image, openai_mask(right_half()), prompt="9").model_extra["instgenie"]
    assert theirs["template_source"] == "registered" and theirs["template_id"] != template_id
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=mesh.http_url + "/v1", api_key=TENANTS["beta"], max_retries=0).images.edit(
            image=("image.png", png(image)), mask=("mask.png", openai_mask(right_half())), prompt="1",
            extra_body={"template_id": template_id})


def test_url_results_download_until_they_expire_and_n_gives_consecutive_seeds(openai_client, http_url):
    image = digit(7)
    resp = edit(openai_client, image, openai_mask(right_half()), prompt="1", n=2, response_format="url",
                extra_body={"seed": 40})
    assert len(resp.data) == 2
    seeds = [r["seed"] for r in resp.model_extra["instgenie"]["results"]]
    assert seeds == [40, 41]
    for item in resp.data:
        assert item.url.startswith(http_url + "/v1/images/results/alpha/") and item.b64_json is None
        assert item.model_extra["expires_at"] > time.time() + 3000
        with urllib.request.urlopen(item.url, timeout=30) as got:  # the link is the capability: no key
            assert got.headers["content-type"] == "image/png"
            picture = decode(got.read())
        assert np.array_equal(picture[~right_half()], image[~right_half()])
    # A link whose expiry was edited names another object: not found.
    path = resp.data[0].url[len(http_url):]
    tampered = path.replace("/alpha/", "/alpha/0").replace(".png", "")
    assert call(http_url, "GET", tampered)[0] == 404
    expired = path.rsplit("/", 1)[0] + "/0000000001-" + path.rsplit("-", 1)[1]
    assert call(http_url, "GET", expired)[0] == 404


def test_size_and_the_image_transparency_as_mask(openai_client):
    image = digit(2)
    # No mask: the image's own fully transparent pixels are the region (OpenAI's rule).
    rgba = np.dstack([image, image, image, np.where(right_half(), 0, 255).astype(np.uint8)])
    resp = openai_client.images.edit(image=("rgba.png", png(rgba, "RGBA")), prompt="5", size="16x16")
    out = decode(base64.b64decode(resp.data[0].b64_json))
    assert out.shape[:2] == (16, 16) and resp.model_extra["instgenie"]["results"][0]["mask_ratio"] == 0.5
    # A bigger image asked for at a served size is resized (mask with nearest neighbour) and edited.
    big = np.kron(image, np.ones((2, 2), dtype=np.uint8))
    region = np.kron(right_half(), np.ones((2, 2), dtype=bool))
    resp = edit(openai_client, big, openai_mask(region), prompt="5", size="16x16")
    assert resp.size == "16x16" and decode(base64.b64decode(resp.data[0].b64_json)).shape[:2] == (16, 16)
    with pytest.raises(openai.BadRequestError) as err:
        edit(openai_client, image, openai_mask(right_half()), size="1024x1024")
    assert err.value.body["param"] == "size" and "16x16" in err.value.body["message"]


def test_template_id_edits_and_a_stream_of_progress_previews_and_the_result(openai_client, http_url):
    from .helpers import events

    first = edit(openai_client, digit(3), openai_mask(right_half()), prompt="3")
    template_id = first.model_extra["instgenie"]["template_id"]
    status, headers, raw = call(http_url, "POST", "/v1/images/edits", fields={
        "template_id": template_id, "mask": ("mask.png", openai_mask(right_half())), "prompt": "8",
        "stream": "true", "partial_images": "3", "seed": "3"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    got = events(raw)
    kinds = [k for k, _ in got]
    assert kinds[0] == "instgenie.template" and got[0][1]["template_source"] == "template_id"
    steps = [d["step"] for k, d in got if k == "instgenie.progress"]
    assert steps == list(range(1, 21)), "one progress event per denoising step"
    partial = [d for k, d in got if k == "image_edit.partial_image"]
    assert [p["partial_image_index"] for p in partial] == [0, 1, 2] and [p["step"] for p in partial] == [5, 10, 15]
    for p in partial:
        preview = decode(base64.b64decode(p["b64_json"]))
        assert np.array_equal(preview[~right_half()], digit(3)[~right_half()])
    assert kinds[-1] == "image_edit.completed"
    done = got[-1][1]
    assert done["type"] == "image_edit.completed" and done["instgenie"]["results"][0]["seed"] == 3
    assert decode(base64.b64decode(done["b64_json"])).shape == (16, 16)
