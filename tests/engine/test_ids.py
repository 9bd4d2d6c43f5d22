"""Template and request ids: one safe character set, checked before an id reaches a store key."""
from __future__ import annotations

import re

import pytest

from instgenie.engine.errors import InvalidRequestIdError, InvalidTemplateIdError
from instgenie.engine.ids import ID_PATTERN, validate_request_id, validate_template_id
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore

GOOD = ["a", "tpl-0123456789abcdef", "A.b_c-d", "9", "x" * 128, "edit-17", "a..b"]
BAD = ["", ".", "..", "../x", "a/b", "/abs", "-lead", "_lead", ".lead", "x" * 129, "a b", "a\x00", "a\n",
       "t\u00e9", "a\\b", "a:b", "a%2Fb"]


@pytest.mark.parametrize("value", GOOD)
def test_safe_ids_pass_unchanged(value):
    assert validate_template_id(value) == value and validate_request_id(value) == value
    assert re.fullmatch(ID_PATTERN, value)


@pytest.mark.parametrize("value", BAD + [None, 7, b"bytes"])
def test_unsafe_ids_are_typed_errors_naming_their_field(value):
    with pytest.raises(InvalidTemplateIdError) as err:
        validate_template_id(value)
    assert err.value.field == "template_id" and err.value.code == "INVALID_TEMPLATE_ID"
    with pytest.raises(InvalidRequestIdError) as err:
        validate_request_id(value, field="edit.request_id")
    assert err.value.field == "edit.request_id" and err.value.code == "INVALID_REQUEST_ID"


def test_the_store_refuses_unsafe_ids_before_touching_the_blob_store(tmp_path):
    touched = []

    class Spy(DirectoryBlobStore):
        def get(self, key):
            touched.append(key)
            return super().get(key)

        def exists(self, key):
            touched.append(key)
            return super().exists(key)

    store = TemplateStore(Spy(tmp_path / "blobs"))
    (tmp_path / "secret.json").write_text("{}")
    for call in (store.manifest, store.exists, store.delete):
        with pytest.raises(InvalidTemplateIdError):
            call("../secret.json")
    assert touched == []
