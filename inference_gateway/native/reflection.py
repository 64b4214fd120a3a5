"""gRPC server reflection for serve-native's inference port, answered by the frontend from a table written here.

The frontend (frontend.cc) has none of the project's generated code, so it cannot describe a service itself;
its services never change while it runs, so every answer it can give is computed once, here, from the
descriptors the Python stubs carry, as `serve` answers them (grpc_reflection): the file that defines a symbol
with its transitive dependencies, the services listed, no extensions. The frontend adds the request's host and
the request itself (ServerReflectionResponse fields 1 and 2) and looks the rest up by the query:

    list                 list_services
    file:<filename>      file_by_filename
    symbol:<full name>   file_containing_symbol (messages, nested ones, enums, services, methods)
    ext:<message name>   all_extension_numbers_of_type

File (little-endian): u32 n, n x (u32 len, key, u32 len, ServerReflectionResponse bytes without fields 1, 2).
A query the table lacks gets NOT_FOUND in the response, as grpc_reflection answers it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from protos.durable import write_file_atomic

U32 = struct.Struct("<I")


def _closure(f: FileDescriptor, seen: dict[str, FileDescriptor]) -> dict[str, FileDescriptor]:
    seen[f.name] = f
    for dep in f.dependencies:
        if dep.name not in seen:
            _closure(dep, seen)
    return seen


def _messages(types: Iterable[Descriptor]) -> Iterator[Descriptor]:
    for m in types:
        yield m
        yield from _messages(m.nested_types)


def _symbols(f: FileDescriptor) -> Iterator[str]:
    for m in _messages(f.message_types_by_name.values()):
        yield m.full_name
        yield from (e.full_name for e in m.enum_types)
    yield from (e.full_name for e in f.enum_types_by_name.values())
    for s in f.services_by_name.values():
        yield s.full_name
        yield from (m.full_name for m in s.methods)


def answers(service_names: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None) -> dict[str, bytes]:
    """query key -> the serialized ServerReflectionResponse (without host and original request)."""
    pool = pool or descriptor_pool.Default()
    names = sorted(set(service_names))
    out = {"list": rpb.ServerReflectionResponse(list_services_response=rpb.ListServiceResponse(
        service=[rpb.ServiceResponse(name=n) for n in names])).SerializeToString()}
    files: dict[str, FileDescriptor] = {}
    for n in names:
        _closure(pool.FindFileContainingSymbol(n), files)
    for f in files.values():
        protos = []
        for d in _closure(f, {}).values():
            p = descriptor_pb2.FileDescriptorProto()
            d.CopyToProto(p)
            protos.append(p.SerializeToString())
        found = rpb.ServerReflectionResponse(file_descriptor_response=rpb.FileDescriptorResponse(
            file_descriptor_proto=protos)).SerializeToString()
        out[f"file:{f.name}"] = found
        for symbol in _symbols(f):
            out[f"symbol:{symbol}"] = found
        for m in _messages(f.message_types_by_name.values()):
            out[f"ext:{m.full_name}"] = rpb.ServerReflectionResponse(
                all_extension_numbers_response=rpb.ExtensionNumberResponse(base_type_name=m.full_name)
            ).SerializeToString()
    return out


def inference_port_services() -> tuple[str, ...]:
    """What serve-native's inference port serves, as serve's reflection lists them. Loads the Open Inference
    Protocol's stubs (package `inference`, which tritonclient's own stubs clash with in one process), so only
    when called: by the supervisor, which never loads tritonclient."""
    from grpc_health.v1 import health
    from grpc_reflection.v1alpha import reflection

    from inference_gateway.control_plane import SERVICE_NAME
    from protos import open_inference_pb2

    return (SERVICE_NAME, open_inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            health.SERVICE_NAME, reflection.SERVICE_NAME)


def write(path: Path, service_names: Iterable[str]) -> Path:
    """The frontend's --reflection file for `service_names` (atomically)."""
    table = answers(service_names)
    parts = [U32.pack(len(table))]
    for key, value in table.items():
        k = key.encode()
        parts += [U32.pack(len(k)), k, U32.pack(len(value)), value]
    write_file_atomic(path, b"".join(parts))
    return path
