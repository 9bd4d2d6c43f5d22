"""Model fingerprints cover every weight that changes a cache, and hash each file once, not on every start."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from instgenie.engine.editor import Editor
from instgenie.engine.errors import CacheMismatchError
from instgenie.engine.models import fingerprint as fp
from instgenie.engine.models.loader import load_model
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore
from tests.engine.helpers import masks_for, random_image

WEIGHTS = ["transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"]
CONFIGS = ["scheduler/scheduler_config.json", "tokenizer_2/tokenizer.json", "model_index.json"]


@pytest.fixture()
def model_dir(tiny_model, model_root, tmp_path):
    src = model_root / f"{tiny_model.info.model_id}"
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _nudge_last_tensor(path) -> None:
    """Change the last element of the last tensor: beyond any 'first N values' sample of a weight."""
    tensors = load_file(path)
    name = sorted(n for n, t in tensors.items() if t.is_floating_point() and t.numel() > 256)[-1]
    flat = tensors[name].flatten().clone()
    flat[-1] += 1e-3
    tensors[name] = flat.view_as(tensors[name])
    save_file(tensors, path)


@pytest.mark.parametrize("rel", WEIGHTS + CONFIGS)
def test_every_component_file_changes_the_fingerprint(model_dir, rel):
    before = fp.directory_fingerprint(model_dir)
    path = model_dir / rel
    if rel.endswith(".safetensors"):
        _nudge_last_tensor(path)
    else:
        path.write_text(path.read_text() + "\n")
    assert fp.directory_fingerprint(model_dir) != before


def test_pictures_docs_and_hidden_files_do_not_count(model_dir):
    before = fp.directory_fingerprint(model_dir)
    (model_dir / "samples.png").write_bytes(b"png")
    (model_dir / "README.md").write_text("notes")
    (model_dir / ".cache").mkdir()
    (model_dir / ".cache" / "x").write_text("y")
    assert fp.directory_fingerprint(model_dir) == before


def test_file_digests_are_remembered_and_only_changed_files_re_read(model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "fp-cache"
    reads = []
    real = fp.file_sha256
    monkeypatch.setattr(fp, "file_sha256", lambda p: reads.append(p.name) or real(p))
    first = fp.directory_fingerprint(model_dir, cache_dir=cache, cache_min_bytes=0)
    assert len(reads) == len(fp.model_files(model_dir))
    reads.clear()
    assert fp.directory_fingerprint(model_dir, cache_dir=cache, cache_min_bytes=0) == first and reads == []
    vae = model_dir / WEIGHTS[1]
    st = vae.stat()
    _nudge_last_tensor(vae)
    os.utime(vae, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its mtime put back (ctime still moves)
    changed = fp.directory_fingerprint(model_dir, cache_dir=cache, cache_min_bytes=0)
    assert reads == [vae.name] and changed != first
    assert changed == fp.directory_fingerprint(model_dir, cache_dir=tmp_path / "fresh", cache_min_bytes=0)
    (cache / os.listdir(cache)[0]).write_text("{not json")  # a broken sidecar only costs re-hashing
    assert fp.directory_fingerprint(model_dir, cache_dir=cache, cache_min_bytes=0) == changed


def test_small_models_never_write_a_sidecar(model_dir, tmp_path):
    fp.directory_fingerprint(model_dir, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_cache_recorded_by_other_weights_is_refused(model_dir, tmp_path):
    """The stale-cache case: same model id, VAE (or text encoder) changed since registration."""
    model = load_model(model_dir)
    store = TemplateStore(DirectoryBlobStore(tmp_path / "store"))
    res = model.info.resolution
    manifest = Editor(model, store).register_template(random_image(res, 2), "p", steps=2)
    for rel in (WEIGHTS[1], WEIGHTS[2]):
        _nudge_last_tensor(model_dir / rel)
        changed = load_model(model_dir)
        assert changed.info.model_id == model.info.model_id and changed.info.config_hash != model.info.config_hash
        with pytest.raises(CacheMismatchError, match="registered with model"):
            Editor(changed, store).edit(manifest.template_id, masks_for(res)["disc"], "q")
    assert load_model(model_dir, dtype=torch.float64).info.config_hash != changed.info.config_hash  # dtype counts


def test_in_memory_models_hash_every_weight():
    a, b = torch.nn.Linear(300, 2), torch.nn.Linear(300, 2)
    b.load_state_dict(a.state_dict())
    assert fp.modules_fingerprint(a) == fp.modules_fingerprint(b)
    with torch.no_grad():
        b.weight[-1, -1] += 1e-3
    assert fp.modules_fingerprint(a) != fp.modules_fingerprint(b)
    assert fp.combine("x", "float32") != fp.combine("x", "bfloat16")
