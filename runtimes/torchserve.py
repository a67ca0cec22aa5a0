"""The TorchServe runtime plugin.

TorchServe (0.12) is driven through its own gRPC APIs (``protos/torchserve/``): the
management service on RUNTIME_PORT (7071) registers, unregisters, lists and describes
models; the inference service on the data endpoint (RUNTIME_DATA_ENDPOINT, default
``port:7070``) answers the readiness ``Ping`` and serves ``Predictions``.

TorchServe reads its configuration once, at start, from the file the sidecar writes
in :meth:`TorchServePlugin.prepare` before it starts:
``ROOT_MODEL_DIR/_torchserve_models/mmconfig.properties`` (the container of the
stock ServingRuntime waits for that file, then runs ``torchserve --start
--foreground``). The model store is ``_torchserve_models`` itself.

The view of a model is one link in the model store, ``<escaped modelId>.mar``, to the
pulled archive; the model is registered under the unescaped modelId (the name
ModelMesh writes into field 1 of ``Predictions``) with that file name as its url.
TorchServe refuses urls that contain ``..`` and parses names with a ``:`` as URLs,
and a file name holds at most 255 bytes, so the file name is escaped
(:func:`mar_file_name`): every byte outside ``A-Z a-z 0-9 - _ .`` becomes ``%XX``
(upper-case hex of its UTF-8 byte), as does a ``.`` that starts or ends the id or
follows another ``.``; :func:`model_id_from_mar` reverses it. An id whose escaped
form is too long becomes a truncated prefix, ``~`` and a hash of the id (never
produced by the escaping itself, so the two kinds of names never meet).

Sizes: :meth:`TorchServePlugin.load` returns 0 so that ModelMesh asks ``modelSize``
once the model serves; :meth:`TorchServePlugin.model_size` is the workers' memory
from ``DescribeModel`` plus 10 %, or, while TorchServe has not measured every worker
yet (it does every ``metric_time_interval``, 60 s by default), the ``.mar`` size x
MODELSIZE_MULTIPLIER (2.75).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
import grpc.aio
import structlog
from google.protobuf import empty_pb2

from adapter.errors import (
    ConfigurationError,
    InvalidRequest,
    LoadTimeout,
    ModelNotFound,
    RuntimeRejected,
    RuntimeUnavailable,
    SidecarError,
)
from adapter.plugin import RuntimePlugin
from protos.torchserve import inference_pb2_grpc, management_pb2, management_pb2_grpc
from puller.model_key import validate_model_id
from runtimes.kserve_v2 import V2_METHOD_INFOS, translate_rpc_error

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.request import LocalModel

log = structlog.get_logger(__name__)

#: the configuration file TorchServe is started with, in the model store
CONFIG_FILE_NAME = "mmconfig.properties"
MAR_SUFFIX = ".mar"
#: TorchServe's gRPC inference port when RUNTIME_DATA_ENDPOINT is not set
DEFAULT_DATA_PORT = 7070
#: what Ping reports when TorchServe and every model's workers are up
HEALTHY = "Healthy"
#: TorchServe answers at most 100 models per ListModels page (and loops on 0)
LIST_PAGE_SIZE = 100
#: workers' measured memory x this is a model's size (headroom for what RSS misses)
MEMORY_HEADROOM = 1.10

#: bytes kept as they are in a .mar file name; everything else is %XX
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
#: a file name holds at most 255 bytes
_MAX_FILE_NAME = 255
_HASHED_PREFIX = 180

_INFERENCE_SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"

#: TorchServe is the server next to us: never through a proxy the environment names for
#: storage traffic; describe and list answers of many models may be large
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", -1),
)


# --- names -----------------------------------------------------------------------------


def mar_file_name(model_id: str) -> str:
    """The model store file name of ``model_id``'s archive (see the module docstring)."""
    raw = model_id.encode("utf-8", "surrogatepass")
    out: list[str] = []
    for i, byte in enumerate(raw):
        dot_kept = byte != ord(".") or (0 < i < len(raw) - 1 and raw[i - 1] != ord("."))
        out.append(chr(byte) if byte in _SAFE_BYTES and dot_kept else f"%{byte:02X}")
    escaped = "".join(out)
    if len(escaped) + len(MAR_SUFFIX) > _MAX_FILE_NAME:
        digest = hashlib.sha256(raw).hexdigest()[:40]
        escaped = f"{escaped[:_HASHED_PREFIX]}~{digest}"
    return escaped + MAR_SUFFIX


