"""The puller facade: the one entry point the adapter and the standalone puller use.

``Puller.pull`` resolves the storage config of a request, lists the model (the
backend's plan), fetches it with the engine into a staging directory under
``ROOT_MODEL_DIR/_tmp`` and renames it to ``ROOT_MODEL_DIR/<model_id>``, so a model
directory is complete or absent. Layout inside it (the contract's section 4)::

    ROOT_MODEL_DIR/<model_id>/<basename(model_path)>   the model (file or folder;
                                                       ``_model`` for an empty path)
    ROOT_MODEL_DIR/<model_id>/_schema.json             the schema, when the key names one

A ``pvc`` model (any backend with ``links_in_place``) is not copied: its location is a
symbolic link to the file or folder on the mounted claim.
"""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import structlog

from adapter.errors import InvalidRequest, SidecarError, StorageConfigError, StorageError, StorageNotFound
from adapter.settings import Settings
from puller.config import StorageConfigDirectory, resolve_storage
from puller.engine import FetchStats, PullEngine
from puller.model_key import ModelKey, validate_model_id
from puller.placement import (
    place_atomically,
    remove_tree,
    safe_relpath,
    staging_dir,
    staging_root,
    sweep_staging,
)
from puller.request import LocalModel, PullRequest
from puller.storage.base import Plan, Storage
from puller.storage.registry import StorageRegistry, known_types

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: the local name of a model whose path is empty or ``/``
DEFAULT_MODEL_NAME = "_model"
#: the local name of the schema file, beside the model
SCHEMA_FILE_NAME = "_schema.json"
#: how long predict_size may wait for a listing
PREDICT_BUDGET_SECONDS = 0.4


def local_model_name(model_path: str) -> str:
    """The name the model gets in its model directory: the last component of
    ``model_path`` (``_model`` when the path is empty or ``/``). Raises ``UnsafePath``
    when that component is ``.``, ``..`` or holds a NUL or a backslash."""
    trimmed = model_path.strip("/")
    if not trimmed:
        return DEFAULT_MODEL_NAME
    return safe_relpath(trimmed.rsplit("/", 1)[-1])


async def _run_to_end(future: Awaitable[T], on_cancel: Callable[[], None] | None = None) -> T:
    """Await ``future`` (a thread's work) to its end. If the caller is cancelled
    meanwhile, call ``on_cancel`` once, keep waiting until the thread has finished
    (so nothing keeps writing behind our back), then raise ``CancelledError``."""
    task = asyncio.ensure_future(future)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            if not cancelled and on_cancel is not None:
                on_cancel()
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller sees
        raise asyncio.CancelledError
    return task.result()


def _tree_size(path: str) -> int:
    """Bytes of the regular files at ``path`` (a file, or a folder walked without
    following links)."""
    top = Path(path)
    st = top.stat()
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    total = 0
    for folder, _dirs, files in os.walk(top):
        for name in files:
            entry = (Path(folder) / name).lstat()
            if stat.S_ISREG(entry.st_mode):
                total += entry.st_size
    return total


