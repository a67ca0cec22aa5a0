"""Our TorchServe protos: the wire contract (packages, services, methods, field names,
numbers and types) exactly as TorchServe 0.12 defines it. The generated modules' drift
is checked with every other proto in ``tests/protos/test_generated.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from protos import generate
from protos.torchserve import inference_pb2 as inference
from protos.torchserve import management_pb2 as management

T = FieldDescriptor
STR, I32, BOOL, BYTES, MESSAGE = T.TYPE_STRING, T.TYPE_INT32, T.TYPE_BOOL, T.TYPE_BYTES, T.TYPE_MESSAGE
REPO_ROOT = Path(generate.__file__).resolve().parent.parent

MANAGEMENT_MESSAGES: dict[str, list[tuple[str, int, int]]] = {
    "ManagementResponse": [("msg", 1, STR)],
    "DescribeModelRequest": [("model_name", 1, STR), ("model_version", 2, STR), ("customized", 3, BOOL)],
    "ListModelsRequest": [("limit", 1, I32), ("next_page_token", 2, I32)],
    "RegisterModelRequest": [
        ("batch_size", 1, I32),
        ("handler", 2, STR),
        ("initial_workers", 3, I32),
        ("max_batch_delay", 4, I32),
        ("model_name", 5, STR),
        ("response_timeout", 6, I32),
        ("runtime", 7, STR),
        ("synchronous", 8, BOOL),
        ("url", 9, STR),
        ("s3_sse_kms", 10, BOOL),
        ("startup_timeout", 11, I32),
    ],
    "ScaleWorkerRequest": [
        ("model_name", 1, STR),
        ("model_version", 2, STR),
        ("max_worker", 3, I32),
        ("min_worker", 4, I32),
        ("number_gpu", 5, I32),
        ("synchronous", 6, BOOL),
        ("timeout", 7, I32),
    ],
    "SetDefaultRequest": [("model_name", 1, STR), ("model_version", 2, STR)],
    "UnregisterModelRequest": [("model_name", 1, STR), ("model_version", 2, STR)],
}

MANAGEMENT_METHODS = {
    "DescribeModel": "DescribeModelRequest",
    "ListModels": "ListModelsRequest",
    "RegisterModel": "RegisterModelRequest",
    "ScaleWorker": "ScaleWorkerRequest",
    "SetDefault": "SetDefaultRequest",
    "UnregisterModel": "UnregisterModelRequest",
}


def _fields(descriptor: Any) -> list[tuple[str, int, int]]:
    return sorted(((f.name, f.number, f.type) for f in descriptor.fields), key=lambda f: f[1])


def test_management_package_and_messages() -> None:
    assert management.DESCRIPTOR.package == "org.pytorch.serve.grpc.management"
    assert set(management.DESCRIPTOR.message_types_by_name) == set(MANAGEMENT_MESSAGES)


@pytest.mark.parametrize("message", sorted(MANAGEMENT_MESSAGES))
def test_management_message_fields(message: str) -> None:
    descriptor = management.DESCRIPTOR.message_types_by_name[message]
    assert _fields(descriptor) == MANAGEMENT_MESSAGES[message]
    assert not any(f.is_repeated for f in descriptor.fields)


def test_management_service() -> None:
    service = management.DESCRIPTOR.services_by_name["ManagementAPIsService"]
    assert service.full_name == "org.pytorch.serve.grpc.management.ManagementAPIsService"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {name: (request, "ManagementResponse") for name, request in MANAGEMENT_METHODS.items()}
    source = (REPO_ROOT / "protos/torchserve/management_pb2_grpc.py").read_text()
    for name in MANAGEMENT_METHODS:
        assert f"'/org.pytorch.serve.grpc.management.ManagementAPIsService/{name}'" in source


def test_inference_messages() -> None:
    assert inference.DESCRIPTOR.package == "org.pytorch.serve.grpc.inference"
    request: Any = inference.PredictionsRequest.DESCRIPTOR
    assert _fields(request) == [
        ("model_name", 1, STR),
        ("model_version", 2, STR),
        ("input", 3, MESSAGE),
        ("sequence_id", 4, STR),
    ]
    entry = request.fields_by_name["input"].message_type
    assert entry.GetOptions().map_entry
    assert (entry.fields_by_name["key"].type, entry.fields_by_name["value"].type) == (STR, BYTES)
    response = inference.PredictionResponse.DESCRIPTOR
    assert _fields(response) == [("prediction", 1, BYTES), ("sequence_id", 2, STR), ("status", 3, MESSAGE)]
    assert _fields(inference.TorchServeHealthResponse.DESCRIPTOR) == [("health", 1, STR)]
    # google.rpc.Status, field for field
    status: Any = inference.RpcStatus.DESCRIPTOR
    assert _fields(status) == [("code", 1, I32), ("message", 2, STR), ("details", 3, MESSAGE)]
    assert status.fields_by_name["details"].message_type.full_name == "google.protobuf.Any"


def test_inference_service() -> None:
    service = inference.DESCRIPTOR.services_by_name["InferenceAPIsService"]
    assert service.full_name == "org.pytorch.serve.grpc.inference.InferenceAPIsService"
    shapes = {
        m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    prefix = "org.pytorch.serve.grpc.inference."
    assert shapes == {
        "Ping": ("google.protobuf.Empty", prefix + "TorchServeHealthResponse", False, False),
        "Predictions": (prefix + "PredictionsRequest", prefix + "PredictionResponse", False, False),
        "StreamPredictions": (prefix + "PredictionsRequest", prefix + "PredictionResponse", False, True),
        "StreamPredictions2": (prefix + "PredictionsRequest", prefix + "PredictionResponse", True, True),
    }


def test_model_name_is_field_one_for_id_injection() -> None:
    # the mesh writes the model id into field 1 of Predictions (idInjectionPath [1])
    assert inference.PredictionsRequest.DESCRIPTOR.fields_by_number[1].name == "model_name"
    request = inference.PredictionsRequest(model_name="m")
    assert request.SerializeToString() == b"\x0a\x01m"


def test_generated_modules_are_listed_for_regeneration() -> None:
    assert "protos/torchserve/management.proto" in generate.PROTO_FILES
    assert "protos/torchserve/inference.proto" in generate.PROTO_FILES
    for name in ("management", "inference"):
        text = (REPO_ROOT / f"protos/torchserve/{name}_pb2_grpc.py").read_text()
        assert f"from protos.torchserve import {name}_pb2" in text
