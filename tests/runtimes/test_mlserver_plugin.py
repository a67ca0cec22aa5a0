"""The MLServer plugin against a real MLServer: readiness, version, layout + load,
inference under the model id (gRPC and REST), listing, unload, and the errors."""

from __future__ import annotations

import contextlib
import json
import struct
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from adapter.errors import ModelNotFound, RuntimeRejected, RuntimeUnavailable
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from puller.model_key import ModelKey
from puller.request import LocalModel
from runtimes.kserve_v2 import KServeV2Client
from runtimes.mlserver import MODEL_SETTINGS_FILE, MLServerPlugin
from tests.runtimes.conftest import mlserver_settings
from tests.servers.mlserver import MLServerProcess
from tests.servers.models import IRIS_EXPECTED, IRIS_SAMPLE, make_broken_model
from tests.servers.process import free_port
from tests.servers.venvs import REQUIREMENTS_DIR

pytestmark = pytest.mark.integration

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def local_model(
    model_id: str, path: Path, model_type: str = "sklearn", schema: Path | None = None
) -> LocalModel:
    return LocalModel(
        model_id=model_id,
        path=path,
        disk_size_bytes=sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
        model_type=model_type,
        schema_path=schema,
        model_key=ModelKey(),
    )


def pinned_mlserver_version() -> str:
    for line in (REQUIREMENTS_DIR / "mlserver.txt").read_text().splitlines():
        if line.startswith("mlserver=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError("mlserver is not pinned in tests/servers/requirements/mlserver.txt")


@pytest.fixture
async def inference(mlserver: MLServerProcess) -> AsyncIterator[v2_grpc.GRPCInferenceServiceStub]:
    """A stub of the generated v2 inference client, the way the mesh reaches MLServer."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{mlserver.grpc_port}", options=[("grpc.enable_http_proxy", 0)]
    ) as channel:
        yield v2_grpc.GRPCInferenceServiceStub(channel)


@contextlib.asynccontextmanager
async def loaded(plugin: MLServerPlugin, model: LocalModel) -> AsyncIterator[Path]:
    """Lay out and load ``model``; unload it and remove its view afterwards."""
    view = plugin.layout(model)
    try:
        assert await plugin.load(model.model_id, view, model) is None
        yield view
    finally:
        with contextlib.suppress(ModelNotFound):
            await plugin.unload(model.model_id)
        plugin.remove_view(model.model_id)


def iris_request(model_id: str) -> v2.ModelInferRequest:
    flat = [value for row in IRIS_SAMPLE for value in row]
    tensor = v2.ModelInferRequest.InferInputTensor(
        name="predict",
        datatype="FP64",
        shape=[len(IRIS_SAMPLE), len(IRIS_SAMPLE[0])],
        contents=v2.InferTensorContents(fp64_contents=flat),
    )
    return v2.ModelInferRequest(model_name=model_id, inputs=[tensor])


def int64_output(response: v2.ModelInferResponse) -> list[int]:
    output = response.outputs[0]
    assert output.datatype == "INT64"
    if response.raw_output_contents:
        raw = response.raw_output_contents[0]
        return list(struct.unpack(f"<{len(raw) // 8}q", raw))
    return list(output.contents.int64_contents)


def rest_infer(port: int, model_id: str) -> list[int]:
    body = {
        "inputs": [
            {
                "name": "predict",
                "shape": [len(IRIS_SAMPLE), len(IRIS_SAMPLE[0])],
                "datatype": "FP64",
                "data": [value for row in IRIS_SAMPLE for value in row],
            }
        ]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model_id}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with _DIRECT.open(request, timeout=30) as response:
        payload = json.loads(response.read())
    return [int(v) for v in payload["outputs"][0]["data"]]


# --- no runtime -------------------------------------------------------------------------


async def test_nothing_listening_is_not_ready_and_calls_are_unavailable(tmp_path: Path) -> None:
    plugin = MLServerPlugin(mlserver_settings(tmp_path, free_port()))
    await plugin.start()
    try:
        assert await plugin.is_ready() is False
        assert await plugin.is_alive() is False
        with pytest.raises(RuntimeUnavailable):
            await plugin.runtime_version()
        with pytest.raises(RuntimeUnavailable):
            await plugin.list_models()
        with pytest.raises(RuntimeUnavailable):
            await plugin.unload("some__model")
        model_dir = tmp_path / "some__model" / "model"
        model_dir.mkdir(parents=True)
        model = local_model("some__model", model_dir)
        with pytest.raises(RuntimeUnavailable):
            await plugin.load("some__model", plugin.layout(model), model)
    finally:
        await plugin.close()


async def test_client_before_start_and_after_close_reopens(mlserver: MLServerProcess) -> None:
    client = KServeV2Client(f"127.0.0.1:{mlserver.grpc_port}")
    assert await client.server_ready() is True  # never started: the call opens the channel
    await client.close()
    await client.close()
    assert await client.server_ready() is True
    await client.close()


# --- a running MLServer --------------------------------------------------------------


async def test_ready_and_version(mlserver_plugin: MLServerPlugin) -> None:
    assert await mlserver_plugin.is_ready() is True
    assert await mlserver_plugin.is_alive() is True
    assert await mlserver_plugin.runtime_version() == pinned_mlserver_version()


async def test_load_infer_list_unload(
    mlserver: MLServerProcess,
    mlserver_plugin: MLServerPlugin,
    pulled_sklearn_model: Callable[[str], Path],
    inference: v2_grpc.GRPCInferenceServiceStub,
) -> None:
    model_id = "iris__isvc-00000000a1"
    model = local_model(model_id, pulled_sklearn_model(model_id))
    async with loaded(mlserver_plugin, model):
        assert await mlserver_plugin.client.model_ready(model_id) is True
        response = await inference.ModelInfer(iris_request(model_id), timeout=30)
        assert response.model_name == model_id
        assert int64_output(response) == list(IRIS_EXPECTED)
        assert rest_infer(mlserver.http_port, model_id) == list(IRIS_EXPECTED)
        assert model_id in await mlserver_plugin.list_models()

        await mlserver_plugin.unload(model_id)
        assert model_id not in await mlserver_plugin.list_models()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await inference.ModelInfer(iris_request(model_id), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_own_settings_with_relative_uri_and_schema(
    mlserver_plugin: MLServerPlugin,
    mlserver_root: Path,
    pulled_sklearn_model: Callable[[str], Path],
    inference: v2_grpc.GRPCInferenceServiceStub,
) -> None:
    model_id = "iris__isvc-00000000b2"
    model_dir = pulled_sklearn_model(model_id)
    (model_dir / "weights").mkdir()
    (model_dir / "model.joblib").rename(model_dir / "weights" / "iris.joblib")
    (model_dir / MODEL_SETTINGS_FILE).write_text(
        json.dumps(
            {
                "name": "the-authors-name",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./weights/iris.joblib"},
            }
        )
    )
    schema = mlserver_root / model_id / "_schema.json"
    schema.write_text(
        json.dumps(
            {
                "inputs": [{"name": "measurements", "datatype": "FP64", "shape": [-1, 4]}],
                "outputs": [{"name": "species", "datatype": "INT64", "shape": [-1]}],
            }
        )
    )
    model = local_model(model_id, model_dir, model_type="", schema=schema)
    async with loaded(mlserver_plugin, model):
        metadata = await inference.ModelMetadata(v2.ModelMetadataRequest(name=model_id), timeout=30)
        assert metadata.name == model_id
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("measurements", "FP64", [-1, 4])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("species", "INT64", [-1])]
        response = await inference.ModelInfer(iris_request(model_id), timeout=30)
        assert int64_output(response) == list(IRIS_EXPECTED)
        assert "the-authors-name" not in await mlserver_plugin.client.repository_index()


async def test_unload_of_an_unknown_model_is_model_not_found(mlserver_plugin: MLServerPlugin) -> None:
    with pytest.raises(ModelNotFound):
        await mlserver_plugin.unload("never__loaded-0000000000")


async def test_load_without_a_view_is_model_not_found(
    mlserver_plugin: MLServerPlugin, tmp_path: Path
) -> None:
    model = local_model("no__view-0000000000", tmp_path)
    with pytest.raises(ModelNotFound):
        await mlserver_plugin.load(model.model_id, mlserver_plugin.view_dir(model.model_id), model)


async def test_load_of_a_broken_model_is_rejected_with_the_runtime_code(
    mlserver_plugin: MLServerPlugin, mlserver_root: Path
) -> None:
    model_id = "broken__isvc-00000000c3"
    model = local_model(model_id, make_broken_model(mlserver_root / model_id / "model"))
    view = mlserver_plugin.layout(model)
    try:
        with pytest.raises(RuntimeRejected) as info:
            await mlserver_plugin.load(model_id, view, model)
        assert info.value.code == "INTERNAL"
        assert info.value.message  # MLServer's own description of the failure
        assert model_id not in await mlserver_plugin.list_models()
    finally:
        with contextlib.suppress(ModelNotFound):
            await mlserver_plugin.unload(model_id)
        mlserver_plugin.remove_view(model_id)


async def test_a_removed_view_leaves_the_repository_index(
    mlserver_plugin: MLServerPlugin, pulled_sklearn_model: Callable[[str], Path]
) -> None:
    model_id = "iris__isvc-00000000d4"
    model = local_model(model_id, pulled_sklearn_model(model_id))
    mlserver_plugin.layout(model)
    assert model_id in await mlserver_plugin.client.repository_index()
    assert model_id not in await mlserver_plugin.client.repository_index(ready_only=True)
    mlserver_plugin.remove_view(model_id)
    assert model_id not in await mlserver_plugin.client.repository_index()