class Puller:
    """Pulls models into ``settings.root_model_dir``; safe for concurrent pulls of
    different model ids (serialising pulls of one id is the caller's job)."""

    def __init__(
        self,
        settings: Settings,
        configs: StorageConfigDirectory | None = None,
        *,
        registry: StorageRegistry | None = None,
        engine: PullEngine | None = None,
    ) -> None:
        """``configs``, ``registry`` and ``engine`` default to new ones built from
        ``settings``; ones passed in stay the caller's to start and stop."""
        self.settings = settings
        self.root = Path(settings.root_model_dir)
        self._owns_configs = configs is None
        self.configs = configs if configs is not None else StorageConfigDirectory.from_settings(settings)
        self._owns_registry = registry is None
        self.registry = registry if registry is not None else StorageRegistry()
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else PullEngine(settings)

    # --- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        """Create ROOT_MODEL_DIR when missing, remove leftovers of interrupted pulls
        (``_tmp``), and start watching the storage config (when it is ours)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create ROOT_MODEL_DIR {self.root}: {exc.strerror}") from None
        leftovers = sweep_staging(self.root)
        if leftovers:
            log.info("removed leftovers of interrupted pulls", count=len(leftovers))
        if self._owns_configs:
            self.configs.start()

    def close(self) -> None:
        """Stop what :meth:`start` started and release backends and worker threads."""
        if self._owns_configs:
            self.configs.stop()
        if self._owns_registry:
            self.registry.close()
        if self._owns_engine:
            self.engine.close()

    # --- paths ----------------------------------------------------------------------

    def model_dir(self, model_id: str) -> Path:
        """``ROOT_MODEL_DIR/<model_id>`` (``InvalidModelId`` for an unsafe id)."""
        return self.root / validate_model_id(model_id)

    # --- pull -----------------------------------------------------------------------

    def _storage_for(self, key: ModelKey) -> Storage:
        config = resolve_storage(key, self.configs, known_types())
        return self.registry.get(config, self.settings)

    async def pull(self, request: PullRequest) -> LocalModel:
        """Fetch the model of ``request`` to ``ROOT_MODEL_DIR/<model_id>``.

        On return the model directory is complete: the model at
        ``<model_id>/<basename(model_path)>`` (a file for a single object, a folder for
        a prefix, a link for a ``pvc``) and the schema at ``<model_id>/_schema.json``
        when the key names one; an older directory of the same id was replaced. On any
        error or cancellation no staging directory is left and the model directory is
        as it was before (absent, normally); worker threads have stopped before this
        returns or raises. Errors are :mod:`adapter.errors` types (``InvalidModelId``,
        ``UnsafePath`` for an object key leading outside the model, ``StorageConfigError``,
        ``StorageNotFound``...).
        """
        model_id = validate_model_id(request.model_id)
        key = request.model_key
        target = self.root / model_id
        local_name, size, _ = await self._pull_to(key, request.model_path, target, label=model_id[:48])
        return LocalModel(
            model_id=model_id,
            path=target / local_name,
            disk_size_bytes=size,
            model_type=key.layout_type(request.model_type),
            schema_path=target / SCHEMA_FILE_NAME if key.schema_path else None,
            model_key=key,
        )

    async def pull_into(self, key: ModelKey, model_path: str, dest: Path) -> dict[str, object]:
        """Fetch one model into the folder ``dest`` (anywhere; it must not exist or be
        empty), laid out as a model directory; for the ``mesh-puller pull`` command.
        Staged beside ``dest`` and renamed into place like :meth:`pull`. Returns what
        was done: ``path`` (the model), ``disk_size_bytes``, ``bytes``, ``files``,
        ``seconds``."""
        dest = await asyncio.to_thread(_prepare_destination, Path(dest))
        local_name, size, stats = await self._pull_to(
            key, model_path, dest, label=dest.name[:48], parent=dest.parent
        )
        return {
            "path": str(dest / local_name),
            "disk_size_bytes": size,
            "bytes": stats.bytes,
            "files": stats.files,
            "seconds": round(stats.seconds, 3),
        }

    async def _pull_to(
        self, key: ModelKey, model_path: str, target: Path, *, label: str, parent: Path | None = None
    ) -> tuple[str, int, FetchStats]:
        """Stage the model (and schema) of ``key``/``model_path`` and rename the staging
        folder to ``target``. Returns the model's local name, its bytes on disk and the
        fetch figures."""
        local_name = local_model_name(model_path)
        storage = await asyncio.to_thread(self._storage_for, key)
        started = time.monotonic()
        # one mkdir, in the loop: a cancellation cannot lose track of the directory
        staging = staging_dir(self.root, label, parent=parent)
        try:
            if storage.links_in_place:
                size = await _run_to_end(
                    asyncio.to_thread(
                        self._link_in_place, storage, model_path, key.schema_path, staging.path, local_name
                    )
                )
                stats = FetchStats(bytes=0, files=0, seconds=time.monotonic() - started)
            else:
                plan, size = await self._plan(storage, model_path, key.schema_path, local_name)
                stats = await self._fetch(storage, plan, staging.path)
            # renames only (no await): a cancellation cannot land between them
            place_atomically(staging.path, target)
        except BaseException:
            await _run_to_end(asyncio.to_thread(staging.remove))
            raise
        seconds = time.monotonic() - started
        log.info(
            "model pulled",
            storage=storage.identity(),
            bytes=stats.bytes,
            files=stats.files,
            seconds=round(seconds, 3),
            mb_per_s=round(stats.bytes / 1e6 / seconds, 1) if seconds > 0 else 0.0,
            linked=storage.links_in_place,
        )
        return local_name, size, FetchStats(bytes=stats.bytes, files=stats.files, seconds=seconds)

    async def _plan(
        self, storage: Storage, model_path: str, schema_path: str | None, local_name: str
    ) -> tuple[Plan, int]:
        """One plan for the model and its schema, relpaths below the model directory,
        every name checked; and the model's own byte count."""
        plan = await asyncio.to_thread(storage.plan, model_path)
        if plan.kind != "files":
            raise StorageError(
                f"the store gave a plan of kind '{plan.kind}', which this puller cannot lay out yet"
            )
        if plan.single_object:
            if len(plan.blobs) != 1:
                raise StorageError(
                    f"the store listed {len(plan.blobs)} objects for the single object '{model_path}'"
                )
            blobs = [replace(plan.blobs[0], relpath=local_name)]
        else:
            blobs = [replace(b, relpath=f"{local_name}/{safe_relpath(b.relpath)}") for b in plan.blobs]
        size = sum(b.size for b in blobs)
        if schema_path:
            schema = await asyncio.to_thread(storage.plan, schema_path)
            if not schema.single_object or len(schema.blobs) != 1:
                raise StorageNotFound(f"schema_path '{schema_path}' names a folder, not a file")
            blobs.append(replace(schema.blobs[0], relpath=SCHEMA_FILE_NAME))
        return Plan(blobs=tuple(blobs), single_object=False, kind=plan.kind), size

    async def _fetch(self, storage: Storage, plan: Plan, dest: Path) -> FetchStats:
        """Run the engine in a thread; on cancellation stop it and wait until every
        worker has stopped before re-raising."""
        cancel = threading.Event()
        return await _run_to_end(
            asyncio.to_thread(self.engine.fetch, storage, plan, dest, cancel), on_cancel=cancel.set
        )

    @staticmethod
    def _link_in_place(
        storage: Storage, model_path: str, schema_path: str | None, staging: Path, local_name: str
    ) -> int:
        """Link the model (and schema) into ``staging``; return the model's bytes."""
        source = storage.local_path(model_path)
        if source is None:
            raise StorageConfigError(f"storage {storage.identity()} links in place but gives no local path")
        (staging / local_name).symlink_to(source)
        if schema_path:
            schema = storage.local_path(schema_path)
            if schema is None or not Path(schema).is_file():
                raise StorageNotFound(f"schema_path '{schema_path}' is not a file on {storage.identity()}")
            (staging / SCHEMA_FILE_NAME).symlink_to(schema)
        return _tree_size(source)

    # --- size -----------------------------------------------------------------------

    async def predict_size(self, request: PullRequest) -> int | None:
        """A quick guess of the model's bytes on disk: the key's ``disk_size_bytes``
        when set, else the listing's total when the store answers within ~400 ms, else
        ``None`` (a slow or failing store is not an error here). ``InvalidRequest``
        errors (a malformed key or path) are raised."""
        if request.model_key.disk_size_bytes is not None:
            return request.model_key.disk_size_bytes

        def listing() -> int:
            return self._storage_for(request.model_key).plan(request.model_path).total_bytes

        try:
            return await asyncio.wait_for(asyncio.to_thread(listing), PREDICT_BUDGET_SECONDS)
        except InvalidRequest:
            raise
        except TimeoutError:
            log.debug("no size prediction: the listing took too long")
        except SidecarError as exc:
            log.debug("no size prediction", error=exc.message)
        return None

    # --- removal --------------------------------------------------------------------

    async def remove(self, model_id: str) -> None:
        """Delete ``ROOT_MODEL_DIR/<model_id>``; no error when it is absent. The
        directory disappears at once (renamed aside) and is deleted in a thread; a link
        (pvc) is removed, never followed."""
        target = self.model_dir(model_id)
        if not (target.is_symlink() or target.exists()):
            return
        try:
            # one mkdir and one rename, in the loop: the model is gone at once
            aside = Path(tempfile.mkdtemp(prefix="rm.", dir=staging_root(self.root))) / "removed"
            target.rename(aside)
        except FileNotFoundError:
            return
        except OSError:
            await asyncio.to_thread(remove_tree, target)
            return
        await _run_to_end(asyncio.to_thread(remove_tree, aside.parent))

    def purge(self) -> list[str]:
        """Remove every entry of ROOT_MODEL_DIR whose name does not start with ``_``
        (models of a previous life) and everything under ``_tmp``; return the names of
        the entries removed. Blocking: run it in a thread."""
        removed: list[str] = []
        try:
            entries = sorted(self.root.iterdir())
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.name.startswith("_"):
                continue
            remove_tree(entry)
            removed.append(entry.name)
        sweep_staging(self.root)
        return removed


def _prepare_destination(dest: Path) -> Path:
    """``dest`` made absolute, checked to be absent or an empty folder, its parent
    created."""
    dest = dest.absolute()
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise InvalidRequest(f"destination {dest} exists and is not an empty folder")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {dest.parent}: {exc.strerror}") from None
    return dest
