"""Manifest integrity: a truncated, corrupt, edited or foreign manifest is a typed error, never a silent edit."""
from __future__ import annotations

import dataclasses
import json

import pytest

from instgenie.engine.editor import Editor
from instgenie.engine.errors import CacheIntegrityError, CacheMismatchError
from instgenie.engine.manifest_schema import FIELDS
from instgenie.engine.request import EditRequest
from instgenie.engine.serving.loop import EngineLoop
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateManifest, TemplateStore, _checksum
from tests.engine.helpers import masks_for, random_image


@pytest.fixture()
def registered(tiny_editor, tmp_path):
    manifest = tiny_editor.register_template(random_image(tiny_editor.model.info.resolution, 4), "p", steps=2)
    path = tmp_path / "store" / "templates" / manifest.template_id / "manifest.json"
    return tiny_editor, manifest, path


def _edit(editor, manifest):
    return editor.edit(manifest.template_id, masks_for(editor.model.info.resolution)["disc"], "q", seed=1)


def _rewrite(path, change, key: bytes | None = None, resign: bool = True):
    """Apply `change` to the stored JSON; with `resign`, recompute the checksum as a careful forger would."""
    d = json.loads(path.read_bytes())
    change(d)
    if resign:
        body = {k: v for k, v in d.items() if k != "checksum"}
        d["checksum"] = _checksum(body, key)
    path.write_text(json.dumps(d))


def test_schema_table_covers_every_manifest_field():
    assert set(FIELDS) == {f.name for f in dataclasses.fields(TemplateManifest)}


def test_a_good_manifest_round_trips(registered):
    editor, manifest, path = registered
    loaded = editor.store.manifest(manifest.template_id)
    assert loaded == manifest and loaded.checksum.startswith("sha256:")
    assert _edit(editor, manifest).steps == 2


