"""A client for the KServe v2 gRPC API with the model repository extension.

Triton and MLServer both serve ``inference.GRPCInferenceService``: health, metadata
and the repository calls (index, load, unload). This one client drives either.

This module is the runtime's edge: gRPC errors are translated here into our types,
and nothing above it sees a gRPC exception:

* ``UNAVAILABLE`` (connection refused, reset, server going away) -> ``RuntimeUnavailable``
* ``NOT_FOUND`` -> ``ModelNotFound``
* any other code -> ``RuntimeRejected`` carrying the code's name and the runtime's
  own message.

Each call takes a ``timeout`` that becomes the gRPC deadline of the call (the server
sees it too and can stop work nobody waits for), rather than an ``asyncio`` timeout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
import grpc.aio

from adapter.errors import ModelNotFound, RuntimeRejected, RuntimeUnavailable, SidecarError
from adapter.plugin import RuntimePlugin
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from adapter.settings import Settings

V2_SERVICE = "inference.GRPCInferenceService"
#: ModelInfer and ModelMetadata, the model name being field 1 of both requests: the
#: methodInfos of every runtime that speaks the KServe v2 protocol
V2_METHOD_INFOS: Mapping[str, tuple[int, ...]] = {
    f"{V2_SERVICE}/ModelInfer": (1,),
    f"{V2_SERVICE}/ModelMetadata": (1,),
}

#: seconds a call may take when the caller gives no timeout
DEFAULT_TIMEOUT = 10.0

#: the management API is always the model server next to us: never send it through a
#: proxy the environment names for storage traffic; a repository index of many models
#: may be large
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", -1),
)

#: the state a repository index gives a model that can serve
READY_STATE = "READY"


class KServeV2Client:
    """Calls one KServe v2 server at ``target`` (``host:port``).

    The channel is opened by :meth:`start` (gRPC connects lazily, so this never
    waits for the server) and closed by :meth:`close`. A call made before
    :meth:`start` or after :meth:`close` opens the channel first. Every call takes a
    ``timeout`` in seconds (``None``: the client's default).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._options = (*_CHANNEL_OPTIONS, *channel_options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    async def start(self) -> None:
        """Create the channel and stub; idempotent."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=list(self._options))
            self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel (cancelling calls in flight); idempotent."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    # --- health and metadata -------------------------------------------------------

    async def server_ready(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - gRPC deadline
        """True when the server says it is ready. ``False`` (never an error) when it
        cannot be reached or does not answer within the timeout; other refusals raise
        ``RuntimeRejected``."""
        response = await self._probe("ServerReady", pb.ServerReadyRequest(), timeout)
        return response is not None and bool(response.ready)

    async def server_live(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - gRPC deadline
        """True when the server says it is live (its process answers), whatever the
        state of its models. ``False`` (never an error) when it cannot be reached or
        does not answer within the timeout; other refusals raise ``RuntimeRejected``."""
        response = await self._probe("ServerLive", pb.ServerLiveRequest(), timeout)
        return response is not None and bool(response.live)

    async def _probe(self, method: str, request: Any, timeout: float | None) -> Any:  # noqa: ASYNC109
        """The answer to a health call, ``None`` when the server is unreachable or too
        slow."""
        try:
            return await self._call(method, request, timeout)
        except RuntimeUnavailable:
            return None
        except RuntimeRejected as exc:
            if exc.code == "DEADLINE_EXCEEDED":
                return None
            raise

    async def server_metadata(self, timeout: float | None = None) -> tuple[str, str]:  # noqa: ASYNC109 - gRPC deadline
        """The server's (name, version) as it reports them (either may be empty)."""
        response = await self._call("ServerMetadata", pb.ServerMetadataRequest(), timeout)
        return str(response.name), str(response.version)

    async def model_ready(self, name: str, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - gRPC deadline
        """True when model ``name`` is loaded and ready. A model the server answers
        NOT_FOUND for is not ready: ``False`` rather than ``ModelNotFound``. (MLServer
        1.7 answers UNKNOWN for an unknown model: that raises ``RuntimeRejected``.)"""
        try:
            response = await self._call("ModelReady", pb.ModelReadyRequest(name=name), timeout, name)
        except ModelNotFound:
            return False
        return bool(response.ready)

    # --- model repository ----------------------------------------------------------

    async def repository_index(self, ready_only: bool = False, timeout: float | None = None) -> list[str]:  # noqa: ASYNC109 - gRPC deadline
        """Names of the models in the server's repository, each once, in the
        server's order; with ``ready_only`` only those in state READY (filtered here
        too, in case the server ignores the request flag)."""
        request = pb.RepositoryIndexRequest(ready=ready_only)
        response = await self._call("RepositoryIndex", request, timeout)
        names: list[str] = []
        for entry in response.models:
            if ready_only and model_state(entry.state) != READY_STATE:
                continue
            if entry.name and entry.name not in names:
                names.append(str(entry.name))
        return names

    async def repository_states(self, timeout: float | None = None) -> dict[str, frozenset[str]]:  # noqa: ASYNC109 - gRPC deadline
        """Every model in the server's repository -> the plain states of its versions
        (``READY``, ``LOADING``, ``UNLOADING``, ``UNAVAILABLE``...). Triton reports one
        entry per version; a model it lists but never loaded has an empty set."""
        response = await self._call("RepositoryIndex", pb.RepositoryIndexRequest(), timeout)
        states: dict[str, set[str]] = {}
        for entry in response.models:
            if not entry.name:
                continue
            seen = states.setdefault(str(entry.name), set())
            if entry.state:
                seen.add(model_state(str(entry.state)))
        return {name: frozenset(found) for name, found in states.items()}

    async def load(self, name: str, timeout: float | None = None) -> None:  # noqa: ASYNC109 - gRPC deadline
        """Load (or reload) model ``name`` from the server's repository; returns once
        the server reports the load done."""
        await self._call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name), timeout, name)

    async def unload(self, name: str, timeout: float | None = None) -> None:  # noqa: ASYNC109 - gRPC deadline
        """Unload model ``name``. Raises ``ModelNotFound`` when the server answers
        NOT_FOUND (servers differ on other codes for unknown models)."""
        request = pb.RepositoryModelUnloadRequest(model_name=name)
        await self._call("RepositoryModelUnload", request, timeout, name)

    # --- internals -----------------------------------------------------------------

    async def _call(self, method: str, request: Any, timeout: float | None, model: str | None = None) -> Any:  # noqa: ASYNC109 - gRPC deadline
        await self.start()
        rpc = getattr(self._stub, method)
        try:
            return await rpc(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.aio.AioRpcError as exc:
            raise translate_rpc_error(exc, self.target, method, model) from None


def model_state(reported: str) -> str:
    """A repository index state in its plain form: MLServer 1.7 reports the Python
    enum's repr (``State.READY``) where Triton reports ``READY``."""
    return reported.rsplit(".", 1)[-1].strip().upper()


def translate_rpc_error(
    exc: grpc.aio.AioRpcError, target: str, method: str, model: str | None = None
) -> SidecarError:
    """Our error for a failed call of ``method`` on the server at ``target``."""
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return RuntimeUnavailable(f"runtime at {target} is unavailable ({method}): {details}".rstrip(": "))
    if code == grpc.StatusCode.NOT_FOUND:
        subject = f"model {model!r}" if model is not None else "the requested object"
        return ModelNotFound(f"runtime does not know {subject} ({method}): {details}".rstrip(": "))
    code_name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return RuntimeRejected(details or f"{method} failed with {code_name}", code=code_name)


class KServeV2Plugin(RuntimePlugin):
    """What every runtime managed over the KServe v2 gRPC API shares (MLServer,
    Triton): the client on RUNTIME_PORT, readiness by ServerReady, the version from
    ServerMetadata, and the v2 methodInfos. Subclasses add layout, load, unload and
    listing."""

    #: seconds for the readiness probe (runtimeStatus is polled every 2 s)
    status_timeout: ClassVar[float] = 2.0
    #: seconds for metadata, index and unload calls
    call_timeout: ClassVar[float] = 10.0

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        host = settings.runtime_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 literal
        self.client = KServeV2Client(f"{host}:{settings.management_port}", timeout=self.call_timeout)

    async def start(self) -> None:
        """Open the gRPC channel; does not wait for the runtime."""
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    async def is_ready(self) -> bool:
        """The runtime's ServerReady; ``False`` when it cannot be reached."""
        return await self.client.server_ready(timeout=self.status_timeout)

    async def is_alive(self) -> bool:
        """The runtime's ServerLive: its process answers, whatever its models' state."""
        return await self.client.server_live(timeout=self.status_timeout)

    async def runtime_version(self) -> str | None:
        """The version in the runtime's ServerMetadata, ``None`` when it reports none."""
        _, version = await self.client.server_metadata(timeout=self.call_timeout)
        return version or None

    def method_infos(self) -> Mapping[str, Sequence[int]]:
        return V2_METHOD_INFOS