def model_id_from_mar(file_name: str) -> str | None:
    """The model id whose archive is named ``file_name``; ``None`` for a name that
    :func:`mar_file_name` does not produce or that is hashed (not reversible)."""
    if not file_name.endswith(MAR_SUFFIX):
        return None
    escaped = file_name[: -len(MAR_SUFFIX)]
    if "~" in escaped:
        return None
    decoded = bytearray()
    i = 0
    while i < len(escaped):
        if escaped[i] == "%":
            try:
                decoded.append(int(escaped[i + 1 : i + 3], 16))
            except ValueError:
                return None
            i += 3
        else:
            decoded += escaped[i].encode()
            i += 1
    try:
        model_id = decoded.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    return model_id if mar_file_name(model_id) == file_name else None


# --- the configuration file ------------------------------------------------------------


@dataclass(frozen=True)
class TorchServeConfig:
    """What the sidecar tells TorchServe in its configuration file.

    The gRPC addresses are the sidecar's settings; the REST addresses are TorchServe's
    own defaults unless given (the tests move them to free ports); ``extra`` adds any
    other TorchServe property (``metric_time_interval``...).
    """

    model_store: Path
    grpc_address: str
    grpc_management_port: int
    grpc_inference_port: int
    inference_address: str | None = None
    management_address: str | None = None
    metrics_address: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def properties(self) -> dict[str, str]:
        props = {
            "model_store": str(self.model_store),
            "grpc_inference_address": self.grpc_address,
            "grpc_inference_port": str(self.grpc_inference_port),
            "grpc_management_address": self.grpc_address,
            "grpc_management_port": str(self.grpc_management_port),
            # the management API is reached only from inside the pod
            "disable_token_authorization": "true",
            "enable_model_api": "true",
        }
        for key, value in (
            ("inference_address", self.inference_address),
            ("management_address", self.management_address),
            ("metrics_address", self.metrics_address),
        ):
            if value is not None:
                props[key] = value
        props.update(self.extra)
        return props

    def render(self) -> str:
        """The file's text. Values are written as they are: TorchServe's launcher
        reads them without Java's escapes, so a value with a line break, a
        backslash or surrounding blanks raises ``ConfigurationError``."""
        lines = ["# TorchServe configuration, written by the modelmesh sidecar before TorchServe starts"]
        for key, value in self.properties().items():
            if value != value.strip() or any(c in value for c in "\\\r\n\f") or "=" in key:
                raise ConfigurationError(f"TorchServe setting {key}={value!r} cannot be written")
            lines.append(f"{key}={value}")
        return "\n".join(lines) + "\n"


def write_config(path: Path, config: TorchServeConfig) -> None:
    """Write ``config`` to ``path`` atomically (a waiting runtime sees no file or the
    whole file)."""
    text = config.render()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        temp.chmod(0o644)  # TorchServe may run as another user
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def data_endpoint_target(endpoint: str | None, host: str) -> str:
    """The gRPC target of the inference API: ``port:N`` -> ``host:N``, ``unix:/path``
    unchanged, unset -> ``host:7070``."""
    if endpoint is None:
        return f"{host}:{DEFAULT_DATA_PORT}"
    if endpoint.startswith("port:"):
        return f"{host}:{_port(endpoint[len('port:') :], endpoint)}"
    if endpoint.startswith("unix:"):
        return endpoint
    raise ConfigurationError(f"RUNTIME_DATA_ENDPOINT {endpoint!r}: expected port:N or unix:/path")


