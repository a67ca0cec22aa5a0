"""The gRPC face: wire names, status codes, health, cancellation through gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from adapter import errors
from adapter.flow import ModelFlow
from adapter.server import AdapterServer, status_for
from protos.mmesh import model_runtime_pb2 as pb
from protos.mmesh import model_runtime_pb2_grpc as pb_grpc
from tests.adapter.conftest import make_settings, place_model
from tests.adapter.recording_runtime import RecordingRuntime


@pytest.fixture
async def served(
    root: Path,
) -> AsyncIterator[tuple[pb_grpc.ModelRuntimeStub, RecordingRuntime, grpc.aio.Channel]]:
    settings = make_settings(root, adapter_port=0, adapter_host="127.0.0.1", limit_per_model_concurrency=3)
    runtime = RecordingRuntime(settings)
    server = AdapterServer(settings, ModelFlow(settings, runtime, None))
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.ModelRuntimeStub(channel), runtime, channel
    finally:
        await channel.close()
        await server.stop(grace=0)


async def test_status_health_and_method_infos(served, root: Path):
    stub, runtime, channel = served
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service="mmesh.ModelRuntime")
    runtime.ready = False
    status = await stub.runtimeStatus(pb.RuntimeStatusRequest())
    assert status.status == pb.RuntimeStatusResponse.STARTING
    assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    runtime.ready = True
    status = await stub.runtimeStatus(pb.RuntimeStatusRequest())
    assert status.status == pb.RuntimeStatusResponse.READY
    assert status.runtimeVersion == "recording-1.0"
    assert list(status.methodInfos["inference.GRPCInferenceService/ModelInfer"].idInjectionPath) == [1]
    assert status.limitModelConcurrency is True
    assert status.modelLoadingTimeoutMs == 30000
    assert status.defaultModelSizeInBytes == 1000000
    assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING


async def test_load_unload_over_grpc(served, root: Path):
    stub, runtime, _ = served
    path = place_model(root, "m1", 800)
    response = await stub.loadModel(pb.LoadModelRequest(modelId="m1", modelPath=str(path), modelKey="{}"))
    assert response.sizeInBytes == 1000
    assert response.maxConcurrency == 3
    assert (await stub.modelSize(pb.ModelSizeRequest(modelId="m1"))).sizeInBytes == 1000
    await stub.unloadModel(pb.UnloadModelRequest(modelId="m1"))
    assert runtime.loaded == {}
    await stub.unloadModel(pb.UnloadModelRequest(modelId="unknown"))  # NOT_FOUND is success


@pytest.mark.parametrize(
    ("model_id", "key", "code", "fragment"),
    [
        ("a/b", "{}", grpc.StatusCode.INVALID_ARGUMENT, "must not contain '/'"),
        ("..", "{}", grpc.StatusCode.INVALID_ARGUMENT, "not a valid name"),
        ("a\x00b", "{}", grpc.StatusCode.INVALID_ARGUMENT, "control characters"),
        ("ok", "{bad json", grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
        ("ok", '{"storage_params": {"type": 3}}', grpc.StatusCode.INVALID_ARGUMENT, "storage_params.type"),
        ("ok", '{"disk_size_bytes": -1}', grpc.StatusCode.INVALID_ARGUMENT, "disk_size_bytes"),
    ],
)
async def test_bad_input_gets_invalid_argument(served, model_id, key, code, fragment):
    stub, runtime, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.loadModel(pb.LoadModelRequest(modelId=model_id, modelPath="p", modelKey=key))
    assert info.value.code() == code
    assert fragment in info.value.details()
    assert runtime.calls == []


async def test_runtime_error_code_passes_through(served, root: Path):
    stub, runtime, _ = served
    runtime.fail_ids.add("broken")
    path = place_model(root, "broken")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.loadModel(pb.LoadModelRequest(modelId="broken", modelPath=str(path)))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "broken" in info.value.details()
    assert not (root / "_recording_models" / "broken").exists()


async def test_client_cancel_leaves_nothing_loaded(served, root: Path):
    stub, runtime, _ = served
    runtime.load_delay = 0.5
    path = place_model(root, "cancelled")
    call = stub.loadModel(pb.LoadModelRequest(modelId="cancelled", modelPath=str(path)))
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await stub.unloadModel(pb.UnloadModelRequest(modelId="cancelled"))
    for _ in range(50):  # bounded: the cancelled job settles within the load delay
        if not runtime.loaded and runtime.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert runtime.loaded == {}


async def test_model_id_is_bound_on_every_log_line(served, root: Path):
    stub, _, _ = served
    path = place_model(root, "logged")
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await stub.loadModel(pb.LoadModelRequest(modelId="logged", modelPath=str(path)))
    about_load = [entry for entry in logs if entry.get("rpc") == "loadModel" or "model" in entry["event"]]
    assert about_load
    assert all(entry.get("model_id") == "logged" for entry in about_load)


def test_every_error_type_has_a_code():
    assert status_for(errors.StorageNotFound("x"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_for(errors.UnsafePath("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(errors.StorageConfigError("x"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(errors.RuntimeRejected("x", code="RESOURCE_EXHAUSTED"))[0] == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert status_for(errors.DiskFull("x"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, message = status_for(ValueError("secret-ish detail"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret-ish" not in message
