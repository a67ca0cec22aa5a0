"""The OpenVINO Model Server (OVMS) runtime plugin.

OVMS has no load or unload call. It serves the models listed in its multi-model config
file, ``{"model_config_list": [{"config": {"name": <modelId>, "base_path": <view>}}]}``,
and re-reads that file when asked by ``POST /v1/config/reload``. The answer (or, when
the reload reports an error, ``GET /v1/config``) gives every model's version states; a
load succeeded when a version of the model is ``AVAILABLE``. A failed version is left
``LOADING`` with an error code and message, which we pass on.

Where things are, as in the stock ``ovms-1.x`` ServingRuntime:

* RUNTIME_PORT is OVMS's REST port (``--rest_port=8888``, the runtime's
  ``runtimeManagementPort``); its gRPC port only carries the mesh's inference traffic.
* The config file is ``ROOT_MODEL_DIR/model_config_list.json``: OVMS is started with
  ``--config_path=/models/model_config_list.json --file_system_poll_wait_seconds=0``,
  so it reads the file only when we ask. :meth:`OVMSPlugin.prepare` writes an empty
  one before OVMS starts (OVMS refuses to start without it), and :meth:`~OVMSPlugin.start`
  reads an existing one back, so models of a previous adapter process are known and
  purged.

Every reload re-reads the whole file and rechecks every model, so loads and unloads
arriving close together are applied by one rewrite and one reload: a change opens a
batch that is applied :attr:`~OVMSPlugin.load_batch_window` after the first load, or
:attr:`~OVMSPlugin.unload_batch_window` after the first unload when the batch holds
only unloads; each caller then gets its own model's outcome.

The view of a model, ``_ovms_models/<modelId>/<version>/...``:

* the pulled directory has numeric subdirectories (and no others): the largest is
  linked as ``<version>``;
* a single ONNX file (the model path itself, or the only file of the directory)
  becomes ``1/model.onnx``; any other single file keeps its name under ``1/``;
* otherwise every entry of the pulled directory is linked under ``1/``.

A view is built beside its final place and renamed into it while no reload runs, so
OVMS reads a complete old view or a complete new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import json
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from adapter.errors import (
    DiskFull,
    InvalidRequest,
    ModelNotFound,
    RuntimeRejected,
    RuntimeUnavailable,
    SidecarError,
)
from adapter.plugin import RuntimePlugin, link, remove_tree, write_json_atomically
from puller.model_key import validate_model_id
from runtimes.kserve_v2 import V2_METHOD_INFOS

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.request import LocalModel

log = structlog.get_logger(__name__)

#: the multi-model config file, directly under ROOT_MODEL_DIR
CONFIG_FILE_NAME = "model_config_list.json"
#: the name OVMS finds a single ONNX model file under
ONNX_FILE_NAME = "model.onnx"
#: the version state of a servable model
AVAILABLE = "AVAILABLE"

#: most bytes of an OVMS answer that are read
_ANSWER_LIMIT = 16 * 1024 * 1024

_TFS_SERVICE = "tensorflow.serving.PredictionService"


@dataclass(frozen=True)
class VersionState:
    """One entry of a model's ``model_version_status`` in OVMS's config answer."""

    version: str
    state: str
    error_code: str
    error_message: str

    @property
    def live(self) -> bool:
        """Serving, or on its way to serving (not failed, not retired)."""
        return self.state == AVAILABLE or (
            self.state in ("START", "LOADING") and self.error_code in ("", "OK")
        )


def version_states(answer: Mapping[str, Any], model_id: str) -> list[VersionState]:
    """The version states of ``model_id`` in a ``/v1/config`` answer; empty when the
    answer does not name it. Entries of the wrong shape are skipped."""
    entry = answer.get(model_id)
    versions = entry.get("model_version_status") if isinstance(entry, dict) else None
    states = []
    for item in versions if isinstance(versions, list) else []:
        if not isinstance(item, dict):
            continue
        status = item.get("status")
        if not isinstance(status, dict):
            status = {}
        states.append(
            VersionState(
                version=str(item.get("version", "")),
                state=str(item.get("state", "")),
                error_code=str(status.get("error_code", "")),
                error_message=str(status.get("error_message", "")),
            )
        )
    return states


def load_error(answer: Mapping[str, Any], model_id: str) -> SidecarError | None:
    """``None`` when OVMS reports a version of ``model_id`` AVAILABLE, else the error
    the load fails with: OVMS's own code and message for a failed version."""
    states = version_states(answer, model_id)
    if any(s.state == AVAILABLE for s in states):
        return None
    if not states:
        return RuntimeRejected(
            f"OVMS reports no version of model {model_id!r} after the reload "
            "(no numeric version directory it could read?)",
            code="INTERNAL",
        )
    # the version that failed, else the newest (a model whose versions all retired)
    failed = next((s for s in states if s.error_code not in ("", "OK")), states[-1])
    # OVMS's error codes are gRPC status names; anything else reaches the mesh as UNKNOWN
    code = failed.error_code if failed.error_code not in ("", "OK") else "UNKNOWN"
    detail = failed.error_message or failed.error_code or "no message"
    return RuntimeRejected(
        f"OVMS could not load model {model_id!r}: version {failed.version} is {failed.state} ({detail})",
        code=code,
    )


