"""The Triton plugin against a real Triton 2.51 (CPU, python backend): readiness,
version, layout + load, inference under the model id through Triton's own ModelInfer,
listing, the awaited unload, reload, two models at once, the runtime's errors with
their codes, and the purge before the first READY through the flow."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from adapter.errors import LoadTimeout, ModelNotFound, RuntimeRejected, RuntimeUnavailable
from adapter.flow import ModelFlow
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from puller.model_key import ModelKey
from puller.request import LocalModel
from runtimes.triton import ACTIVE_STATES, TritonPlugin
from tests.runtimes.triton.conftest import triton_settings
from tests.servers.process import free_port
from tests.servers.triton import TritonProcess
from tests.servers.triton_models import (
    AUTHORS_NAME,
    EXPECTED,
    SCHEMA,
    bare_model,
    broken_model,
    configured_model,
    fp32_output,
    infer_request,
)

pytestmark = pytest.mark.integration

#: the version the pinned nvidia-pytriton wheel ships
TRITON_VERSION = "2.51.0"


@contextlib.asynccontextmanager
async def loaded(plugin: TritonPlugin, model: LocalModel) -> AsyncIterator[Path]:
    """Lay out and load ``model``; unload it and remove its view afterwards."""
    view = await asyncio.to_thread(plugin.layout, model)
    try:
        assert await plugin.load(model.model_id, view, model) is None
        yield view
    finally:
        with contextlib.suppress(ModelNotFound):
            await plugin.unload(model.model_id)
        await asyncio.to_thread(plugin.remove_view, model.model_id)


async def infer(
    inference: v2_grpc.GRPCInferenceServiceStub, model_id: str, input_name: str = "INPUT0"
) -> list[float]:
    response = await inference.ModelInfer(
        infer_request(model_id, input_name), metadata=[("mm-model-id", model_id)], timeout=30
    )
    assert response.model_name == model_id
    return fp32_output(response)


# --- no runtime -------------------------------------------------------------------------


async def test_nothing_listening_is_not_ready_and_calls_are_unavailable(tmp_path: Path) -> None:
    plugin = TritonPlugin(triton_settings(tmp_path, free_port()))
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
        model = configured_model(tmp_path, "some__model")
        with pytest.raises(RuntimeUnavailable):
            await plugin.load(model.model_id, plugin.layout(model), model)
    finally:
        await plugin.close()


# --- a running Triton ----------------------------------------------------------------


async def test_ready_version_and_method_infos(triton_plugin: TritonPlugin) -> None:
    assert await triton_plugin.is_ready() is True
    assert await triton_plugin.is_alive() is True
    assert await triton_plugin.runtime_version() == TRITON_VERSION
    assert dict(triton_plugin.method_infos()) == {
        "inference.GRPCInferenceService/ModelInfer": (1,),
        "inference.GRPCInferenceService/ModelMetadata": (1,),
    }


async def test_configured_model_load_infer_list_unload(
    triton_plugin: TritonPlugin, triton_root: Path, inference: v2_grpc.GRPCInferenceServiceStub
) -> None:
    model_id = "doubler__isvc-00000000a1"
    model = configured_model(triton_root, model_id)
    async with loaded(triton_plugin, model):
        assert await triton_plugin.client.model_ready(model_id) is True
        assert await infer(inference, model_id) == list(EXPECTED)
        metadata = await inference.ModelMetadata(v2.ModelMetadataRequest(name=model_id), timeout=30)
        assert metadata.name == model_id
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("INPUT0", "FP32", [-1])]
        assert model_id in await triton_plugin.list_models()
        assert AUTHORS_NAME not in await triton_plugin.client.repository_index()

        await triton_plugin.unload(model_id)
        # awaited: nothing of the model is left loading, ready or unloading
        states = await triton_plugin.client.repository_states()
        assert not states.get(model_id, frozenset()) & ACTIVE_STATES
        assert model_id not in await triton_plugin.list_models()
        assert await triton_plugin.client.model_ready(model_id) is False
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await infer(inference, model_id)
        assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)


async def test_bare_model_file_with_a_schema(
    triton_plugin: TritonPlugin, triton_root: Path, inference: v2_grpc.GRPCInferenceServiceStub
) -> None:
    model_id = "bare__isvc-00000000b2"
    model = bare_model(triton_root, model_id)
    async with loaded(triton_plugin, model) as view:
        assert (view / "1" / "model.py").resolve() == model.path.resolve()
        metadata = await inference.ModelMetadata(v2.ModelMetadataRequest(name=model_id), timeout=30)
        schema_in, schema_out = SCHEMA["inputs"][0], SCHEMA["outputs"][0]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            (schema_in["name"], schema_in["datatype"], schema_in["shape"])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            (schema_out["name"], schema_out["datatype"], schema_out["shape"])
        ]
        assert await infer(inference, model_id, str(schema_in["name"])) == list(EXPECTED)


async def test_reload_after_unload_and_over_a_loaded_model(
    triton_plugin: TritonPlugin, triton_root: Path, inference: v2_grpc.GRPCInferenceServiceStub
) -> None:
    model_id = "doubler__isvc-00000000c3"
    model = configured_model(triton_root, model_id)
    async with loaded(triton_plugin, model):
        await triton_plugin.unload(model_id)
        view = await asyncio.to_thread(triton_plugin.layout, model)
        await triton_plugin.load(model_id, view, model)
        assert await infer(inference, model_id) == list(EXPECTED)
        # a new view over the loaded model, loaded again: Triton swaps it in
        view = await asyncio.to_thread(triton_plugin.layout, model)
        await triton_plugin.load(model_id, view, model)
        assert await infer(inference, model_id) == list(EXPECTED)
        assert (await triton_plugin.list_models()).count(model_id) == 1


async def test_two_models_at_once(
    triton_plugin: TritonPlugin, triton_root: Path, inference: v2_grpc.GRPCInferenceServiceStub
) -> None:
    first = configured_model(triton_root, "doubler__isvc-00000000d4")
    second = bare_model(triton_root, "bare__isvc-00000000d5")
    async with contextlib.AsyncExitStack() as stack:
        await asyncio.gather(*(stack.enter_async_context(loaded(triton_plugin, m)) for m in (first, second)))
        assert await infer(inference, first.model_id) == list(EXPECTED)
        assert await infer(inference, second.model_id, str(SCHEMA["inputs"][0]["name"])) == list(EXPECTED)
        assert {first.model_id, second.model_id} <= set(await triton_plugin.list_models())
        await asyncio.gather(triton_plugin.unload(first.model_id), triton_plugin.unload(second.model_id))
        assert not {first.model_id, second.model_id} & set(await triton_plugin.list_models())


async def test_a_broken_model_is_refused_with_tritons_code(
    triton_plugin: TritonPlugin, triton_root: Path
) -> None:
    model_id = "broken__isvc-00000000e6"
    model = broken_model(triton_root, model_id)
    view = await asyncio.to_thread(triton_plugin.layout, model)
    try:
        with pytest.raises(RuntimeRejected) as info:
            await triton_plugin.load(model_id, view, model)
        assert info.value.code == "INVALID_ARGUMENT"
        assert "broken on purpose" in info.value.message  # Triton's own description
        assert model_id not in await triton_plugin.list_models()
        # Triton keeps it as UNAVAILABLE: nothing to unload
        with pytest.raises(ModelNotFound):
            await triton_plugin.unload(model_id)
    finally:
        await asyncio.to_thread(triton_plugin.remove_view, model_id)


async def test_load_without_a_view_is_tritons_internal_error(
    triton_plugin: TritonPlugin, tmp_path: Path
) -> None:
    model_id = "no__view-0000000000"
    model = LocalModel(model_id, tmp_path, 0, "python", None, ModelKey())
    with pytest.raises(RuntimeRejected) as info:
        await triton_plugin.load(model_id, triton_plugin.view_dir(model_id), model)
    assert info.value.code == "INTERNAL"


async def test_unload_of_an_unknown_model_is_model_not_found(triton_plugin: TritonPlugin) -> None:
    with pytest.raises(ModelNotFound):
        await triton_plugin.unload("never__loaded-0000000000")


async def test_unload_twice_is_model_not_found_the_second_time(
    triton_plugin: TritonPlugin, triton_root: Path
) -> None:
    model = configured_model(triton_root, "doubler__isvc-00000000f7")
    async with loaded(triton_plugin, model):
        await triton_plugin.unload(model.model_id)
        with pytest.raises(ModelNotFound):
            await triton_plugin.unload(model.model_id)


async def test_flow_purges_models_views_and_staging_leftovers_before_ready(
    triton: TritonProcess, triton_plugin: TritonPlugin, triton_root: Path
) -> None:
    models = [
        configured_model(triton_root, "left__over-0000000001"),
        bare_model(triton_root, "left__over-02"),
    ]
    for model in models:
        view = await asyncio.to_thread(triton_plugin.layout, model)
        await triton_plugin.load(model.model_id, view, model)
    staging = triton_plugin.models_dir / "_0123456789abcdef.partial"  # a layout cut short
    (staging / "1").mkdir(parents=True)
    flow = ModelFlow(triton_plugin.settings, triton_plugin, None)
    info = await flow.runtime_status()
    assert info.ready
    assert info.runtime_version == TRITON_VERSION
    assert await triton_plugin.list_models() == []
    assert list(triton_plugin.models_dir.iterdir()) == []
    states = await triton_plugin.client.repository_states()
    assert not any(found & ACTIVE_STATES for found in states.values())


# --- the unload wait, against a scripted server ---------------------------------------


class UnloadingServer(v2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Answers RepositoryIndex from a script of states, one step per call (the last
    one repeats), and OK to every unload: the asynchronous unload Triton does, with
    timings a test chooses."""

    def __init__(self, model_id: str, steps: list[str]) -> None:
        self.model_id, self.steps = model_id, steps
        self.calls: list[str] = []

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.calls.append("RepositoryIndex")
        state = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        entry = v2.RepositoryIndexResponse.ModelIndex(name=self.model_id, version="1", state=state)
        return v2.RepositoryIndexResponse(models=[entry])

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.calls.append("RepositoryModelUnload")
        return v2.RepositoryModelUnloadResponse()


