"""The gRPC face of the adapter: the ``mmesh.ModelRuntime`` servicer, the health
service, the one mapping of our errors to status codes, and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from adapter import errors
from adapter.flow import LoadRequest, ModelFlow, RuntimeInfo
from adapter.settings import UNIX_PATH_MAX, Settings
from protos.mmesh import model_runtime_pb2 as pb
from protos.mmesh import model_runtime_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = "mmesh.ModelRuntime"

# The one place where our errors become gRPC status codes. Most specific first.
_STATUS: tuple[tuple[type[errors.SidecarError], grpc.StatusCode], ...] = (
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.StorageConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ConfigurationError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.StorageNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.StoragePermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.StorageUnauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.StorageError, grpc.StatusCode.INTERNAL),
    (errors.DiskFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.RuntimeUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.LoadTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.NotImplementedByRuntime, grpc.StatusCode.UNIMPLEMENTED),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception raised while serving."""
    if isinstance(exc, errors.RuntimeRejected):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN)
        return code, exc.message
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code, exc.message
    if isinstance(exc, errors.SidecarError):
        return grpc.StatusCode.INTERNAL, exc.message
    # Not ours: the message could hold anything, so the caller gets only its kind.
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the sidecar log"


T = TypeVar("T")


@contextlib.asynccontextmanager
async def errors_to_status(context: grpc.aio.ServicerContext[Any, Any], rpc: str) -> AsyncIterator[None]:
    try:
        yield
    except asyncio.CancelledError:
        log.info("request cancelled by the caller", rpc=rpc)
        raise
    except Exception as exc:
        code, message = status_for(exc)
        if isinstance(exc, errors.SidecarError):
            log.warning("request failed", rpc=rpc, code=code.name, error=message)
        else:
            log.exception("request failed unexpectedly", rpc=rpc, code=code.name)
        await context.abort(code, message)


def status_response(info: RuntimeInfo) -> pb.RuntimeStatusResponse:
    response = pb.RuntimeStatusResponse(
        status=(pb.RuntimeStatusResponse.READY if info.ready else pb.RuntimeStatusResponse.STARTING),
        capacityInBytes=info.capacity_bytes,
        maxLoadingConcurrency=info.max_loading_concurrency,
        modelLoadingTimeoutMs=info.model_loading_timeout_ms,
        defaultModelSizeInBytes=info.default_model_size_bytes,
        runtimeVersion=info.runtime_version,
        limitModelConcurrency=info.limit_model_concurrency,
    )
    for method, path in info.method_infos.items():
        response.methodInfos[method].idInjectionPath.extend(path)
    return response


