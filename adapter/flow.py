"""The one load / unload / size / status flow, for every runtime.

    loadModel -> turn for the model id -> LOADING_CONCURRENCY slot
              -> puller.pull (or the local model a standalone puller placed)
              -> plugin.layout -> plugin.load -> size

Unload runs the same steps backwards. Concurrent loads of one id with the same request
share one job; a load whose every caller went away is cancelled and leaves nothing
loaded; loads and unloads of one id run in arrival order (``adapter.sequencing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from adapter.errors import (
    InvalidRequest,
    LoadTimeout,
    ModelNotFound,
    NotImplementedByRuntime,
    RuntimeUnavailable,
    SidecarError,
)
from adapter.sequencing import Turn, TurnQueue, run_to_end
from puller.model_key import ModelKey, validate_model_id
from puller.request import LocalModel, PullRequest

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from adapter.plugin import RuntimePlugin
    from adapter.settings import Settings
    from puller.pull import Puller

log = structlog.get_logger(__name__)

#: how long a cancelled load waits for the runtime to finish the load it was sent,
#: so that it can be unloaded again
CANCEL_SETTLE_SECONDS = 60.0

#: seconds between two readiness checks of the runtime once it was READY
RUNTIME_WATCH_SECONDS = 2.0


@dataclass(frozen=True)
class LoadRequest:
    """A loadModel (or predictModelSize) request, validated."""

    model_id: str
    model_path: str
    model_type: str
    model_key: ModelKey
    model_key_text: str

    @classmethod
    def parse(cls, model_id: str, model_path: str, model_type: str, model_key: str) -> LoadRequest:
        """Validate the id and parse the key; raises ``InvalidModelId`` /
        ``InvalidModelKey`` before anything is attempted."""
        return cls(
            model_id=validate_model_id(model_id),
            model_path=model_path,
            model_type=model_type,
            model_key=ModelKey.parse(model_key),
            model_key_text=model_key,
        )

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.model_path, self.model_type, self.model_key_text)


@dataclass(frozen=True)
class LoadResult:
    size_bytes: int
    max_concurrency: int


@dataclass(frozen=True)
class RuntimeInfo:
    """What runtimeStatus reports."""

    ready: bool
    capacity_bytes: int
    max_loading_concurrency: int
    model_loading_timeout_ms: int
    default_model_size_bytes: int
    runtime_version: str
    method_infos: Mapping[str, Sequence[int]]
    limit_model_concurrency: bool


@dataclass
class _LoadJob:
    request: LoadRequest
    task: asyncio.Task[LoadResult] | None = None
    waiters: int = 0


@dataclass
class _Loaded:
    request: LoadRequest
    model: LocalModel
    size_bytes: int
    loaded_at: float = field(default_factory=time.monotonic)


class ModelFlow:
    """The load/unload/size/status semantics of the contract, over one runtime plugin
    and (with the embedded puller) one puller."""

    def __init__(self, settings: Settings, plugin: RuntimePlugin, puller: Puller | None) -> None:
        self.settings = settings
        self.plugin = plugin
        self.puller = puller
        self._turns = TurnQueue()
        self._jobs: dict[str, _LoadJob] = {}
        self._loaded: dict[str, _Loaded] = {}
        self._slots = asyncio.Semaphore(settings.loading_concurrency)
        self._purged = False
        self._purge_lock = asyncio.Lock()
        self._version: str | None = None
        #: set from when the runtime was seen down after READY until every model the
        #: mesh believes loaded was loaded into it again
        self._recovering = False
        self._check_runtime = asyncio.Event()

    # ---------------------------------------------------------------- status

    @property
    def purged(self) -> bool:
        """True once the leftovers were purged and READY was reported."""
        return self._purged

    async def runtime_status(self) -> RuntimeInfo:
        """STARTING (ready=False) until the runtime is ready; before the first READY,
        purge every model the runtime has loaded and every leftover directory. After
        READY, not ready while the runtime is down or its models are being loaded
        into it again (see :meth:`watch_runtime`)."""
        # once READY, "ready" is the runtime being there (is_alive): a server whose
        # readiness counts its models (one loading, one short of workers) still loads
        ready = await (self.plugin.is_alive() if self._purged else self.plugin.is_ready())
        if self._purged and (self._recovering or not ready):
            self._check_runtime.set()
            ready = False
        if ready and not self._purged:
            async with self._purge_lock:
                if not self._purged:
                    try:
                        await self._purge()
                    except SidecarError as exc:
                        log.warning("purge before READY failed; staying STARTING", error=str(exc))
                        ready = False
                    else:
                        self._purged = True
        if ready and self._version is None:
            self._version = await self.plugin.runtime_version() or self.settings.runtime_version
        return RuntimeInfo(
            ready=ready,
            capacity_bytes=self.settings.capacity_bytes,
            max_loading_concurrency=self.settings.loading_concurrency,
            model_loading_timeout_ms=self.settings.loadtime_timeout_ms,
            default_model_size_bytes=self.settings.default_modelsize,
            runtime_version=self._version or self.settings.runtime_version,
            method_infos=self.plugin.method_infos(),
            limit_model_concurrency=self.settings.limit_per_model_concurrency > 0,
        )

    async def _purge(self) -> None:
        started = time.monotonic()
        loaded = await self.plugin.list_models()
        # all at once: runtimes that batch (OVMS) then apply them in one reload
        results = await asyncio.gather(*(self.plugin.unload(m) for m in loaded), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ModelNotFound):
                raise result
        views = await asyncio.to_thread(self._purge_views)
        removed = await asyncio.to_thread(self.puller.purge) if self.puller is not None else []
        self._loaded.clear()
        log.info(
            "purged leftovers before READY",
            runtime_models=len(loaded),
            views=views,
            model_dirs=len(removed),
            seconds=round(time.monotonic() - started, 3),
        )

    def _purge_views(self) -> int:
        """Remove every view under the runtime's models folder: folders (through the
        plugin, which knows the safe order) and links (TorchServe's ``.mar`` links).
        Plain files are the runtime's own (TorchServe's config) and stay."""
        models_dir = self.plugin.models_dir
        if not models_dir.is_dir():
            models_dir.mkdir(parents=True, exist_ok=True)
            return 0
        with os.scandir(models_dir) as scan:
            entries = [e for e in scan if not e.name.startswith(".")]
        count = 0
        for entry in entries:
            if entry.is_symlink():
                Path(entry.path).unlink(missing_ok=True)
            elif entry.is_dir(follow_symlinks=False):
                self.plugin.remove_view(entry.name)
            else:
                continue
            count += 1
        return count

    # -------------------------------------------------------- runtime restarts

    async def watch_runtime(
        self,
        on_change: Callable[[bool], Awaitable[None]],
        interval: float = RUNTIME_WATCH_SECONDS,
    ) -> None:
        """Run until cancelled: once the runtime was READY, check it every ``interval``
        seconds (sooner when a call found it unreachable). When it stops answering,
        ``on_change(False)``; when it answers again, load every model the mesh
        believes loaded into it again (a restarted runtime has none), then
        ``on_change(True)``. A model that cannot be loaded again is dropped (its files
        too), so the mesh's next loadModel of it starts afresh."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_runtime.wait(), interval)
            self._check_runtime.clear()
            if not self._purged:
                continue
            try:
                ready = await self.plugin.is_alive()
            except SidecarError:
                ready = False
            if not ready and not self._recovering:
                self._recovering = True
                log.warning("runtime stopped answering; models will be loaded again when it is back")
                await on_change(False)
            elif ready and self._recovering:
                await self._reload_all()
                self._recovering = False
                await on_change(True)

    async def _reload_all(self) -> None:
        started = time.monotonic()
        entries = list(self._loaded.items())
        results = await asyncio.gather(*(self._reload(model_id, entry) for model_id, entry in entries))
        # a runtime that was only unreachable may still hold models unloaded meanwhile
        try:
            strays = [
                m for m in await self.plugin.list_models() if m not in self._loaded and m not in self._jobs
            ]
        except SidecarError as exc:
            log.warning("cannot list the runtime's models after it came back", error=str(exc))
            strays = []
        for model_id in strays:
            try:
                await self.plugin.unload(model_id)
            except SidecarError as exc:
                log.warning("cannot unload a model the mesh no longer has", model_id=model_id, error=str(exc))
        log.info(
            "runtime is back; models loaded again",
            models=sum(results),
            dropped=len(results) - sum(results),
            strays_unloaded=len(strays),
            seconds=round(time.monotonic() - started, 3),
        )

    async def _reload(self, model_id: str, entry: _Loaded) -> bool:
        """Load ``entry`` into the runtime again, in the model's turn; ``False`` when
        it could not be (it is then unloaded here)."""
        async with self._turns.take(model_id), self._slots:
            if self._loaded.get(model_id) is not entry:
                return True  # unloaded or replaced meanwhile: nothing to restore
            with structlog.contextvars.bound_contextvars(model_id=model_id):
                try:
                    async with asyncio.timeout(self.settings.loadtime_timeout_ms / 1000):
                        # layout replaces the old view (the plugin contract)
                        view = await run_to_end(asyncio.to_thread(self.plugin.layout, entry.model))
                        await self.plugin.load(model_id, view, entry.model)
                except (SidecarError, TimeoutError) as exc:
                    log.warning("model could not be loaded again; dropping it", error=str(exc))
                    await self._undo_steps(model_id, None)
                    return False
        return True

    # ------------------------------------------------------------------ load

    async def load(self, request: LoadRequest) -> LoadResult:
        """Load the model and return only when it is servable. A second call for the
        same id and the same request while the first runs shares its job; a job that
        is being cancelled (its every caller went away) is not joined: the new call
        starts its own, after the cancelled one has cleaned up."""
        while True:
            job = self._jobs.get(request.model_id)
            if job is None or job.request.identity != request.identity or _ending(job):
                job = _LoadJob(request)
                turn = self._turns.take(request.model_id)
                job.task = asyncio.create_task(self._run_load(job, turn), name=f"load {request.model_id}")
                self._jobs[request.model_id] = job
            assert job.task is not None
            job.waiters += 1
            try:
                return await asyncio.shield(job.task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling() == 0:
                    continue  # the job was cancelled, not this caller: start afresh
                if job.waiters == 1 and not job.task.done():
                    log.info("loadModel cancelled by the caller; cancelling the load")
                    job.task.cancel()
                raise
            finally:
                job.waiters -= 1

    async def _run_load(self, job: _LoadJob, turn: Turn) -> LoadResult:
        request = job.request
        try:
            with structlog.contextvars.bound_contextvars(model_id=request.model_id):
                async with turn, self._slots:
                    return await self._load_once(request)
        finally:
            if self._jobs.get(request.model_id) is job:
                del self._jobs[request.model_id]

    async def _load_once(self, request: LoadRequest) -> LoadResult:
        previous = self._loaded.get(request.model_id)
        if previous is not None and previous.request.identity == request.identity:
            log.info("model already loaded", size_bytes=previous.size_bytes)
            return self._result(previous.size_bytes)
        started = time.monotonic()
        timeout = self.settings.loadtime_timeout_ms / 1000
        runtime_load: asyncio.Task[int | None] | None = None
        try:
            async with asyncio.timeout(timeout):
                model = await self._obtain(request)
                view = await run_to_end(asyncio.to_thread(self.plugin.layout, model))
                runtime_load = asyncio.ensure_future(self.plugin.load(request.model_id, view, model))
                runtime_size = await asyncio.shield(runtime_load)
        except TimeoutError:
            await self._undo(request.model_id, runtime_load)
            raise LoadTimeout(
                f"loading model {request.model_id!r} did not finish within {timeout:g}s (LOADTIME_TIMEOUT)"
            ) from None
        except BaseException as exc:
            if isinstance(exc, RuntimeUnavailable):
                self._check_runtime.set()
            await self._undo(request.model_id, runtime_load)
            raise
        size = runtime_size if runtime_size is not None else self._size_from_disk(model.disk_size_bytes)
        self._loaded[request.model_id] = _Loaded(request, model, size)
        log.info(
            "model loaded",
            size_bytes=size,
            disk_size_bytes=model.disk_size_bytes,
            seconds=round(time.monotonic() - started, 3),
        )
        return self._result(size)

    async def _obtain(self, request: LoadRequest) -> LocalModel:
        if self.puller is not None:
            return await self.puller.pull(
                PullRequest(
                    model_id=request.model_id,
                    model_path=request.model_path,
                    model_key=request.model_key,
                    model_type=request.model_type,
                )
            )
        return await asyncio.to_thread(self._local_model, request)

    def _local_model(self, request: LoadRequest) -> LocalModel:
        """The model a standalone puller already placed: modelPath is local and must
        lie inside ROOT_MODEL_DIR."""
        root = self.settings.root_model_dir.resolve()
        path = Path(request.model_path)
        if not path.is_absolute():
            path = root / path
        # inside ROOT_MODEL_DIR once resolved, or as written (with ``..`` folded, not
        # followed): a model the standalone puller linked in place (pvc) resolves
        # elsewhere, but its path names a folder of ROOT_MODEL_DIR
        resolved = path.resolve()
        written = Path(os.path.normpath(path.absolute()))
        if not resolved.is_relative_to(root) and not written.is_relative_to(root):
            raise InvalidRequest(f"modelPath {request.model_path!r} is not inside ROOT_MODEL_DIR")
        if not path.exists():
            raise ModelNotFound(f"modelPath {request.model_path!r} does not exist")
        key = request.model_key
        size = key.disk_size_bytes if key.disk_size_bytes is not None else _disk_size(path)
        schema = Path(key.schema_path) if key.schema_path else None
        return LocalModel(
            model_id=request.model_id,
            path=path,
            disk_size_bytes=size,
            model_type=key.layout_type(request.model_type),
            schema_path=schema,
            model_key=key,
        )

    async def _undo(self, model_id: str, runtime_load: asyncio.Future[int | None] | None) -> None:
        """Leave nothing behind of a failed or cancelled load. Runs to the end even if
        the caller is cancelled again."""
        await run_to_end(self._undo_steps(model_id, runtime_load))

    async def _undo_steps(self, model_id: str, runtime_load: asyncio.Future[int | None] | None) -> None:
        if runtime_load is not None:
            # The runtime got the load: wait for it to settle, then take it back out.
            try:
                async with asyncio.timeout(CANCEL_SETTLE_SECONDS):
                    await asyncio.wait({runtime_load})
            except TimeoutError:
                log.warning("runtime load did not settle; unloading anyway")
            if runtime_load.done() and not runtime_load.cancelled():
                runtime_load.exception()  # the error, if any, was reported to the caller
            try:
                await self.plugin.unload(model_id)
            except (ModelNotFound, RuntimeUnavailable):
                pass
            except SidecarError as exc:
                log.warning("unload after failed load failed", error=str(exc))
        self._loaded.pop(model_id, None)
        await self._remove_files(model_id)

    async def _remove_files(self, model_id: str) -> None:
        """The runtime's view of the model and, with the embedded puller, its model
        directory: one worker-thread hop, run to its end even if the caller is
        cancelled. A small model directory is deleted first, in the event loop
        (:meth:`Puller.remove_if_small`: quicker than the hop it saves its thread)."""
        puller = self.puller
        left = puller if puller is not None and not puller.remove_if_small(model_id) else None

        def remove() -> None:
            self.plugin.remove_view(model_id)
            if left is not None:
                left.remove_now(model_id)

        await run_to_end(asyncio.to_thread(remove))

    # ---------------------------------------------------------------- unload

    async def unload(self, model_id: str) -> None:
        """Unload the model and delete its files; an unknown model is not an error."""
        validate_model_id(model_id)
        self._jobs.pop(model_id, None)  # a later load starts afresh
        turn = self._turns.take(model_id)
        async with turn:
            with structlog.contextvars.bound_contextvars(model_id=model_id):
                try:
                    await self.plugin.unload(model_id)
                except ModelNotFound:
                    log.info("runtime does not know the model; treating as unloaded")
                except RuntimeUnavailable:
                    if not self._recovering:
                        self._check_runtime.set()
                        raise
                    # the runtime is down: it holds nothing now, and what it still
                    # holds when it answers again is unloaded then (_reload_all)
                    log.info("runtime is down; unloading the model from the sidecar only")
                self._loaded.pop(model_id, None)
                await self._remove_files(model_id)
                log.info("model unloaded")

    # ----------------------------------------------------------------- sizes

    def _size_from_disk(self, disk_size: int) -> int:
        if disk_size <= 0:
            return self.settings.default_modelsize
        return math.ceil(disk_size * self.settings.multiplier)

    def _result(self, size: int) -> LoadResult:
        return LoadResult(size_bytes=size, max_concurrency=self.settings.limit_per_model_concurrency)

    async def model_size(self, model_id: str) -> int:
        """The runtime's measure of a loaded model, else disk size x multiplier."""
        validate_model_id(model_id)
        size = await self.plugin.model_size(model_id)
        if size:
            return size
        loaded = self._loaded.get(model_id)
        if loaded is None:
            raise ModelNotFound(f"model {model_id!r} is not loaded")
        return loaded.size_bytes or self.settings.default_modelsize

    async def predict_size(self, request: LoadRequest) -> int:
        """A fast, conservative size: the key's disk size, else the storage listing
        (embedded puller) within a short budget, else DEFAULT_MODELSIZE."""
        if request.model_key.disk_size_bytes is not None:
            return self._size_from_disk(request.model_key.disk_size_bytes)
        if self.puller is None:
            raise NotImplementedByRuntime("predictModelSize needs disk_size_bytes in the model key")
        size = await self.puller.predict_size(
            PullRequest(
                model_id=request.model_id,
                model_path=request.model_path,
                model_key=request.model_key,
                model_type=request.model_type,
            )
        )
        if size is None:
            return self.settings.default_modelsize
        return self._size_from_disk(size)

    # ------------------------------------------------------------- inventory

    def loaded_ids(self) -> list[str]:
        return list(self._loaded)

    def loaded_model(self, model_id: str) -> LocalModel | None:
        entry = self._loaded.get(model_id)
        return entry.model if entry is not None else None


def _ending(job: _LoadJob) -> bool:
    """True when ``job`` was cancelled (it is cleaning up, or done)."""
    task = job.task
    return task is not None and (task.cancelled() or task.cancelling() > 0)


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path, followlinks=True):
        for name in files:
            try:
                total += (Path(dirpath) / name).stat().st_size
            except OSError:
                continue
    return total
