"""Generated gRPC code is exactly what `make proto` makes from protos/, and the protos follow our conventions."""
from __future__ import annotations

import importlib

import pytest

from instgenie.services.common import protogen

MODULES = ["instgenie.gateway.v1.edit_service_pb2", "instgenie.scheduler.v1.scheduler_service_pb2",
           "instgenie.worker.v1.worker_service_pb2"]


def test_generated_code_is_current_and_untouched(tmp_path):
    written = protogen.generate(tmp_path)
    assert written
    for fresh in written:
        installed = protogen.REPO / fresh.relative_to(tmp_path)
        assert installed.read_bytes() == fresh.read_bytes(), f"{installed} differs from protoc's output: run make proto"


def _screaming(name: str) -> str:
    out = ""
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out += "_"
        out += ch.upper()
    return out


@pytest.mark.parametrize("module", MODULES)
def test_proto_conventions(module):
    """The buf STANDARD rules we follow: versioned package matching the directory, *Service names, a request
    and a response message per RPC named after it, enum zero values *_UNSPECIFIED, enum values prefixed."""
    file = importlib.import_module(module).DESCRIPTOR
    assert file.package.startswith("instgenie.") and file.package.endswith(".v1")
    assert file.name.rsplit("/", 1)[0] == file.package.replace(".", "/")
    assert file.services_by_name
    for service in file.services_by_name.values():
        assert service.name.endswith("Service")
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request", method.full_name
            assert method.output_type.name == f"{method.name}Response", method.full_name
            assert method.input_type.file is file and method.output_type.file is file
    for enum in file.enum_types_by_name.values():
        prefix = _screaming(enum.name) + "_"
        assert enum.values[0].number == 0 and enum.values[0].name == prefix + "UNSPECIFIED", enum.name
        assert all(v.name.startswith(prefix) for v in enum.values), enum.name