BROKEN = {
    "truncated": lambda data: data[: len(data) // 2],
    "invalid json": lambda data: b"{this is not json",
    "empty": lambda data: b"",
    "not utf-8": lambda data: b"\xff\xfe" + data,
    "a json list": lambda data: b"[1, 2, 3]",
    "duplicate key": lambda data: data.replace(b'"steps": 2', b'"steps": 2, "steps": 1', 1),
}


@pytest.mark.parametrize("name", BROKEN)
def test_unparseable_manifests_are_integrity_errors(registered, name):
    editor, manifest, path = registered
    path.write_bytes(BROKEN[name](path.read_bytes()))
    with pytest.raises(CacheIntegrityError, match="re-register the template") as err:
        _edit(editor, manifest)
    assert err.value.code == "CACHE_INTEGRITY" and err.value.grpc_code == "DATA_LOSS"


@pytest.mark.parametrize("field", ["steps", "seed", "prompt", "guidance_scale", "cache_mode", "config_hash",
                                   "image_tokens", "shards"])
def test_one_edited_field_fails_the_checksum(registered, field):
    editor, manifest, path = registered
    edits = {"steps": 1, "seed": 7, "prompt": "other", "guidance_scale": 9.0, "cache_mode": "y",
             "config_hash": "0" * 32, "image_tokens": 1,
             "shards": {**manifest.shards, "step-0001.safetensors": manifest.shards["step-0000.safetensors"]}}
    _rewrite(path, lambda d: d.__setitem__(field, edits[field]), resign=False)
    with pytest.raises(CacheIntegrityError, match="does not match its checksum"):
        _edit(editor, manifest)


@pytest.mark.parametrize("name,change,match", [
    ("missing field", lambda d: d.pop("seed"), r"missing \['seed'\]"),
    ("unknown field", lambda d: d.__setitem__("trust_me", True), r"unknown \['trust_me'\]"),
    ("steps as text", lambda d: d.__setitem__("steps", "2"), "invalid 'steps'"),
    ("fractional steps", lambda d: d.__setitem__("steps", 2.5), "invalid 'steps'"),
    ("bad resolution", lambda d: d.__setitem__("resolution", [128]), "invalid 'resolution'"),
    ("unknown mode", lambda d: d.__setitem__("cache_mode", "z"), "invalid 'cache_mode'"),
    ("nan guidance", lambda d: d.__setitem__("guidance_scale", float("nan")), "invalid 'guidance_scale'"),
    ("steps without shards", lambda d: d.__setitem__("steps", 3), "wrong shards for 3 steps"),
    ("bad shard digest", lambda d: d["shards"]["base.safetensors"].__setitem__("sha256", "zz"), "invalid entry"),
    ("branches vs guidance", lambda d: d.__setitem__("branches", 2), "guidance branches"),
    ("unsafe id", lambda d: d.__setitem__("template_id", "../x"), "invalid template id"),
    ("copied from another id", lambda d: d.__setitem__("template_id", "tpl-other"), "copied from another template"),
    ("old format", lambda d: d.__setitem__("format_version", 1), "format version 1"),
])
def test_re_checksummed_manifests_still_meet_the_schema(registered, name, change, match):
    editor, manifest, path = registered
    _rewrite(path, change)
    with pytest.raises(CacheIntegrityError, match=match):
        editor.store.manifest(manifest.template_id)


def test_a_stale_model_fingerprint_is_a_mismatch_not_an_edit(registered):
    editor, manifest, path = registered
    _rewrite(path, lambda d: d.__setitem__("config_hash", "f" * 32))  # validly checksummed, another model's cache
    with pytest.raises(CacheMismatchError, match="registered with model") as err:
        _edit(editor, manifest)
    assert err.value.code == "CACHE_MISMATCH"


def test_a_broken_manifest_fails_only_its_request_in_the_loop(registered):
    editor, manifest, path = registered
    good = editor.register_template(random_image(editor.model.info.resolution, 5), "g", steps=2)
    path.write_bytes(path.read_bytes()[:100])
    mask = masks_for(editor.model.info.resolution)["disc"]
    loop = EngineLoop(editor)
    try:
        bad = loop.submit(EditRequest(manifest.template_id, mask, "q"))
        ok = loop.submit(EditRequest(good.template_id, mask, "q"))
        with pytest.raises(CacheIntegrityError):
            bad.result(60)
        assert ok.result(60).steps == 2
    finally:
        loop.stop()


def test_signed_stores_refuse_unsigned_forged_or_foreign_manifests(tiny_model, tmp_path):
    key, other = b"k" * 32, b"o" * 32
    blobs = DirectoryBlobStore(tmp_path / "signed")
    editor = Editor(tiny_model, TemplateStore(blobs, signing_key=key))
    manifest = editor.register_template(random_image(tiny_model.info.resolution, 6), "p", steps=2)
    path = tmp_path / "signed" / "templates" / manifest.template_id / "manifest.json"
    assert editor.store.manifest(manifest.template_id).checksum.startswith("hmac-sha256:")
    assert _edit(editor, manifest).steps == 2
    with pytest.raises(CacheIntegrityError, match="no signing key"):
        TemplateStore(blobs).manifest(manifest.template_id)
    with pytest.raises(CacheIntegrityError, match="does not match its checksum"):
        TemplateStore(blobs, signing_key=other).manifest(manifest.template_id)
    signed = path.read_bytes()
    _rewrite(path, lambda d: d.__setitem__("seed", 5))  # a forger without the key can only write plain sha256
    with pytest.raises(CacheIntegrityError, match="not signed"):
        editor.store.manifest(manifest.template_id)
    path.write_bytes(signed)
    _rewrite(path, lambda d: d.__setitem__("seed", 5), key=other)  # or sign with the wrong key
    with pytest.raises(CacheIntegrityError, match="does not match its checksum"):
        editor.store.manifest(manifest.template_id)
    with pytest.raises(ValueError):
        TemplateStore(blobs, signing_key=b"short")
