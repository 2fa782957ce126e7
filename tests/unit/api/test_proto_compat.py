"""Our .proto files are wire compatible with the OIP definitions tritonclient ships.

Compiled to a descriptor set (never imported: see tests/conftest.py) and compared message by
message: every field we declare exists in tritonclient's definition with the same number,
type and label, and every RPC takes and returns the same messages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]  # no types-protobuf
from grpc_tools import protoc  # type: ignore[import-untyped]  # grpcio-tools ships no stubs
from tritonclient.grpc import service_pb2

PROTOS = Path(__file__).resolve().parents[3] / "protos"


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("descriptors") / "oip.pb"
    argv = ["protoc", f"-I{PROTOS}", "--include_imports", f"--descriptor_set_out={out}"]
    code = protoc.main([*argv, str(PROTOS / "gateway/api/v1/inference.proto")])
    assert code == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _messages(fds: descriptor_pb2.FileDescriptorSet):
    def walk(messages, prefix):
        for message in messages:
            name = f"{prefix}.{message.name}"
            yield name, message
            yield from walk(message.nested_type, name)

    for file in fds.file:
        if file.package == "inference":
            yield from walk(file.message_type, file.package)


def test_every_message_field_matches_tritonclient(ours):
    pool = service_pb2.DESCRIPTOR.pool
    checked = 0
    for name, message in _messages(ours):
        if message.options.map_entry:
            continue
        theirs = pool.FindMessageTypeByName(name)
        for field in message.field:
            other = theirs.fields_by_name.get(field.name)
            assert other is not None, f"{name}.{field.name} is not in tritonclient's schema"
            assert (other.number, other.type) == (field.number, field.type), f"{name}.{field.name}"
            checked += 1
    assert checked > 150


def test_every_enum_value_matches_tritonclient(ours):
    pool = service_pb2.DESCRIPTOR.pool
    for name, message in _messages(ours):
        for enum in message.enum_type:
            theirs = pool.FindEnumTypeByName(f"{name}.{enum.name}")
            for value in enum.value:
                assert theirs.values_by_name[value.name].number == value.number
    for file in ours.file:
        for enum in file.enum_type:
            theirs = pool.FindEnumTypeByName(f"{file.package}.{enum.name}")
            for value in enum.value:
                assert theirs.values_by_name[value.name].number == value.number


def test_every_rpc_matches_tritonclient(ours):
    theirs = service_pb2.DESCRIPTOR.pool.FindServiceByName("inference.GRPCInferenceService")
    methods = [m for f in ours.file for s in f.service for m in s.method]
    assert len(methods) == 12
    for method in methods:
        other = theirs.methods_by_name[method.name]
        assert other.input_type.full_name == method.input_type.lstrip(".")
        assert other.output_type.full_name == method.output_type.lstrip(".")
        assert other.client_streaming == method.client_streaming
        assert other.server_streaming == method.server_streaming