@contextlib.asynccontextmanager
async def scripted_plugin(
    tmp_path: Path, servicer: UnloadingServer, loadtime_timeout_ms: int
) -> AsyncIterator[TritonPlugin]:
    server = grpc.aio.server()
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    plugin = TritonPlugin(triton_settings(tmp_path, port, loadtime_timeout_ms=loadtime_timeout_ms))
    await plugin.start()
    try:
        yield plugin
    finally:
        await plugin.close()
        await server.stop(grace=None)


async def test_unload_waits_until_the_model_leaves_unloading(tmp_path: Path) -> None:
    servicer = UnloadingServer("m", ["READY", "UNLOADING", "UNLOADING", "UNAVAILABLE"])
    async with scripted_plugin(tmp_path, servicer, 60_000) as plugin:
        await plugin.unload("m")
    assert servicer.calls == [
        "RepositoryIndex",
        "RepositoryModelUnload",
        "RepositoryIndex",
        "RepositoryIndex",
        "RepositoryIndex",
    ]


async def test_unload_that_never_finishes_is_bounded_by_the_load_timeout(tmp_path: Path) -> None:
    servicer = UnloadingServer("m", ["READY", "UNLOADING"])
    async with scripted_plugin(tmp_path, servicer, 300) as plugin:
        with pytest.raises(LoadTimeout, match="UNLOADING"):
            await plugin.unload("m")
