"""The standalone puller (``mesh-puller serve``, upstream's ``/opt/app/puller``).

It answers ``mmesh.ModelRuntime`` on PORT, pulls each model into ROOT_MODEL_DIR, rewrites
the request (modelPath = the local path, modelKey with ``disk_size_bytes`` and the local
schema path) and forwards it to the adapter at MODEL_SERVER_ENDPOINT. Unloads are
forwarded first, then the files are deleted. Before the first READY it forwards, the
leftover model directories are purged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from adapter.errors import ConfigurationError, RuntimeRejected, RuntimeUnavailable
from adapter.flow import LoadRequest
from adapter.sequencing import TurnQueue
from adapter.server import SERVICE_NAME, errors_to_status
from adapter.settings import Settings
from protos.mmesh import model_runtime_pb2 as pb
from protos.mmesh import model_runtime_pb2_grpc as pb_grpc
from puller.pull import Puller
from puller.request import PullRequest

log = structlog.get_logger(__name__)


def grpc_target(endpoint: str) -> str:
    """``port:N`` -> ``127.0.0.1:N``; ``unix:/path`` and ``host:port`` unchanged."""
    if endpoint.startswith("port:"):
        return f"127.0.0.1:{endpoint[len('port:') :]}"
    return endpoint


@asynccontextmanager
async def _forwarding(what: str) -> AsyncIterator[None]:
    """Translate the adapter's gRPC errors into ours, code preserved."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        message = exc.details() or f"{what} failed"
        if code == grpc.StatusCode.UNAVAILABLE:
            raise RuntimeUnavailable(f"adapter unavailable: {message}") from None
        raise RuntimeRejected(message, code=code.name) from None


class PullerServicer(pb_grpc.ModelRuntimeServicer):  # type: ignore[misc]
    def __init__(self, settings: Settings, puller: Puller, adapter: pb_grpc.ModelRuntimeStub) -> None:
        self.settings = settings
        self.puller = puller
        self.adapter = adapter
        self._turns = TurnQueue()
        self._purged = False
        self._purge_lock = asyncio.Lock()

    async def loadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadModelResponse:
        with structlog.contextvars.bound_contextvars(model_id=request.modelId, rpc="loadModel"):
            async with errors_to_status(context, "loadModel"):
                load = LoadRequest.parse(
                    request.modelId, request.modelPath, request.modelType, request.modelKey
                )
                async with self._turns.take(load.model_id):
                    local = await self.puller.pull(
                        PullRequest(load.model_id, load.model_path, load.model_key, load.model_type)
                    )
                    forwarded = pb.LoadModelRequest(
                        modelId=load.model_id,
                        modelType=load.model_type,
                        modelPath=str(local.path),
                        modelKey=local.rewritten_key(),
                    )
                    try:
                        async with _forwarding("loadModel"):
                            response: pb.LoadModelResponse = await self.adapter.loadModel(forwarded)
                    except BaseException:
                        await self.puller.remove(load.model_id)
                        raise
                    return response
        raise AssertionError("unreachable")

    async def unloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UnloadModelResponse:
        with structlog.contextvars.bound_contextvars(model_id=request.modelId, rpc="unloadModel"):
            async with errors_to_status(context, "unloadModel"):
                load = LoadRequest.parse(request.modelId, "", "", "")
                async with self._turns.take(load.model_id):
                    try:
                        async with _forwarding("unloadModel"):
                            await self.adapter.unloadModel(pb.UnloadModelRequest(modelId=load.model_id))
                    except RuntimeRejected as exc:
                        if exc.code != "NOT_FOUND":
                            raise
                    await self.puller.remove(load.model_id)
                    return pb.UnloadModelResponse()
        raise AssertionError("unreachable")

    async def predictModelSize(
        self, request: pb.PredictModelSizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PredictModelSizeResponse:
        with structlog.contextvars.bound_contextvars(model_id=request.modelId, rpc="predictModelSize"):
            async with errors_to_status(context, "predictModelSize"):
                load = LoadRequest.parse(
                    request.modelId, request.modelPath, request.modelType, request.modelKey
                )
                key_text = request.modelKey
                if load.model_key.disk_size_bytes is None:
                    size = await self.puller.predict_size(
                        PullRequest(load.model_id, load.model_path, load.model_key, load.model_type)
                    )
                    if size is not None:
                        key = json.loads(key_text) if key_text.strip() else {}
                        key["disk_size_bytes"] = size
                        key_text = json.dumps(key)
                async with _forwarding("predictModelSize"):
                    response: pb.PredictModelSizeResponse = await self.adapter.predictModelSize(
                        pb.PredictModelSizeRequest(
                            modelId=request.modelId,
                            modelType=request.modelType,
                            modelPath=request.modelPath,
                            modelKey=key_text,
                        )
                    )
                return response
        raise AssertionError("unreachable")

    async def modelSize(
        self, request: pb.ModelSizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelSizeResponse:
        with structlog.contextvars.bound_contextvars(model_id=request.modelId, rpc="modelSize"):
            async with errors_to_status(context, "modelSize"), _forwarding("modelSize"):
                response: pb.ModelSizeResponse = await self.adapter.modelSize(request)
                return response
        raise AssertionError("unreachable")

    async def runtimeStatus(
        self, request: pb.RuntimeStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RuntimeStatusResponse:
        async with errors_to_status(context, "runtimeStatus"):
            async with _forwarding("runtimeStatus"):
                response: pb.RuntimeStatusResponse = await self.adapter.runtimeStatus(request)
            if response.status == pb.RuntimeStatusResponse.READY and not self._purged:
                async with self._purge_lock:
                    if not self._purged:
                        removed = await asyncio.to_thread(self.puller.purge)
                        log.info("purged leftover model directories before READY", model_dirs=len(removed))
                        self._purged = True
            return response
        raise AssertionError("unreachable")


class PullerServer:
    """grpc.aio server of the standalone puller on PORT, with a health service."""

    def __init__(self, settings: Settings, puller: Puller) -> None:
        self.settings = settings
        self.puller = puller
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self.port: int | None = None

    async def start(self) -> int:
        self._channel = grpc.aio.insecure_channel(grpc_target(self.settings.model_server_endpoint))
        stub = pb_grpc.ModelRuntimeStub(self._channel)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ModelRuntimeServicer_to_server(PullerServicer(self.settings, self.puller, stub), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.settings.adapter_host}:{self.settings.puller_port}"
        port: int = server.add_insecure_port(address)
        if port == 0:
            raise ConfigurationError(f"cannot listen on {address}")
        await server.start()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        self.port = port
        log.info(
            "puller listening",
            address=f"{self.settings.adapter_host}:{port}",
            forwarding_to=self.settings.model_server_endpoint,
        )
        return port

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace if grace is not None else self.settings.shutdown_grace_seconds)
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
