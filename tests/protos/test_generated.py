"""The committed protos: generated code in sync with the sources, and the wire
contract (names, numbers, types) exactly as ModelMesh and the v2 servers expect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from protos import generate
from protos.inference import grpc_service_pb2 as v2
from protos.mmesh import model_runtime_pb2 as mm

REPO_ROOT = Path(generate.__file__).resolve().parent.parent

# --- drift ---------------------------------------------------------------------------


def test_regenerated_code_matches_committed_files(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert len(written) == 3 * len(generate.PROTO_FILES)
    for path in written:
        relative = path.relative_to(tmp_path)
        committed = REPO_ROOT / relative
        assert committed.is_file(), f"{relative} is not committed: run python -m protos.generate"
        assert path.read_bytes() == committed.read_bytes(), (
            f"{relative} differs from a fresh generation: run python -m protos.generate"
        )


def test_command_line_writes_into_outdir(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "protos.generate", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "protos/mmesh/model_runtime_pb2_grpc.py").is_file()
    assert (tmp_path / "protos/inference/grpc_service_pb2.pyi").is_file()


def test_command_line_rejects_extra_arguments() -> None:
    assert generate.main(["a", "b"]) == 2


def test_generated_imports_need_no_rewriting() -> None:
    for name in ("protos/mmesh/model_runtime_pb2_grpc.py", "protos/inference/grpc_service_pb2_grpc.py"):
        text = (REPO_ROOT / name).read_text()
        package = name.split("/")[1]
        assert f"from protos.{package} import " in text


# --- the mmesh.ModelRuntime contract -------------------------------------------------

T = FieldDescriptor
STRING, UINT64, UINT32, BOOL, ENUM, MESSAGE = (
    T.TYPE_STRING,
    T.TYPE_UINT64,
    T.TYPE_UINT32,
    T.TYPE_BOOL,
    T.TYPE_ENUM,
    T.TYPE_MESSAGE,
)
REPEATED = "repeated"
MAP = "map"
SINGLE = "single"

LOAD_FIELDS = [
    ("modelId", 1, STRING, SINGLE),
    ("modelType", 2, STRING, SINGLE),
    ("modelPath", 3, STRING, SINGLE),
    ("modelKey", 4, STRING, SINGLE),
]

#: message -> [(field, number, type, cardinality)], from section 1 of the contract
MMESH_MESSAGES: dict[str, list[tuple[str, int, int, str]]] = {
    "LoadModelRequest": LOAD_FIELDS,
    "LoadModelResponse": [("sizeInBytes", 1, UINT64, SINGLE), ("maxConcurrency", 2, UINT32, SINGLE)],
    "UnloadModelRequest": [("modelId", 1, STRING, SINGLE)],
    "UnloadModelResponse": [],
    "PredictModelSizeRequest": LOAD_FIELDS,
    "PredictModelSizeResponse": [("sizeInBytes", 1, UINT64, SINGLE)],
    "ModelSizeRequest": [("modelId", 1, STRING, SINGLE)],
    "ModelSizeResponse": [("sizeInBytes", 1, UINT64, SINGLE)],
    "RuntimeStatusRequest": [],
    "RuntimeStatusResponse": [
        ("status", 1, ENUM, SINGLE),
        ("capacityInBytes", 2, UINT64, SINGLE),
        ("maxLoadingConcurrency", 3, UINT32, SINGLE),
        ("modelLoadingTimeoutMs", 4, UINT32, SINGLE),
        ("defaultModelSizeInBytes", 5, UINT64, SINGLE),
        ("runtimeVersion", 6, STRING, SINGLE),
        ("numericRuntimeVersion", 7, UINT64, SINGLE),
        ("methodInfos", 8, MESSAGE, MAP),
        ("limitModelConcurrency", 9, BOOL, SINGLE),
        ("allowAnyMethod", 10, BOOL, SINGLE),
    ],
    "RuntimeStatusResponse.MethodInfo": [("idInjectionPath", 1, UINT32, REPEATED)],
}


def _cardinality(field: FieldDescriptor) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return MAP
    if field.is_repeated:
        return REPEATED
    return SINGLE


def _message(file_descriptor: object, dotted: str) -> Descriptor:
    outer, _, inner = dotted.partition(".")
    descriptor: Descriptor = file_descriptor.message_types_by_name[outer]  # type: ignore[attr-defined]
    if inner:
        descriptor = descriptor.nested_types_by_name[inner]
    return descriptor


def _assert_fields(descriptor: Descriptor, expected: list[tuple[str, int, int, str]]) -> None:
    actual = [(f.name, f.number, f.type, _cardinality(f)) for f in descriptor.fields]
    assert sorted(actual, key=lambda f: f[1]) == sorted(expected, key=lambda f: f[1])


def test_mmesh_package_and_file() -> None:
    assert mm.DESCRIPTOR.package == "mmesh"
    proto = descriptor_pb2.FileDescriptorProto()
    mm.DESCRIPTOR.CopyToProto(proto)
    assert proto.syntax == "proto3"
    assert set(mm.DESCRIPTOR.message_types_by_name) == {m for m in MMESH_MESSAGES if "." not in m}


@pytest.mark.parametrize("message", sorted(MMESH_MESSAGES))
def test_mmesh_message_fields(message: str) -> None:
    _assert_fields(_message(mm.DESCRIPTOR, message), MMESH_MESSAGES[message])


def test_mmesh_status_enum_is_nested_with_its_values() -> None:
    status = mm.RuntimeStatusResponse.DESCRIPTOR.enum_types_by_name["Status"]
    assert {v.name: v.number for v in status.values} == {"STARTING": 0, "READY": 1, "FAILING": 2}
    field = mm.RuntimeStatusResponse.DESCRIPTOR.fields_by_name["status"]
    assert field.enum_type is status
    assert mm.RuntimeStatusResponse.READY == 1


def test_mmesh_method_infos_map_values_are_method_info() -> None:
    field = mm.RuntimeStatusResponse.DESCRIPTOR.fields_by_name["methodInfos"]
    entry = field.message_type
    assert entry.fields_by_name["key"].type == STRING
    assert entry.fields_by_name["value"].message_type is mm.RuntimeStatusResponse.MethodInfo.DESCRIPTOR
    response = mm.RuntimeStatusResponse()
    response.methodInfos["inference.GRPCInferenceService/ModelInfer"].idInjectionPath.extend([1])
    parsed = mm.RuntimeStatusResponse.FromString(response.SerializeToString())
    assert list(parsed.methodInfos["inference.GRPCInferenceService/ModelInfer"].idInjectionPath) == [1]


def test_mmesh_wire_bytes_of_a_load_request() -> None:
    # field 1 (modelId), wire type 2: tag 0x0a; field 4 (modelKey): tag 0x22
    request = mm.LoadModelRequest(modelId="m", modelKey="{}")
    assert request.SerializeToString() == b"\x0a\x01m\x22\x02{}"


MMESH_METHODS = {
    "loadModel": ("LoadModelRequest", "LoadModelResponse"),
    "unloadModel": ("UnloadModelRequest", "UnloadModelResponse"),
    "predictModelSize": ("PredictModelSizeRequest", "PredictModelSizeResponse"),
    "modelSize": ("ModelSizeRequest", "ModelSizeResponse"),
    "runtimeStatus": ("RuntimeStatusRequest", "RuntimeStatusResponse"),
}


def test_mmesh_service_methods_and_paths() -> None:
    service = mm.DESCRIPTOR.services_by_name["ModelRuntime"]
    assert service.full_name == "mmesh.ModelRuntime"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == MMESH_METHODS
    for method in service.methods:
        assert not method.client_streaming and not method.server_streaming
    grpc_source = (REPO_ROOT / "protos/mmesh/model_runtime_pb2_grpc.py").read_text()
    for name in MMESH_METHODS:
        assert f"'/mmesh.ModelRuntime/{name}'" in grpc_source


# --- the inference.GRPCInferenceService subset --------------------------------------

STR, I64, U64, U32, I32, BYTES, F32, F64 = (
    T.TYPE_STRING,
    T.TYPE_INT64,
    T.TYPE_UINT64,
    T.TYPE_UINT32,
    T.TYPE_INT32,
    T.TYPE_BYTES,
    T.TYPE_FLOAT,
    T.TYPE_DOUBLE,
)

TENSOR_HEAD = [("name", 1, STR, SINGLE), ("datatype", 2, STR, SINGLE), ("shape", 3, I64, REPEATED)]

#: the v2 messages the sidecar and its tests rely on, as Triton and MLServer define them
V2_MESSAGES: dict[str, list[tuple[str, int, int, str]]] = {
    "ServerLiveResponse": [("live", 1, BOOL, SINGLE)],
    "ServerReadyResponse": [("ready", 1, BOOL, SINGLE)],
    "ModelReadyRequest": [("name", 1, STR, SINGLE), ("version", 2, STR, SINGLE)],
    "ModelReadyResponse": [("ready", 1, BOOL, SINGLE)],
    "ServerMetadataResponse": [
        ("name", 1, STR, SINGLE),
        ("version", 2, STR, SINGLE),
        ("extensions", 3, STR, REPEATED),
    ],
    "ModelMetadataRequest": [("name", 1, STR, SINGLE), ("version", 2, STR, SINGLE)],
    "ModelMetadataResponse": [
        ("name", 1, STR, SINGLE),
        ("versions", 2, STR, REPEATED),
        ("platform", 3, STR, SINGLE),
        ("inputs", 4, MESSAGE, REPEATED),
        ("outputs", 5, MESSAGE, REPEATED),
    ],
    "ModelMetadataResponse.TensorMetadata": TENSOR_HEAD,
    "InferParameter": [
        ("bool_param", 1, BOOL, SINGLE),
        ("int64_param", 2, I64, SINGLE),
        ("string_param", 3, STR, SINGLE),
        ("double_param", 4, F64, SINGLE),
        ("uint64_param", 5, U64, SINGLE),
    ],
    "InferTensorContents": [
        ("bool_contents", 1, BOOL, REPEATED),
        ("int_contents", 2, I32, REPEATED),
        ("int64_contents", 3, I64, REPEATED),
        ("uint_contents", 4, U32, REPEATED),
        ("uint64_contents", 5, U64, REPEATED),
        ("fp32_contents", 6, F32, REPEATED),
        ("fp64_contents", 7, F64, REPEATED),
        ("bytes_contents", 8, BYTES, REPEATED),
    ],
    "ModelInferRequest": [
        ("model_name", 1, STR, SINGLE),
        ("model_version", 2, STR, SINGLE),
        ("id", 3, STR, SINGLE),
        ("parameters", 4, MESSAGE, MAP),
        ("inputs", 5, MESSAGE, REPEATED),
        ("outputs", 6, MESSAGE, REPEATED),
        ("raw_input_contents", 7, BYTES, REPEATED),
    ],
    "ModelInferRequest.InferInputTensor": [
        *TENSOR_HEAD,
        ("parameters", 4, MESSAGE, MAP),
        ("contents", 5, MESSAGE, SINGLE),
    ],
    "ModelInferRequest.InferRequestedOutputTensor": [
        ("name", 1, STR, SINGLE),
        ("parameters", 2, MESSAGE, MAP),
    ],
    "ModelInferResponse": [
        ("model_name", 1, STR, SINGLE),
        ("model_version", 2, STR, SINGLE),
        ("id", 3, STR, SINGLE),
        ("parameters", 4, MESSAGE, MAP),
        ("outputs", 5, MESSAGE, REPEATED),
        ("raw_output_contents", 6, BYTES, REPEATED),
    ],
    "ModelInferResponse.InferOutputTensor": [
        *TENSOR_HEAD,
        ("parameters", 4, MESSAGE, MAP),
        ("contents", 5, MESSAGE, SINGLE),
    ],
    "ModelRepositoryParameter": [
        ("bool_param", 1, BOOL, SINGLE),
        ("int64_param", 2, I64, SINGLE),
        ("string_param", 3, STR, SINGLE),
        ("bytes_param", 4, BYTES, SINGLE),
    ],
    "RepositoryIndexRequest": [("repository_name", 1, STR, SINGLE), ("ready", 2, BOOL, SINGLE)],
    "RepositoryIndexResponse": [("models", 1, MESSAGE, REPEATED)],
    "RepositoryIndexResponse.ModelIndex": [
        ("name", 1, STR, SINGLE),
        ("version", 2, STR, SINGLE),
        ("state", 3, STR, SINGLE),
        ("reason", 4, STR, SINGLE),
    ],
    "RepositoryModelLoadRequest": [
        ("repository_name", 1, STR, SINGLE),
        ("model_name", 2, STR, SINGLE),
        ("parameters", 3, MESSAGE, MAP),
    ],
    "RepositoryModelUnloadRequest": [
        ("repository_name", 1, STR, SINGLE),
        ("model_name", 2, STR, SINGLE),
        ("parameters", 3, MESSAGE, MAP),
    ],
    "ServerLiveRequest": [],
    "ServerReadyRequest": [],
    "ServerMetadataRequest": [],
    "RepositoryModelLoadResponse": [],
    "RepositoryModelUnloadResponse": [],
}


def test_v2_package() -> None:
    assert v2.DESCRIPTOR.package == "inference"


@pytest.mark.parametrize("message", sorted(V2_MESSAGES))
def test_v2_message_fields(message: str) -> None:
    _assert_fields(_message(v2.DESCRIPTOR, message), V2_MESSAGES[message])


def test_v2_parameter_oneofs() -> None:
    for message in (v2.InferParameter, v2.ModelRepositoryParameter):
        oneof = message.DESCRIPTOR.oneofs_by_name["parameter_choice"]
        assert {f.name for f in oneof.fields} == {f.name for f in message.DESCRIPTOR.fields}


V2_METHODS = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
    "RepositoryIndex": ("RepositoryIndexRequest", "RepositoryIndexResponse"),
    "RepositoryModelLoad": ("RepositoryModelLoadRequest", "RepositoryModelLoadResponse"),
    "RepositoryModelUnload": ("RepositoryModelUnloadRequest", "RepositoryModelUnloadResponse"),
}


def test_v2_service_methods_and_paths() -> None:
    service = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == V2_METHODS
    grpc_source = (REPO_ROOT / "protos/inference/grpc_service_pb2_grpc.py").read_text()
    for name in V2_METHODS:
        assert f"'/inference.GRPCInferenceService/{name}'" in grpc_source


def test_v2_model_name_is_field_one_for_id_injection() -> None:
    # the mesh writes the model id into field 1 of these requests (idInjectionPath [1])
    assert v2.ModelInferRequest.DESCRIPTOR.fields_by_number[1].name == "model_name"
    assert v2.ModelMetadataRequest.DESCRIPTOR.fields_by_number[1].name == "name"