class ModelRuntimeServicer(pb_grpc.ModelRuntimeServicer):  # type: ignore[misc]
    """Decode, validate, delegate to :class:`ModelFlow`, map errors. Nothing else."""

    def __init__(self, flow: ModelFlow, on_ready: Callable[[], Awaitable[None]]) -> None:
        self.flow = flow
        self._on_ready = on_ready

    async def loadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadModelResponse:
        with structlog.contextvars.bound_contextvars(model_id=request.modelId, rpc="loadModel"):
            async with errors_to_status(context, "loadModel"):
                load = LoadRequest.parse(
                    request.modelId, request.modelPath, request.modelType, request.modelKey
                )
                log.info("loadModel", model_path=load.model_path, model_type=load.model_type)
                result = await self.flow.load(load)
                return pb.LoadModelResponse(
                    sizeInBytes=result.size_bytes, maxConcurrency=result.max_concurrency
                )
        raise AssertionError("unreachable")  # abort() raises

    async def unloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UnloadModelResponse:
        with structlog.contextvars.bound_contextvars(model_id=request.modelId, rpc="unloadModel"):
            async with errors_to_status(context, "unloadModel"):
                log.info("unloadModel")
                await self.flow.unload(request.modelId)
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
                size = await self.flow.predict_size(load)
                return pb.PredictModelSizeResponse(sizeInBytes=size)
        raise AssertionError("unreachable")

    async def modelSize(
        self, request: pb.ModelSizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelSizeResponse:
        with structlog.contextvars.bound_contextvars(model_id=request.modelId, rpc="modelSize"):
            async with errors_to_status(context, "modelSize"):
                size = await self.flow.model_size(request.modelId)
                return pb.ModelSizeResponse(sizeInBytes=size)
        raise AssertionError("unreachable")

    async def runtimeStatus(
        self, request: pb.RuntimeStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RuntimeStatusResponse:
        async with errors_to_status(context, "runtimeStatus"):
            info = await self.flow.runtime_status()
            if info.ready:
                await self._on_ready()
            return status_response(info)
        raise AssertionError("unreachable")


def _refuse_unless_stale(path: Path) -> None:
    """Raise unless ``path`` is free or a socket nobody listens on (a previous run's)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise errors.ConfigurationError(f"ADAPTER_ENDPOINT: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return
            raise errors.ConfigurationError(
                f"ADAPTER_ENDPOINT: cannot tell whether {path} is in use: {exc.strerror}"
            ) from None
    raise errors.ConfigurationError(f"ADAPTER_ENDPOINT: another process listens on {path}")


def bind_unix_socket(server: grpc.aio.Server, path: Path) -> tuple[int, int]:
    """Bind ``server`` to the Unix socket ``path``, mode 0600, replacing a stale one.

    The socket is bound inside a fresh folder beside ``path`` that only this uid may
    enter (0700), set to 0600 there, and renamed over ``path``: at no moment can another
    user reach it, and a stale socket is replaced atomically. Returns the socket's
    (device, inode), so that shutdown removes it only if it is still ours.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _refuse_unless_stale(path)
    private = Path(tempfile.mkdtemp(prefix=".", dir=path.parent))
    try:
        staged = private / "s"
        if len(bytes(staged)) > UNIX_PATH_MAX:
            raise errors.ConfigurationError(
                f"ADAPTER_ENDPOINT: {path.parent} is too long a folder for a socket "
                f"(a socket path holds at most {UNIX_PATH_MAX} bytes)"
            )
        try:
            bound = server.add_insecure_port(f"unix:{staged}")
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise errors.ConfigurationError(f"cannot listen on unix:{path}")
        staged.chmod(0o600)
        staged.replace(path)
        found = path.lstat()
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return found.st_dev, found.st_ino


def remove_unix_socket(path: Path, identity: tuple[int, int]) -> None:
    """Remove the socket at ``path`` if it is still the one :func:`bind_unix_socket` made."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return
    if (found.st_dev, found.st_ino) == identity:
        path.unlink(missing_ok=True)


class AdapterServer:
    """The grpc.aio server of the adapter: ModelRuntime + health, on ADAPTER_PORT, or on
    a Unix socket when ADAPTER_ENDPOINT says ``unix:/path``."""

    def __init__(self, settings: Settings, flow: ModelFlow) -> None:
        self.settings = settings
        self.flow = flow
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        #: the gRPC target clients dial: ``host:port`` or ``unix:/path``
        self.address: str | None = None
        self._socket: tuple[Path, tuple[int, int]] | None = None
        self._watch: asyncio.Task[None] | None = None

    async def _mark_serving(self) -> None:
        await self._set_health(serving=True)

    async def _set_health(self, *, serving: bool) -> None:
        codes = health_pb2.HealthCheckResponse
        status = codes.SERVING if serving else codes.NOT_SERVING
        await self.health.set(SERVICE_NAME, status)
        await self.health.set("", status)

    async def _runtime_changed(self, up: bool) -> None:
        """The runtime stopped answering (NOT_SERVING) or is back with every model
        loaded again (SERVING): see :meth:`ModelFlow.watch_runtime`."""
        await self._set_health(serving=up)

    async def start(self) -> int:
        """Start serving; returns the bound port (useful with ADAPTER_PORT=0), 0 on a
        Unix socket."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ModelRuntimeServicer_to_server(
            ModelRuntimeServicer(self.flow, self._mark_serving), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set_health(serving=False)
        socket_path = self.settings.adapter_socket_path
        if socket_path is not None:
            self._socket = (socket_path, bind_unix_socket(server, socket_path))
            port, self.address = 0, f"unix:{socket_path}"
        else:
            address = f"{self.settings.adapter_host}:{self.settings.adapter_listen_port}"
            port = server.add_insecure_port(address)
            if port == 0:
                raise errors.ConfigurationError(f"cannot listen on {address}")
            self.address = f"{self.settings.adapter_host}:{port}"
        try:
            await server.start()
        except BaseException:
            self._remove_socket()
            raise
        self._server = server
        self.port = port
        watch = self.flow.watch_runtime(self._runtime_changed)
        self._watch = asyncio.create_task(watch, name="runtime watch")
        log.info("adapter listening", address=self.address)
        return port

    def _remove_socket(self) -> None:
        if self._socket is not None:
            remove_unix_socket(*self._socket)
            self._socket = None

    async def stop(self, grace: float | None = None) -> None:
        if self._server is None:
            return
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self.health.enter_graceful_shutdown()
        try:
            await self._server.stop(grace if grace is not None else self.settings.shutdown_grace_seconds)
        finally:
            self._server = None
            self._remove_socket()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve_until_signalled(
    start: Callable[[], Awaitable[Any]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Run ``start``, wait for SIGTERM or SIGINT, then ``stop`` (graceful)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await start()
    await stopping.wait()
    log.info("shutting down")
    await stop()