def _port(raw: str, endpoint: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 < port <= 65535:
        raise ConfigurationError(f"RUNTIME_DATA_ENDPOINT {endpoint!r}: not a port number")
    return port


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# --- the plugin ------------------------------------------------------------------------


class TorchServePlugin(RuntimePlugin):
    """TorchServe 0.x behind its management and inference gRPC APIs."""

    name: ClassVar[str] = "torchserve"
    default_runtime_port: ClassVar[int] = 7071
    default_modelsize_multiplier: ClassVar[float] = 2.75

    #: workers started for each model (each holds its own copy of the model)
    initial_workers: ClassVar[int] = 1
    #: TorchServe's batching of each model: requests per batch and ms to wait for one
    batch_size: ClassVar[int] = 1
    max_batch_delay_ms: ClassVar[int] = 100
    #: seconds for the readiness Ping (runtimeStatus is polled every 2 s)
    status_timeout: ClassVar[float] = 2.0
    #: seconds for list and describe calls
    call_timeout: ClassVar[float] = 10.0
    #: seconds for an unregister, which waits for the model's workers to stop
    unload_timeout: ClassVar[float] = 120.0
    #: seconds between checks for a READY worker after a register
    worker_poll_interval: ClassVar[float] = 0.2

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.management_target = f"{_grpc_host(settings.runtime_host)}:{settings.management_port}"
        self.inference_target = data_endpoint_target(
            settings.runtime_data_endpoint, _grpc_host(settings.runtime_host)
        )
        self._management: grpc.aio.Channel | None = None
        self._inference: grpc.aio.Channel | None = None
        self._management_stub: Any = None
        self._inference_stub: Any = None

    @property
    def config_path(self) -> Path:
        """``_torchserve_models/mmconfig.properties``, the file TorchServe starts with."""
        return self.models_dir / CONFIG_FILE_NAME

    def view_dir(self, model_id: str) -> Path:
        """The model's archive link in the model store."""
        return self.models_dir / mar_file_name(model_id)

    def config(self) -> TorchServeConfig:
        """The configuration :meth:`prepare` writes, from the settings."""
        if self.inference_target.startswith("unix:"):
            raise ConfigurationError(
                "TorchServe's gRPC inference API listens on TCP only: "
                "RUNTIME_DATA_ENDPOINT must be port:N to write its configuration"
            )
        return TorchServeConfig(
            model_store=self.models_dir.absolute(),
            grpc_address=self.settings.runtime_host,
            grpc_management_port=self.settings.management_port,
            grpc_inference_port=int(self.inference_target.rsplit(":", 1)[1]),
        )

    def prepare(self) -> None:
        """Remove the archive links left by an earlier run (TorchServe has its own
        copy of every registered archive) and write the configuration file."""
        config = self.config()
        self.models_dir.mkdir(parents=True, exist_ok=True)
        for link in self._archive_links():
            link.unlink(missing_ok=True)
        write_config(self.config_path, config)

    async def start(self) -> None:
        """Open both channels; does not wait for TorchServe."""
        if self._management is None:
            options = list(_CHANNEL_OPTIONS)
            self._management = grpc.aio.insecure_channel(self.management_target, options=options)
            self._inference = grpc.aio.insecure_channel(self.inference_target, options=options)
            self._management_stub = management_pb2_grpc.ManagementAPIsServiceStub(self._management)
            self._inference_stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._inference)

    async def close(self) -> None:
        channels = (self._management, self._inference)
        self._management = self._inference = self._management_stub = self._inference_stub = None
        for channel in channels:
            if channel is not None:
                await channel.close()

    # --- status --------------------------------------------------------------------

    async def is_ready(self) -> bool:
        """True when the inference API's Ping reports ``Healthy``; ``False`` when
        TorchServe cannot be reached, does not answer in time, or reports otherwise."""
        try:
            response = await self._call("inference", "Ping", empty_pb2.Empty(), self.status_timeout)
        except RuntimeUnavailable:
            return False
        except RuntimeRejected as exc:
            if exc.code == "DEADLINE_EXCEEDED":
                return False
            raise
        return health_status(str(response.health)) == HEALTHY

    async def is_alive(self) -> bool:
        """True when Ping answers at all: ``Partial Healthy`` (a model short of workers)
        and ``Unhealthy`` come from a TorchServe that is there, and takes calls."""
        try:
            await self._call("inference", "Ping", empty_pb2.Empty(), self.status_timeout)
        except RuntimeUnavailable:
            return False
        except RuntimeRejected as exc:
            return exc.code != "DEADLINE_EXCEEDED"
        return True

    async def runtime_version(self) -> str | None:
        """``None``: TorchServe's gRPC APIs do not report its version."""
        return None

    def method_infos(self) -> Mapping[str, Sequence[int]]:
        """TorchServe's Predictions and the KServe v2 calls, the model name being
        field 1 of each request."""
        return {f"{_INFERENCE_SERVICE}/Predictions": (1,), **V2_METHOD_INFOS}

    # --- layout --------------------------------------------------------------------

    def layout(self, model: LocalModel) -> Path:
        """Link ``_torchserve_models/<escaped modelId>.mar`` to the model's archive
        and return the link (replacing an old one in one rename).

        The model path must be a model archive (a zip file, usually ``*.mar``) or a
        directory holding exactly one ``*.mar`` file; ``InvalidRequest`` otherwise.
        A schema has no meaning for TorchServe and is ignored."""
        model_id = validate_model_id(model.model_id)
        archive = find_archive(model.path.absolute())
        view = self.view_dir(model_id)
        view.parent.mkdir(parents=True, exist_ok=True)
        temp = view.with_name(f".{view.name}.{os.getpid()}.tmp")
        temp.unlink(missing_ok=True)
        temp.symlink_to(archive)
        temp.replace(view)
        return view

    def remove_view(self, model_id: str) -> None:
        self.view_dir(model_id).unlink(missing_ok=True)

    def _archive_links(self) -> Iterator[Path]:
        if self.models_dir.is_dir():
            for entry in self.models_dir.iterdir():
                if entry.name.endswith(MAR_SUFFIX) and (entry.is_symlink() or entry.is_file()):
                    yield entry

    # --- load / unload -------------------------------------------------------------

    async def load(self, model_id: str, view: Path, model: LocalModel) -> int | None:
        """Register ``model_id`` from its archive link and return once a worker is
        READY. A model already registered under the id is unregistered first (a
        reload; TorchServe refuses a second register of a name with UNKNOWN), and
        one whose register failed is unregistered again. The runtime's refusal
        (e.g. INTERNAL when its workers fail to start) raises ``RuntimeRejected``
        with its code. Returns 0: the mesh then asks :meth:`model_size`."""
        timeout = self.settings.loadtime_timeout_ms / 1000
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ModelNotFound):
            await self._unregister(model_id)
        request = management_pb2.RegisterModelRequest(
            model_name=model_id,
            url=view.name,
            synchronous=True,
            initial_workers=self.initial_workers,
            batch_size=self.batch_size,
            max_batch_delay=self.max_batch_delay_ms,
            startup_timeout=max(math.ceil(timeout), 1),
        )
        remaining = max(deadline - time.monotonic(), 0.1)
        try:
            response = await self._call("management", "RegisterModel", request, remaining, model_id)
            log.info("registered with TorchServe", answer=str(response.msg))
            await self._await_ready_worker(model_id, deadline)
        except SidecarError:
            # TorchServe may keep a model whose workers failed registered: take it out
            with contextlib.suppress(SidecarError):
                await self._unregister(model_id)
            raise
        return 0

    async def _await_ready_worker(self, model_id: str, deadline: float) -> None:
        """Return once ``model_id`` has a READY worker; a synchronous register may
        answer "Workers scaling in progress" before one is."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoadTimeout(f"TorchServe started no worker for model {model_id!r} in time")
            description = await self.describe(model_id, timeout=min(self.call_timeout, remaining))
            if any(w.get("status") == "READY" for w in _workers(description)):
                return
            await asyncio.sleep(self.worker_poll_interval)

    async def unload(self, model_id: str) -> None:
        """Unregister ``model_id`` (TorchServe stops its workers before answering)
        and remove its archive link. ``ModelNotFound`` when TorchServe does not
        know the model (the link is removed all the same)."""
        try:
            await self._unregister(model_id)
        finally:
            await asyncio.to_thread(self.remove_view, model_id)

    async def _unregister(self, model_id: str) -> None:
        request = management_pb2.UnregisterModelRequest(model_name=model_id)
        await self._call("management", "UnregisterModel", request, self.unload_timeout, model_id)

    async def list_models(self) -> list[str]:
        """The name of every model TorchServe has registered, page by page."""
        names: list[str] = []
        seen: set[str] = set()
        token = 0
        for _ in range(100_000 // LIST_PAGE_SIZE):
            request = management_pb2.ListModelsRequest(limit=LIST_PAGE_SIZE, next_page_token=token)
            response = await self._call("management", "ListModels", request, self.call_timeout)
            page = _json(response, "ListModels")
            if not isinstance(page, dict):
                raise RuntimeRejected("TorchServe's ListModels answer is not an object", code="INTERNAL")
            for entry in page.get("models") or []:
                name = entry.get("modelName") if isinstance(entry, dict) else None
                if isinstance(name, str) and name and name not in seen:
                    seen.add(name)
                    names.append(name)
            next_token = _int(page.get("nextPageToken"))
            if next_token is None or next_token <= token:
                return names
            token = next_token
        raise RuntimeRejected("TorchServe's model list did not end", code="OUT_OF_RANGE")

    async def describe(self, model_id: str, timeout: float | None = None) -> list[dict[str, Any]]:  # noqa: ASYNC109 - gRPC deadline
        """TorchServe's description of ``model_id`` (one entry per version asked:
        the default one). ``ModelNotFound`` when it does not know the model."""
        request = management_pb2.DescribeModelRequest(model_name=model_id)
        response = await self._call(
            "management", "DescribeModel", request, timeout or self.call_timeout, model_id
        )
        description = _json(response, "DescribeModel")
        if not isinstance(description, list):
            description = [description]
        return [entry for entry in description if isinstance(entry, dict)]

    # --- sizes ---------------------------------------------------------------------

    async def model_size(self, model_id: str) -> int | None:
        """The memory of the model's workers (+10 %) once TorchServe has measured
        each of them, else the archive size x MODELSIZE_MULTIPLIER; ``None`` when
        neither is known. ``ModelNotFound`` when TorchServe does not know it."""
        try:
            description = await self.describe(model_id)
        except ModelNotFound:
            raise
        except SidecarError as exc:
            log.warning("DescribeModel failed; sizing from the archive", error=str(exc))
        else:
            memory = [_int(w.get("memoryUsage")) or 0 for w in _workers(description)]
            if memory and all(m > 0 for m in memory):
                return math.ceil(sum(memory) * MEMORY_HEADROOM)
        try:
            archive_size = self.view_dir(model_id).stat().st_size
        except OSError:
            return None
        return math.ceil(archive_size * self.settings.multiplier) if archive_size > 0 else None

    # --- the edge ------------------------------------------------------------------

    async def _call(
        self,
        api: str,
        method: str,
        request: Any,
        timeout: float,  # noqa: ASYNC109 - gRPC deadline
        model: str | None = None,
    ) -> Any:
        """One call of ``method`` on the ``management`` or ``inference`` API, its
        gRPC errors translated into ours (``runtimes.kserve_v2.translate_rpc_error``)."""
        await self.start()
        if api == "management":
            stub, target = self._management_stub, self.management_target
        else:
            stub, target = self._inference_stub, self.inference_target
        try:
            return await getattr(stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise translate_rpc_error(exc, target, method, model) from None


def find_archive(path: Path) -> Path:
    """The model archive at ``path``: the file itself, or the one ``*.mar`` file in
    the directory. ``InvalidRequest`` for anything else, or a file that is not a zip
    archive (TorchServe reads a ``.mar`` as one)."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.lower().endswith(MAR_SUFFIX) and p.is_file())
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise InvalidRequest(
                f"model directory {path} must hold exactly one {MAR_SUFFIX} file, found {what}"
            )
        path = found[0]
    elif not path.is_file():
        raise InvalidRequest(f"model path {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise InvalidRequest(f"{path} is not a TorchServe model archive (a .mar is a zip file)")
    return path


def health_status(health: str) -> str:
    """The ``status`` of Ping's JSON answer (``Healthy``, ``Unhealthy``), or the
    answer itself when it is not that JSON."""
    with contextlib.suppress(ValueError):
        parsed = json.loads(health)
        if isinstance(parsed, dict) and isinstance(parsed.get("status"), str):
            return str(parsed["status"])
    return health.strip()


def _workers(description: list[dict[str, Any]]) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = []
    for entry in description:
        found = entry.get("workers")
        if isinstance(found, list):
            workers += [w for w in found if isinstance(w, dict)]
    return workers


def _json(response: Any, method: str) -> Any:
    try:
        return json.loads(str(response.msg))
    except ValueError:
        raise RuntimeRejected(f"TorchServe's {method} answer is not JSON", code="INTERNAL") from None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str | float):
        with contextlib.suppress(ValueError):
            return int(value)
    return None


__all__ = [
    "CONFIG_FILE_NAME",
    "TorchServeConfig",
    "TorchServePlugin",
    "data_endpoint_target",
    "find_archive",
    "mar_file_name",
    "model_id_from_mar",
    "write_config",
]
