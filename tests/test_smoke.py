"""`python -m instgenie.smoke` (the chart's `helm test` hook) against the real local mesh, and its pixel check."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from instgenie import smoke
from tests.services.mesh_helpers import TENANTS


@pytest.fixture()
def key_file(tmp_path):
    path = tmp_path / "api-key"
    path.write_text(TENANTS["alpha"] + "\n")
    return path


def templates_of(mesh, tenant: str = "alpha") -> list[str]:
    from instgenie.client import Client

    with Client(mesh.gateway.address, api_key=TENANTS[tenant]) as client:
        return [t.template_id for t in client.iter_templates()]


def test_smoke_passes_against_the_mesh_and_leaves_no_template(mesh, key_file):
    before = templates_of(mesh)
    proc = subprocess.run([sys.executable, "-m", "instgenie.smoke", "--address", mesh.gateway.address,
                           "--api-key-file", str(key_file), "--wait-seconds", "30"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "smoke test passed"
    assert any(line.startswith("ok: edit ") and "within 0 of the template" in line for line in lines), lines
    assert templates_of(mesh) == before


def test_smoke_fails_with_a_clear_message(mesh, key_file, tmp_path, capsys):
    wrong = tmp_path / "wrong-key"
    wrong.write_text("not-a-key-of-anyone")
    assert smoke.main(["--address", mesh.gateway.address, "--api-key-file", str(wrong)]) == 1
    assert "smoke test FAILED: UNAUTHENTICATED" in capsys.readouterr().err

    assert smoke.main(["--address", mesh.gateway.address, "--api-key-file", str(key_file), "--model", "nope",
                       "--wait-seconds", "0"]) == 1
    err = capsys.readouterr().err
    assert "no worker serves model 'nope'" in err and "digits-16px (2 workers)" in err

    assert smoke.main(["--address", mesh.gateway.address, "--api-key-file", str(tmp_path / "missing")]) == 1
    assert "cannot read the API key file" in capsys.readouterr().err


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_check_result_compares_only_unmasked_pixels():
    template = smoke.template_image(16, 16)
    mask = smoke.right_half_mask(16, 16)
    edited = np.asarray(template).copy()
    edited[:, 8:] = 255 - edited[:, 8:]  # anything may change under the mask
    assert smoke.check_result(template, _png(edited), mask, 0) == 0

    edited[3, 2] = (int(edited[3, 2]) + 7) % 256  # one unmasked pixel off by 7
    with pytest.raises(smoke.SmokeFailure, match=r"1 unmasked pixels differ from the template \(by up to 7"):
        smoke.check_result(template, _png(edited), mask, 0)
    assert smoke.check_result(template, _png(edited), mask, 7) == 7

    with pytest.raises(smoke.SmokeFailure, match="is 8x8, the template 16x16"):
        smoke.check_result(template, _png(np.zeros((8, 8), np.uint8)), mask, 0)
    with pytest.raises(smoke.SmokeFailure, match="does not decode"):
        smoke.check_result(template, b"not a png", mask, 0)


def test_template_image_takes_the_model_size():
    assert smoke.template_image(16, 16).size == (16, 16)
    assert smoke.template_image(64, 32).size == (64, 32)
