"""Bad requests to the HTTP front get OpenAI-shaped 4xx errors naming the field, and the gateway keeps serving."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.services.mesh_helpers import digit

from .helpers import call, call_json, openai_mask, png, right_half

pytestmark = pytest.mark.slow

IMAGE = ("image.png", png(digit(3)))
MASK = ("mask.png", openai_mask(right_half()))
GOOD = {"image": IMAGE, "mask": MASK, "prompt": "8"}


def without(name: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != name}


def with_(**changes) -> dict:
    return {**GOOD, **changes}


def opaque_mask() -> bytes:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    return png(rgba, "RGBA")


CASES = [
    # (test id, request fields, status, code, param)
    ("missing prompt", without("prompt"), 400, "missing_required_parameter", "prompt"),
    ("missing image", without("image"), 400, "missing_required_parameter", "image"),
    ("missing mask on an opaque image", without("mask"), 400, "missing_required_parameter", "mask"),
    ("image as a text field", with_(image="not a file"), 400, "invalid_type", "image"),
    ("mask as a text field", with_(mask="0101"), 400, "invalid_type", "mask"),
    ("prompt as a file", with_(prompt=("p.txt", b"8")), 400, "invalid_type", "prompt"),
    ("two images", with_(image=[IMAGE, IMAGE]), 400, "too_many_files", "image"),
    ("n not a number", with_(n="two"), 400, "invalid_type", "n"),
    ("n out of range", with_(n="11"), 400, "invalid_value", "n"),
    ("negative seed", with_(seed="-1"), 400, "invalid_value", "seed"),
    ("seed not an integer", with_(seed="1.5"), 400, "invalid_type", "seed"),
    ("guidance not a number", with_(guidance_scale="lots"), 400, "invalid_type", "guidance_scale"),
    ("unknown response format", with_(response_format="jpeg"), 400, "invalid_value", "response_format"),
    ("unknown output format", with_(output_format="webp"), 400, "invalid_value", "output_format"),
    ("stream not a boolean", with_(stream="maybe"), 400, "invalid_type", "stream"),
    ("stream with n=2", with_(stream="true", n="2"), 400, "invalid_value", "n"),
    ("unknown parameter", with_(sed="1"), 400, "unknown_parameter", "sed"),
    ("malformed size", with_(size="big"), 400, "invalid_value", "size"),
    ("a size nothing serves", with_(size="1024x1024"), 400, "unsupported_size", "size"),
    ("image that is no image", with_(image=("x.png", b"GIF89a not really")), 400, "invalid_image", "image"),
    ("mask of another size", with_(mask=("m.png", openai_mask(np.ones((8, 8), bool)))), 400, "invalid_mask_size",
     "mask"),
    ("mask without alpha", with_(mask=("m.png", png(np.full((16, 16), 255, np.uint8)))), 400, "invalid_mask", "mask"),
    ("mask with no transparent pixel", with_(mask=("m.png", opaque_mask())), 400, "empty_mask", "mask"),
    ("steps the template was not registered with", with_(steps="7"), 400, "invalid_argument", "steps"),
    ("malformed template id", with_(template_id="tpl-nope"), 400, "invalid_argument", "template_id"),
    ("unknown template", with_(template_id="tpl-00000000000000000000"), 404, "template_not_found", "template_id"),
    ("malformed request id", with_(request_id="no spaces please"), 400, "invalid_argument", "request_id"),
    ("prompt the model cannot encode", with_(prompt="eight"), 400, "invalid_prompt", "prompt"),
    ("oversized image", with_(image=("big.png", b"\x89PNG" + bytes(20 * 1024 * 1024))), 413, "image_too_large",
     "image"),
]


@pytest.mark.parametrize("fields,status,code,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_multipart_input_is_an_openai_error(http_url, fields, status, code, param):
    got, headers, body = call_json(http_url, "POST", "/v1/images/edits", fields=fields)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == ("invalid_request_error" if status != 401 else "authentication_error")
    assert error["message"]


def test_bodies_that_are_not_multipart_or_not_authenticated(http_url):
    got, _, body = call_json(http_url, "POST", "/v1/images/edits", body=json.dumps({"prompt": "8"}).encode(),
                             content_type="application/json")
    assert got == 400 and body["error"]["code"] == "invalid_content_type"
    got, _, body = call_json(http_url, "POST", "/v1/images/edits", body=b"--x\r\nbroken",
                             content_type="multipart/form-data; boundary=x")
    assert got == 400 and body["error"]["code"] in ("invalid_multipart", "missing_required_parameter")
    got, headers, body = call_json(http_url, "POST", "/v1/images/edits", tenant=None, fields=GOOD)
    assert got == 401 and body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "missing_api_key" and headers["www-authenticate"].startswith("Bearer")
    got, _, body = call_json(http_url, "POST", "/v1/images/edits", key="Bearer not-a-key-at-all", fields=GOOD)
    assert got == 401 and body["error"]["code"] == "invalid_api_key"
    got, _, body = call_json(http_url, "POST", "/v1/images/edits", key="Basic abc", fields=GOOD)
    assert got == 401 and body["error"]["code"] == "malformed_api_key"


def test_unknown_urls_and_methods_answer_in_the_same_shape(http_url):
    got, _, body = call_json(http_url, "GET", "/v1/nothing-here")
    assert got == 404 and body["error"]["code"] == "unknown_url" and body["error"]["type"] == "invalid_request_error"
    got, _, body = call_json(http_url, "GET", "/v1/images/edits")
    assert got == 405 and body["error"]["code"] == "method_not_allowed"


def test_the_gateway_keeps_serving_after_bad_input(http_url):
    for fields in (without("prompt"), with_(mask=("m.png", b"\x00" * 100)), with_(n="x")):
        assert call(http_url, "POST", "/v1/images/edits", fields=fields)[0] == 400
    assert call(http_url, "GET", "/healthz", tenant=None)[0] == 200
    status, headers, body = call_json(http_url, "POST", "/v1/images/edits", fields=with_(seed="1"))
    assert status == 200 and len(body["data"]) == 1, body
