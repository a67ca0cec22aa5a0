"""The v2 client's error translation and index handling, against a real gRPC server
whose answers each test chooses (codes and states neither MLServer nor Triton can be
made to produce on demand)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from adapter.errors import ModelNotFound, RuntimeRejected, RuntimeUnavailable
from adapter.settings import Settings
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from runtimes.kserve_v2 import KServeV2Client, model_state
from runtimes.mlserver import MLServerPlugin
from tests.servers.process import free_port


@dataclass
class Script:
    """What the scripted server answers: an error for a method, a delay, an index."""

    errors: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    delay: float = 0.0
    index: list[tuple[str, str]] = field(default_factory=list)
    requests: list[tuple[str, Any]] = field(default_factory=list)


class ScriptedServer(v2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, script: Script) -> None:
        self.script = script

    async def _answer(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, response: Any
    ) -> Any:
        self.script.requests.append((method, request))
        if self.script.delay:
            await asyncio.sleep(self.script.delay)
        if method in self.script.errors:
            code, details = self.script.errors[method]
            await context.abort(code, details)
        return response

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._answer("ServerReady", request, context, v2.ServerReadyResponse(ready=True))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        response = v2.ServerMetadataResponse(name="scripted", version="9.9.9")
        return await self._answer("ServerMetadata", request, context, response)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._answer("ModelReady", request, context, v2.ModelReadyResponse(ready=True))

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        models = [v2.RepositoryIndexResponse.ModelIndex(name=n, state=s) for n, s in self.script.index]
        response = v2.RepositoryIndexResponse(models=models)
        return await self._answer("RepositoryIndex", request, context, response)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._answer("RepositoryModelLoad", request, context, v2.RepositoryModelLoadResponse())

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._answer(
            "RepositoryModelUnload", request, context, v2.RepositoryModelUnloadResponse()
        )


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Script, int]]:
    script = Script()
    server = grpc.aio.server()
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(ScriptedServer(script), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield script, port
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def client(scripted: tuple[Script, int]) -> AsyncIterator[KServeV2Client]:
    _, port = scripted
    v2_client = KServeV2Client(f"127.0.0.1:{port}")
    await v2_client.start()
    try:
        yield v2_client
    finally:
        await v2_client.close()


async def test_calls_reach_the_server_with_the_model_name(
    scripted: tuple[Script, int], client: KServeV2Client
) -> None:
    script, _ = scripted
    await client.load("m1")
    await client.unload("m2")
    assert await client.model_ready("m3") is True
    assert await client.server_metadata() == ("scripted", "9.9.9")
    sent = [
        (method, getattr(request, "model_name", getattr(request, "name", "")))
        for method, request in script.requests
    ]
    assert sent == [
        ("RepositoryModelLoad", "m1"),
        ("RepositoryModelUnload", "m2"),
        ("ModelReady", "m3"),
        ("ServerMetadata", ""),
    ]


async def test_unavailable_is_runtime_unavailable(
    scripted: tuple[Script, int], client: KServeV2Client
) -> None:
    script, _ = scripted
    script.errors["RepositoryModelLoad"] = (grpc.StatusCode.UNAVAILABLE, "draining")
    with pytest.raises(RuntimeUnavailable, match="draining"):
        await client.load("m")


async def test_not_found_is_model_not_found(scripted: tuple[Script, int], client: KServeV2Client) -> None:
    script, _ = scripted
    script.errors["RepositoryModelUnload"] = (grpc.StatusCode.NOT_FOUND, "no such model m")
    with pytest.raises(ModelNotFound, match="'m'"):
        await client.unload("m")


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNKNOWN,
    ],
)
async def test_other_codes_are_rejected_with_code_and_runtime_message(
    scripted: tuple[Script, int], client: KServeV2Client, code: grpc.StatusCode
) -> None:
    script, _ = scripted
    script.errors["RepositoryModelLoad"] = (code, "the runtime's own words")
    with pytest.raises(RuntimeRejected) as info:
        await client.load("m")
    assert info.value.code == code.name
    assert info.value.message == "the runtime's own words"


async def test_a_slow_server_hits_the_deadline(scripted: tuple[Script, int], client: KServeV2Client) -> None:
    script, _ = scripted
    script.delay = 1.0
    with pytest.raises(RuntimeRejected) as info:
        await client.load("m", timeout=0.1)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert await client.server_ready(timeout=0.1) is False


async def test_server_ready_raises_for_refusals_other_than_unreachable(
    scripted: tuple[Script, int], client: KServeV2Client
) -> None:
    script, _ = scripted
    script.errors["ServerReady"] = (grpc.StatusCode.UNIMPLEMENTED, "not a v2 server")
    with pytest.raises(RuntimeRejected) as info:
        await client.server_ready()
    assert info.value.code == "UNIMPLEMENTED"


async def test_model_ready_is_false_for_an_unknown_model(
    scripted: tuple[Script, int], client: KServeV2Client
) -> None:
    script, _ = scripted
    script.errors["ModelReady"] = (grpc.StatusCode.NOT_FOUND, "unknown")
    assert await client.model_ready("m") is False


async def test_repository_index_filters_ready_in_every_spelling(
    scripted: tuple[Script, int], client: KServeV2Client
) -> None:
    script, _ = scripted
    script.index = [
        ("a", "READY"),
        ("b", "State.READY"),
        ("c", "UNAVAILABLE"),
        ("d", "State.LOADING"),
        ("a", "READY"),  # Triton lists one entry per version
        ("", "READY"),
    ]
    assert await client.repository_index() == ["a", "b", "c", "d"]
    assert await client.repository_index(ready_only=True) == ["a", "b"]
    assert script.requests[-1][1].ready is True


@pytest.mark.parametrize(
    ("reported", "plain"), [("READY", "READY"), ("State.READY", "READY"), ("ready", "READY"), ("", "")]
)
def test_model_state(reported: str, plain: str) -> None:
    assert model_state(reported) == plain


async def test_a_closed_port_is_unavailable_and_not_ready() -> None:
    port = free_port()
    v2_client = KServeV2Client(f"127.0.0.1:{port}", timeout=5)
    try:
        assert await v2_client.server_ready() is False
        with pytest.raises(RuntimeUnavailable, match=f"127.0.0.1:{port}"):
            await v2_client.repository_index()
    finally:
        await v2_client.close()


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT])
async def test_mlserver_unload_of_unknown_model_is_model_not_found_for_both_codes(
    scripted: tuple[Script, int], tmp_path: Path, code: grpc.StatusCode
) -> None:
    script, port = scripted
    script.errors["RepositoryModelUnload"] = (code, "Model m not found")
    plugin = MLServerPlugin(Settings(root_model_dir=tmp_path, runtime_port=port))
    await plugin.start()
    try:
        with pytest.raises(ModelNotFound):
            await plugin.unload("m")
        script.errors["RepositoryModelUnload"] = (grpc.StatusCode.INTERNAL, "worker died")
        with pytest.raises(RuntimeRejected) as info:
            await plugin.unload("m")
        assert info.value.code == "INTERNAL"
    finally:
        await plugin.close()