class OVMSRestClient:
    """OVMS's REST API at ``host:port``: blocking calls, run them in a worker thread.
    Connection failures are ``RuntimeUnavailable``; an answer that is not JSON is
    ``RuntimeRejected`` (INTERNAL). Never goes through a proxy."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host.strip("[]")
        self.port = port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def call(self, method: str, path: str, timeout: float) -> tuple[int, Any]:
        """Send ``method path`` with an empty body; return the status and the JSON
        answer (``None`` for an empty one)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=b"" if method == "POST" else None)
            response = connection.getresponse()
            body = response.read(_ANSWER_LIMIT)
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise RuntimeUnavailable(f"OVMS at {self.address} cannot be reached ({reason})") from None
        finally:
            connection.close()
        if not body.strip():
            return response.status, None
        try:
            return response.status, json.loads(body)
        except ValueError:
            raise RuntimeRejected(
                f"OVMS answered {method} {path} with HTTP {response.status} and a body that is not JSON",
                code="INTERNAL",
            ) from None


@dataclass
class _Change:
    """One load (``base_path`` set) or unload waiting for the next reload."""

    model_id: str
    base_path: str | None
    outcome: asyncio.Future[None]


class OVMSPlugin(RuntimePlugin):
    """OpenVINO Model Server driven through its config file and REST API."""

    name: ClassVar[str] = "ovms"

    #: seconds a batch stays open after its first load
    load_batch_window: ClassVar[float] = 0.1
    #: seconds a batch holding only unloads stays open
    unload_batch_window: ClassVar[float] = 3.0
    #: seconds for the readiness probe (runtimeStatus is polled every 2 s)
    status_timeout: ClassVar[float] = 2.0
    #: seconds for reading the config status and the server metadata
    call_timeout: ClassVar[float] = 10.0
    #: the config file's name under ROOT_MODEL_DIR
    config_file_name: ClassVar[str] = CONFIG_FILE_NAME

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.rest = OVMSRestClient(settings.runtime_host, settings.management_port)
        self._config: dict[str, str] = {}  # the models OVMS should serve: id -> base_path
        self._pending: dict[str, _Change] = {}
        self._batch: asyncio.Task[None] | None = None
        self._deadline = 0.0
        self._deadline_moved = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._disk_lock = threading.Lock()  # config writes + reloads vs. view swaps

    @property
    def config_file(self) -> Path:
        return self.settings.root_model_dir / self.config_file_name

    @property
    def configured(self) -> dict[str, str]:
        """The models the config file lists, or will after the next reload: id ->
        base_path."""
        return dict(self._config)

    @property
    def reload_timeout(self) -> float:
        """Seconds a reload may take: OVMS loads the new models before answering."""
        return self.settings.loadtime_timeout_ms / 1000

    # --- life cycle ---------------------------------------------------------------------

    def prepare(self) -> None:
        """Write an empty config file when there is none: OVMS does not start without."""
        if not self.config_file.exists():
            self._write_config({})

    async def start(self) -> None:
        """Read back the config file a previous adapter process left (its models are
        purged before the first READY) and remove half-built views."""
        self._config = await asyncio.to_thread(self._read_config)
        await asyncio.to_thread(self._sweep_staging)

    async def close(self) -> None:
        """Apply the open batch at once, so that no caller is left waiting."""
        batch = self._batch
        if batch is not None and not batch.done():
            self._move_deadline(0.0)
            await asyncio.wait({batch})

    # --- status -------------------------------------------------------------------------

    async def is_ready(self) -> bool:
        """OVMS answers ``GET /v1/config``."""
        try:
            status, answer = await asyncio.to_thread(self.rest.call, "GET", "/v1/config", self.status_timeout)
        except SidecarError:
            return False
        return status == 200 and isinstance(answer, dict)

    async def runtime_version(self) -> str | None:
        """The version in OVMS's KServe v2 server metadata (``GET /v2``), ``None``
        when it gives none."""
        try:
            status, answer = await asyncio.to_thread(self.rest.call, "GET", "/v2", self.call_timeout)
        except SidecarError as exc:
            log.debug("OVMS server metadata not available", error=str(exc))
            return None
        version = answer.get("version") if status == 200 and isinstance(answer, dict) else None
        return version if isinstance(version, str) and version else None

    def method_infos(self) -> Mapping[str, Sequence[int]]:
        """TF Serving's Predict (model name in ``model_spec.name``: fields 1, 1) and
        the KServe v2 ModelInfer and ModelMetadata (field 1)."""
        return {f"{_TFS_SERVICE}/Predict": (1, 1), **V2_METHOD_INFOS}

    async def _config_answer(self) -> dict[str, Any]:
        status, answer = await asyncio.to_thread(self.rest.call, "GET", "/v1/config", self.call_timeout)
        if status != 200 or not isinstance(answer, dict):
            raise RuntimeRejected(f"OVMS answered GET /v1/config with HTTP {status}", code="INTERNAL")
        return answer

    async def list_models(self) -> list[str]:
        """The models in the config we manage, and every model OVMS reports serving or
        loading (``GET /v1/config``)."""
        answer = await self._config_answer()
        live = {name for name in answer if any(s.live for s in version_states(answer, name))}
        return sorted(live | set(self._config))

    # --- load / unload ------------------------------------------------------------------

    async def load(self, model_id: str, view: Path, model: LocalModel) -> int | None:
        """Add the model to the config and return when the reload that applied it
        reports a version AVAILABLE; ``RuntimeRejected`` with OVMS's code and message
        otherwise. Returns ``None``: OVMS does not report sizes."""
        await asyncio.shield(self._submit(model_id, str(view)))
        return None

    async def unload(self, model_id: str) -> None:
        """Remove the model from the config and return when the reload that applied it
        answered. ``ModelNotFound`` when neither the config nor OVMS has the model."""
        if model_id not in self._config and model_id not in self._pending:
            try:
                answer = await self._config_answer()
            except RuntimeUnavailable:
                answer = {}  # not in our config: a restarted OVMS will not have it
            if not any(s.live for s in version_states(answer, model_id)):
                raise ModelNotFound(f"OVMS does not serve model {model_id!r}")
        await asyncio.shield(self._submit(model_id, None))

    def _submit(self, model_id: str, base_path: str | None) -> asyncio.Future[None]:
        """Record the change in the config at once and join it to the open batch (or
        open one). A same change still waiting is shared; a different one is
        superseded (ABORTED)."""
        loop = asyncio.get_running_loop()
        earlier = self._pending.get(model_id)
        if earlier is not None and not earlier.outcome.done():
            if earlier.base_path == base_path:
                return earlier.outcome
            earlier.outcome.set_exception(
                RuntimeRejected(
                    f"the change to model {model_id!r} was superseded before OVMS applied it",
                    code="ABORTED",
                )
            )
        if base_path is None:
            self._config.pop(model_id, None)
        else:
            self._config[model_id] = base_path
        change = _Change(model_id, base_path, loop.create_future())
        change.outcome.add_done_callback(_retrieve)
        self._pending[model_id] = change
        window = self.load_batch_window if base_path is not None else self.unload_batch_window
        if self._batch is None:
            self._deadline = loop.time() + window
            self._batch = loop.create_task(self._apply_batch_when_due(), name="ovms config reload")
        else:
            self._move_deadline(window)
        return change.outcome

    def _move_deadline(self, window: float) -> None:
        deadline = asyncio.get_running_loop().time() + window
        if deadline < self._deadline:
            self._deadline = deadline
            self._deadline_moved.set()

    async def _apply_batch_when_due(self) -> None:
        loop = asyncio.get_running_loop()
        while (delay := self._deadline - loop.time()) > 0:
            self._deadline_moved.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._deadline_moved.wait()
        async with self._reload_lock:
            # changes that arrived while an earlier reload ran belong to this batch too
            batch, self._pending, self._batch = self._pending, {}, None
            answer: dict[str, Any] | None = None
            error: SidecarError | None = None
            try:
                answer = await asyncio.to_thread(self._write_and_reload, dict(self._config))
            except SidecarError as exc:
                error = exc
            finally:
                for change in batch.values():
                    self._settle(change, answer, error)
        log.info(
            "OVMS config reloaded",
            loads=sum(c.base_path is not None for c in batch.values()),
            unloads=sum(c.base_path is None for c in batch.values()),
            models=len(self._config),
            error=str(error) if error else None,
        )

    def _settle(self, change: _Change, answer: Mapping[str, Any] | None, error: SidecarError | None) -> None:
        if change.outcome.done():
            return
        if answer is None:
            error = error or RuntimeUnavailable("the OVMS config reload was interrupted")
        elif change.base_path is not None:
            error = load_error(answer, change.model_id)
        if error is None:
            change.outcome.set_result(None)
            return
        if change.base_path is not None and self._config.get(change.model_id) == change.base_path:
            del self._config[change.model_id]  # a failed load leaves the config
        change.outcome.set_exception(error)

    def _write_and_reload(self, config: Mapping[str, str]) -> dict[str, Any]:
        """Write ``config`` and have OVMS apply it; return the model states. Blocking."""
        with self._disk_lock:
            self._write_config(config)
            status, answer = self.rest.call("POST", "/v1/config/reload", self.reload_timeout)
        if status in (200, 201) and isinstance(answer, dict):
            return answer
        # a model failed (or the file was refused): the states are in GET /v1/config
        reason = answer.get("error") if isinstance(answer, dict) else None
        log.info("OVMS reported an error on reload", status=status, error=reason)
        status_after, states = self.rest.call("GET", "/v1/config", self.call_timeout)
        if status_after == 200 and isinstance(states, dict):
            return states
        raise RuntimeRejected(
            f"OVMS config reload failed (HTTP {status}: {reason or 'no message'}) "
            f"and its model states cannot be read (HTTP {status_after})",
            code="INTERNAL",
        )

    # --- config file --------------------------------------------------------------------

    def _write_config(self, config: Mapping[str, str]) -> None:
        document = {
            "model_config_list": [
                {"config": {"name": name, "base_path": base_path}} for name, base_path in config.items()
            ]
        }
        try:
            write_json_atomically(self.config_file, document)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(f"no space left to write the OVMS config file {self.config_file}") from None
            raise RuntimeRejected(
                f"cannot write the OVMS config file {self.config_file}: {exc.strerror}", code="INTERNAL"
            ) from None

    def _read_config(self) -> dict[str, str]:
        """The models of an existing config file; ``{}`` (and a warning) when it is
        missing or not readable."""
        try:
            document = json.loads(self.config_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring an unreadable OVMS config file", path=str(self.config_file), error=str(exc))
            return {}
        entries = document.get("model_config_list") if isinstance(document, dict) else None
        config: dict[str, str] = {}
        for entry in entries if isinstance(entries, list) else []:
            model = entry.get("config") if isinstance(entry, dict) else None
            if isinstance(model, dict):
                name, base_path = model.get("name"), model.get("base_path")
                if isinstance(name, str) and isinstance(base_path, str):
                    config[name] = base_path
        return config

    # --- layout -------------------------------------------------------------------------

    def layout(self, model: LocalModel) -> Path:
        """Build ``_ovms_models/<modelId>/<version>/`` for ``model`` and return the
        view (the model's ``base_path``). ``InvalidRequest`` for a missing model path
        or an empty model directory. Writes only inside ``_ovms_models``."""
        model_id = validate_model_id(model.model_id)
        source = model.path.absolute()
        if not source.exists():
            raise InvalidRequest(f"model path {source} does not exist")
        links = view_links(source, model.model_type)
        view = self.view_dir(model_id)
        staging = self.models_dir / f".staging-{uuid.uuid4().hex}"
        try:
            for relative, target in links:
                link(target, staging / relative)
            staging.mkdir(parents=True, exist_ok=True)
            self._swap_in(staging, view)
        except BaseException:
            remove_tree(staging)
            raise
        return view

    def _swap_in(self, staging: Path, view: Path) -> None:
        """Rename ``staging`` to ``view``, never while a reload runs."""
        retired = None
        with self._disk_lock:
            if view.is_symlink() or view.exists():
                retired = view.with_name(f".retired-{uuid.uuid4().hex}")
                view.rename(retired)
            staging.rename(view)
        if retired is not None:
            remove_tree(retired)

    def remove_view(self, model_id: str) -> None:
        with self._disk_lock:
            remove_tree(self.view_dir(model_id))

    def _sweep_staging(self) -> None:
        if not self.models_dir.is_dir():
            return
        for entry in self.models_dir.iterdir():
            if entry.name.startswith((".staging-", ".retired-")):
                remove_tree(entry)


def view_links(source: Path, model_type: str) -> list[tuple[Path, Path]]:
    """The links of a model's view: (path inside the view, pulled file or directory).
    See the module docstring for the rules. ``InvalidRequest`` for an empty directory."""
    onnx = model_type.split(":", 1)[0].strip().lower() == "onnx"
    if source.is_file():
        name = ONNX_FILE_NAME if onnx or source.suffix.lower() == ".onnx" else source.name
        return [(Path("1", name), source)]
    entries = sorted(source.iterdir())
    if not entries:
        raise InvalidRequest(f"model directory {source} is empty")
    version = largest_version(entries)
    if version is not None:
        return [(Path(version.name), version)]
    if len(entries) == 1 and entries[0].is_file() and entries[0].suffix.lower() == ".onnx":
        return [(Path("1", ONNX_FILE_NAME), entries[0])]
    return [(Path("1", entry.name), entry) for entry in entries]


def largest_version(entries: Sequence[Path]) -> Path | None:
    """The numeric subdirectory with the largest number, when every subdirectory is a
    positive number (files beside them are ignored); else ``None``."""
    versions = [e for e in entries if e.is_dir()]
    if not versions or not all(e.name.isdigit() and int(e.name) > 0 for e in versions):
        return None
    return max(versions, key=lambda e: int(e.name))


def _retrieve(outcome: asyncio.Future[None]) -> None:
    """Mark an outcome's error as seen: its caller may have gone away."""
    if not outcome.cancelled():
        outcome.exception()
