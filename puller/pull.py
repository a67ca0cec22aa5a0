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

Archives: when the model path names one object that is an archive (``.tar``,
``.tar.gz``/``.tgz``, ``.zip``), it is unpacked in place, unless the storage config
entry says ``"unpack": false``. The model is then the folder
``ROOT_MODEL_DIR/<model_id>/<basename without the archive suffix>`` holding the
archive's top level (so ``model-settings.json`` at the top of ``mnist.tar.gz`` is at
``<model_id>/mnist/model-settings.json``); when the archive's only top-level entry is a
folder of that same name (``tar czf mnist.tar.gz mnist/``) that folder is the model, so
the path never reads ``mnist/mnist``. Its size on disk is the bytes unpacked, at most
``ARCHIVE_MAX_BYTES``; the archive file itself is not kept in the model directory.

Content cache (``CACHE_MAX_BYTES`` > 0, :mod:`puller.cache`): the listing always goes
to the store, so a changed object is seen; each listed blob whose (storage identity,
name, version) is cached is hard-linked into the staging directory instead of
fetched, and the blobs fetched are added to the cache once the fetch succeeded. For an
archive the cache holds the archive blob, not the unpacked tree: a cached reload skips
the network but unpacks again (the tree is then private to the model, so a runtime
writing into it cannot touch another model's files). ``pull_into`` (a destination
outside ROOT_MODEL_DIR) does not use the cache.

Image layers (a plan of kind ``layers``: ``oci://`` ModelCar images, ModelKits,
ModelPacks): the layers are applied by :func:`puller.layers.apply_layers` (parallel,
verified against their digests, streamed into place, whiteouts applied) into
``ROOT_MODEL_DIR/<model_id>/<image name>``, where the image name is the last path
segment of the repository without its tag or digest (``oci://ghcr.io/org/resnet:v1``
and ``.../resnet@sha256:...`` -> ``resnet``; ``_model`` when nothing usable is left).
For a ModelCar image the folder holds what the image keeps under ``/models``. A
``schema_path`` names a file inside that folder (the image's own schema), linked to
``_schema.json``. With the cache on, unpacked layers are cached by digest (see
:mod:`puller.layers`); the ``model pulled`` line carries ``source`` (the image
reference with its resolved digest) and ``layers``.

Observability: one ``model pulled`` log line per pull (bytes fetched, files, seconds,
MB/s, cache hits and bytes served from the cache), ``pull progress`` lines every few
seconds while bytes are fetched, and the Prometheus metrics of :mod:`puller.metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import structlog

from adapter.errors import (
    InvalidRequest,
    SidecarError,
    StorageConfigError,
    StorageError,
    StorageNotFound,
    UnsafePath,
)
from adapter.sequencing import run_to_end
from adapter.settings import Settings
from puller.archive import is_archive, unpack_archive
from puller.cache import Checkout, ContentCache, link_or_copy
from puller.cancel import PullCancel, run_watching
from puller.config import StorageConfig, StorageConfigDirectory, resolve_storage
from puller.engine import INLINE_MAX_BYTES, INLINE_MAX_PARTS, FetchCancelled, FetchStats, Progress, PullEngine
from puller.layers import LayerStats, apply_layers
from puller.metrics import UNKNOWN_BACKEND, PullMetrics, PullProgress, default_metrics
from puller.model_key import ModelKey, validate_model_id
from puller.placement import (
    STAGING_DIR_NAME,
    first_link_outside,
    place_atomically,
    remove_tree,
    safe_join,
    safe_relpath,
    staging_dir,
    staging_root,
    sweep_staging,
)
from puller.request import LocalModel, PullRequest
from puller.storage.base import Blob, Plan, Storage
from puller.storage.registry import StorageRegistry, known_types

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: the local name of a model whose path is empty or ``/``
DEFAULT_MODEL_NAME = "_model"
#: the local name of the schema file, beside the model
SCHEMA_FILE_NAME = "_schema.json"
#: how long predict_size may wait for a listing
PREDICT_BUDGET_SECONDS = 0.4
#: seconds between two progress lines of a running fetch
PROGRESS_INTERVAL_SECONDS = 5.0
#: archive suffixes removed from the name of an unpacked model, longest first
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
#: values of a storage config's ``unpack`` field that turn unpacking off
_NO = frozenset({"false", "0", "no", "off"})


def local_model_name(model_path: str) -> str:
    """The name the model gets in its model directory: the last component of
    ``model_path`` (``_model`` when the path is empty or ``/``). Raises ``UnsafePath``
    when that component is ``.``, ``..`` or holds a NUL or a backslash."""
    trimmed = model_path.strip("/")
    if not trimmed:
        return DEFAULT_MODEL_NAME
    return safe_relpath(trimmed.rsplit("/", 1)[-1])


def image_model_name(reference: str) -> str:
    """The local name of a model pulled from an image reference: the last path segment
    of the repository without its tag or digest (``org/resnet:v1``,
    ``registry:5000/org/resnet@sha256:...`` and ``oci://host/resnet`` all give
    ``resnet``); ``_model`` when nothing usable is left (or it would be the schema's
    name)."""
    name = reference.strip().split("://", 1)[-1].split("@", 1)[0].strip("/")
    name = name.rsplit("/", 1)[-1].split(":", 1)[0]
    if name in ("", ".", "..", SCHEMA_FILE_NAME) or "\\" in name or "\x00" in name:
        return DEFAULT_MODEL_NAME
    return name


def archive_model_name(archive_name: str) -> str:
    """The local name of the folder an archive unpacks to: ``archive_name`` without
    its archive suffix (``mnist.tar.gz`` -> ``mnist``), or without its last extension
    for another kind of archive; ``_model`` when nothing would be left or the name
    would be the schema's."""
    lowered = archive_name.lower()
    stem = next(
        (archive_name[: -len(sfx)] for sfx in ARCHIVE_SUFFIXES if lowered.endswith(sfx)),
        archive_name.rsplit(".", 1)[0] if "." in archive_name else "",
    )
    if stem in ("", ".", "..", SCHEMA_FILE_NAME):
        return DEFAULT_MODEL_NAME
    return stem


def unpack_enabled(config: StorageConfig) -> bool:
    """False when the storage config entry says ``"unpack": false`` (or ``"false"``,
    ``"0"``, ``"no"``, ``"off"``); archives are unpacked otherwise."""
    value = config.get("unpack")
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in _NO


@dataclass(frozen=True)
class _Layout:
    """How a model lands in its staging folder: the blobs (relpaths below the model
    directory), the model's own bytes, and, for an archive to unpack, the relpath of
    the archive file and the name of the folder it unpacks to."""

    plan: Plan
    model_bytes: int
    archive: str | None = None
    unpack_to: str = ""


@dataclass
class _Found:
    """What :meth:`Puller._open` found, for the rest of the pull and its metrics."""

    backend: str = UNKNOWN_BACKEND
    storage: Storage | None = None
    object_path: str = ""
    local_name: str = ""
    plan: Plan | None = None
    layout: _Layout | None = None
    #: set (under ``lock``) once the thread writes into the staging folder: from then
    #: on a cancelled pull waits for it; before, it is abandoned (a listing that
    #: stalls in a vendor SDK cannot be interrupted, and writes nothing)
    writing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start_writing(self, cancel: threading.Event) -> None:
        """Called by the thread before its first write; raises ``FetchCancelled``
        when the pull was cancelled (and so abandoned) meanwhile."""
        with self.lock:
            if cancel.is_set():
                raise FetchCancelled("the pull was cancelled")
            self.writing = True


@dataclass(frozen=True)
class _Fetched:
    """What filling a staging folder did: the engine's figures (bytes from the store),
    the blobs (or image layers) served from the cache, and for an image, what it was
    resolved to and its layer count (extra fields of the ``model pulled`` line)."""

    stats: FetchStats
    cache_hits: int = 0
    cache_bytes: int = 0
    extra: dict[str, object] = field(default_factory=dict)


#: what staging did: the fill's figures, the model's local name, its bytes on disk
_Staged = tuple[_Fetched, str, int]


async def _abandon_unless_writing(work: Awaitable[T], found: _Found, cancel: threading.Event) -> T:
    """Await ``work`` (a thread running :meth:`Puller._open`). If the caller is
    cancelled meanwhile, set ``cancel``; then, when the thread has started writing,
    wait until it has finished (:func:`~adapter.sequencing.run_to_end`), otherwise let
    it run out on its own (it writes nothing once ``cancel`` is set) and raise at once."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with found.lock:
            cancel.set()
            writing = found.writing
        if writing:
            with contextlib.suppress(Exception):
                await run_to_end(task)
        else:
            task.add_done_callback(_retrieve)
        raise


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned thread's outcome as seen (its error is no one's to report)."""
    if not task.cancelled():
        task.exception()


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
        metrics: PullMetrics | None = None,
        progress_interval: float = PROGRESS_INTERVAL_SECONDS,
    ) -> None:
        """``configs``, ``registry`` and ``engine`` default to new ones built from
        ``settings``; ones passed in stay the caller's to start and stop. ``metrics``
        defaults to the process-wide :func:`~puller.metrics.default_metrics`. With
        ``settings.cache_max_bytes`` > 0 the content cache is on (opened by
        :meth:`start`)."""
        self.settings = settings
        self.root = Path(settings.root_model_dir)
        self._owns_configs = configs is None
        self.configs = configs if configs is not None else StorageConfigDirectory.from_settings(settings)
        self._owns_registry = registry is None
        self.registry = registry if registry is not None else StorageRegistry()
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else PullEngine(settings)
        self.metrics = metrics if metrics is not None else default_metrics()
        self.progress_interval = progress_interval
        self.cache = (
            ContentCache(self.root, settings.cache_max_bytes, metrics=self.metrics)
            if settings.cache_max_bytes > 0
            else None
        )
        #: ids of the small model directories this puller placed (remove_if_small)
        self._small: set[str] = set()

    # --- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        """Create ROOT_MODEL_DIR when missing, remove leftovers of interrupted pulls
        (``_tmp``), open the content cache when it is on (sweeping its half-written
        entries and rebuilding its index), and start watching the storage config (when
        it is ours)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create ROOT_MODEL_DIR {self.root}: {exc.strerror}") from None
        leftovers = sweep_staging(self.root)
        if leftovers:
            log.info("removed leftovers of interrupted pulls", count=len(leftovers))
        if self.cache is not None:
            self.cache.open()
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

    def _config_for(self, key: ModelKey) -> StorageConfig:
        """The storage config ``key`` resolves to (``StorageConfigError`` if none)."""
        return resolve_storage(key, self.configs, known_types())

    def _storage_for(self, key: ModelKey) -> Storage:
        """The backend for ``key``'s storage config."""
        return self.registry.get(self._config_for(key), self.settings)

    async def pull(self, request: PullRequest) -> LocalModel:
        """Fetch the model of ``request`` to ``ROOT_MODEL_DIR/<model_id>``.

        On return the model directory is complete: the model at
        ``<model_id>/<basename(model_path)>`` (a file for a single object, a folder for
        a prefix, a link for a ``pvc``; for an archive, the folder it unpacked to; for
        an image, ``<model_id>/<image name>``, see the module's notes) and the schema at
        ``<model_id>/_schema.json`` when the key names one; an older directory of the
        same id was replaced. On any
        error or cancellation no staging directory is left and the model directory is
        as it was before (absent, normally); worker threads have stopped before this
        returns or raises. Errors are :mod:`adapter.errors` types (``InvalidModelId``,
        ``UnsafePath`` for an object key or archive entry leading outside the model,
        ``StorageConfigError``, ``StorageNotFound``, ``ArchiveTooLarge`` and
        ``BadArchive`` from :mod:`puller.archive`, ``IntegrityError`` for an image
        layer whose digest is wrong...).
        """
        model_id = validate_model_id(request.model_id)
        key = request.model_key
        target = self.root / model_id
        self._small.discard(model_id)
        local_name, size, _, small = await self._pull_to(key, request.model_path, target, label=model_id[:48])
        if small:
            self._small.add(model_id)
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
        local_name, size, stats, _ = await self._pull_to(
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
    ) -> tuple[str, int, FetchStats, bool]:
        """Stage the model (and schema) of ``key``/``model_path`` and rename the staging
        folder to ``target``. Returns the model's local name, its bytes on disk, the
        fetch figures, and whether the model is small (see :meth:`remove_if_small`).
        Records the pull in the metrics (a failure by its error class; a cancellation
        is not a failure).

        One worker-thread hop resolves the storage, lists the model and, for a small
        model (at most ``INLINE_MAX_BYTES``, no archive, no image), fills the staging
        folder too; bigger models are filled by the engine's pool with progress lines."""
        started = time.monotonic()
        use_cache = self.cache is not None and self.cache.is_open and parent is None
        found = _Found()
        try:
            # one mkdir, in the loop: a cancellation cannot lose track of the directory
            staging = staging_dir(self.root, label, parent=parent)
            try:
                cancel = PullCancel()
                progress = PullProgress(None)  # the total is known once listed
                opening = functools.partial(self._open, use_cache=use_cache, cancel=cancel, progress=progress)
                with progress.reporting(self.progress_interval):
                    staged = await _abandon_unless_writing(
                        asyncio.to_thread(
                            run_watching,
                            cancel,
                            opening,
                            found,
                            key,
                            model_path,
                            staging.path,
                        ),
                        found,
                        cancel,
                    )
                # filled in that one hop: at most INLINE_MAX_BYTES, no archive, no image
                laid_out = found.layout
                small = (
                    staged is not None
                    and laid_out is not None
                    and len(laid_out.plan.blobs) <= INLINE_MAX_PARTS
                )
                if staged is None:
                    staged = await self._stage(found, key.schema_path, staging.path, use_cache=use_cache)
                # renames only (no await): a cancellation cannot land between them
                place_atomically(staging.path, target)
            except BaseException:
                await run_to_end(asyncio.to_thread(staging.remove))
                raise
        except Exception as exc:
            self.metrics.pull_failed(found.backend, exc)
            raise
        fetched, local_name, size = staged
        storage = found.storage
        assert storage is not None
        seconds = time.monotonic() - started
        stats = fetched.stats
        self.metrics.pull_succeeded(found.backend, seconds, stats.bytes)
        self.metrics.cache_served(fetched.cache_hits, fetched.cache_bytes)
        log.info(
            "model pulled",
            storage=storage.identity(),
            bytes=stats.bytes,
            files=stats.files,
            seconds=round(seconds, 3),
            mb_per_s=round(stats.bytes / 1e6 / seconds, 1) if seconds > 0 else 0.0,
            cache_hits=fetched.cache_hits,
            bytes_from_cache=fetched.cache_bytes,
            linked=storage.links_in_place,
            **fetched.extra,
        )
        return local_name, size, FetchStats(bytes=stats.bytes, files=stats.files, seconds=seconds), small

    def _open(
        self,
        found: _Found,
        key: ModelKey,
        model_path: str,
        staging: Path,
        *,
        use_cache: bool,
        cancel: threading.Event,
        progress: PullProgress,
    ) -> _Staged | None:
        """In a worker thread: resolve the storage, then link a ``pvc`` model in place,
        or list the model and lay it out; a small model is fetched here too. Returns
        what was staged, or ``None`` when :meth:`_stage` is to finish (what was found
        is in ``found``)."""
        config = self._config_for(key)
        found.backend = config.type
        storage = found.storage = self.registry.get(config, self.settings)
        # named after the object, not the whole path: a query string may hold a token
        found.object_path = storage.object_path(model_path)
        local_name = found.local_name = local_model_name(found.object_path)
        if storage.links_in_place:
            started = time.monotonic()
            found.start_writing(cancel)
            size = self._link_in_place(storage, model_path, key.schema_path, staging, local_name)
            linked = _Fetched(FetchStats(bytes=0, files=0, seconds=time.monotonic() - started))
            return linked, local_name, size
        plan = found.plan = storage.plan(model_path)
        if plan.kind == "layers":
            return None
        layout = found.layout = self._layout(storage, plan, model_path, key.schema_path, local_name)
        if layout.archive is not None or layout.plan.total_bytes > INLINE_MAX_BYTES:
            return None
        found.start_writing(cancel)
        progress.total_bytes = layout.plan.total_bytes
        fetched = self._fill_here(
            storage, layout.plan, staging, use_cache=use_cache, cancel=cancel, progress=progress.add
        )
        return fetched, local_name, layout.model_bytes

    async def _stage(
        self, found: _Found, schema_path: str | None, staging: Path, *, use_cache: bool
    ) -> _Staged:
        """Fill ``staging`` with what :meth:`_open` found and left to do: image layers,
        a big model (with progress lines), an archive to unpack. Returns what the fill
        did, the model's local name (an archive's is the folder it unpacked to) and
        the model's bytes on disk."""
        storage, plan, local_name = found.storage, found.plan, found.local_name
        assert storage is not None and plan is not None
        if plan.kind == "layers":
            return await self._stage_layers(
                storage, plan, image_model_name(found.object_path), schema_path, staging, use_cache=use_cache
            )
        layout = found.layout
        assert layout is not None
        fetched = await self._fill(storage, layout.plan, staging, use_cache=use_cache)
        if layout.archive is None:
            return fetched, local_name, layout.model_bytes
        size = await self._unpack(staging / layout.archive, staging / layout.unpack_to)
        return fetched, layout.unpack_to, size

    async def _stage_layers(
        self,
        storage: Storage,
        plan: Plan,
        local_name: str,
        schema_path: str | None,
        staging: Path,
        *,
        use_cache: bool,
    ) -> tuple[_Fetched, str, int]:
        """Apply the image layers of ``plan`` into ``staging/<local_name>`` (and link
        the schema, a file of the model, to ``_schema.json``)."""
        model = staging / local_name
        cache = self.cache if use_cache else None

        def apply(cancel: threading.Event, progress: Progress) -> LayerStats:
            stats = apply_layers(
                storage,
                plan,
                model,
                cancel,
                settings=self.settings,
                progress=progress,
                cache=cache,
                engine=self.engine,
            )
            if schema_path:
                _link_schema(model, schema_path, staging / SCHEMA_FILE_NAME)
            return stats

        stats = await self._with_progress(plan.total_bytes, apply)
        extra: dict[str, object] = {"layers": stats.layers}
        if plan.source:
            extra["source"] = plan.source
        fetched = _Fetched(
            FetchStats(bytes=stats.bytes, files=stats.files, seconds=stats.seconds),
            cache_hits=stats.cache_hits,
            cache_bytes=stats.cache_bytes,
            extra=extra,
        )
        return fetched, local_name, stats.model_bytes

    @staticmethod
    def _layout(
        storage: Storage, plan: Plan, model_path: str, schema_path: str | None, local_name: str
    ) -> _Layout:
        """One plan for the model (``plan``, the model path's listing) and its schema,
        relpaths below the model directory, every name checked; the model's own byte
        count; and whether the model is an archive to unpack."""
        if plan.kind not in ("files", "archive"):
            raise StorageError(
                f"the store gave a plan of kind '{plan.kind}', which this puller cannot lay out yet"
            )
        archive: str | None = None
        if plan.single_object or plan.kind == "archive":
            if len(plan.blobs) != 1:
                raise StorageError(
                    f"the store listed {len(plan.blobs)} objects for the single object '{model_path}'"
                )
            blobs = [replace(plan.blobs[0], relpath=local_name)]
            if unpack_enabled(storage.config) and (plan.kind == "archive" or is_archive(local_name)):
                archive = local_name
        else:
            blobs = [replace(b, relpath=f"{local_name}/{safe_relpath(b.relpath)}") for b in plan.blobs]
        size = sum(b.size for b in blobs)
        if schema_path:
            schema = storage.plan(schema_path)
            if not schema.single_object or len(schema.blobs) != 1:
                raise StorageNotFound(f"schema_path '{schema_path}' names a folder, not a file")
            blobs.append(replace(schema.blobs[0], relpath=SCHEMA_FILE_NAME))
        return _Layout(
            plan=Plan(blobs=tuple(blobs), single_object=False, kind="files"),
            model_bytes=size,
            archive=archive,
            unpack_to=archive_model_name(archive) if archive is not None else "",
        )

    async def _fill(self, storage: Storage, plan: Plan, dest: Path, *, use_cache: bool) -> _Fetched:
        """:meth:`_fill_here` in a worker thread, logging progress every
        ``progress_interval`` seconds; on cancellation stop it and wait until every
        worker has stopped before re-raising."""

        def fill(cancel: threading.Event, progress: Progress) -> _Fetched:
            return self._fill_here(storage, plan, dest, use_cache=use_cache, cancel=cancel, progress=progress)

        return await self._with_progress(plan.total_bytes, fill)

    def _fill_here(
        self,
        storage: Storage,
        plan: Plan,
        dest: Path,
        *,
        use_cache: bool,
        cancel: threading.Event,
        progress: Progress | None = None,
    ) -> _Fetched:
        """Put every blob of ``plan`` at ``dest/<relpath>``, blocking: from the content
        cache when ``use_cache`` and it holds the blob, from the store otherwise; then
        add the blobs fetched to the cache and evict what is over its cap."""
        cache = self.cache if use_cache else None
        if cache is None:
            return _Fetched(self.engine.fetch(storage, plan, dest, cancel, progress=progress))
        identity = storage.identity()
        placements = _placements(plan, dest)  # every name checked before anything is written
        checkout: Checkout = cache.checkout(identity, placements)
        if checkout.misses:
            missing = Plan(blobs=tuple(checkout.misses), single_object=False, kind=plan.kind)
            stats = self.engine.fetch(storage, missing, dest, cancel, progress=progress)
            where = {blob.relpath: path for blob, path in placements}
            fetched = [(blob, where[blob.relpath]) for blob in checkout.misses]
        else:
            stats = FetchStats(bytes=0, files=0, seconds=0.0)
            fetched = []
        # the model's files are still linked from the staging folder: never evicted
        cache.admit(identity, fetched)
        cache.evict()
        return _Fetched(stats, cache_hits=len(checkout.hits), cache_bytes=checkout.hit_bytes)

    async def _with_progress(self, total_bytes: int, work: Callable[[threading.Event, Progress], T]) -> T:
        """Run ``work(cancel, progress)`` in a thread, logging a ``pull progress`` line
        every ``progress_interval`` seconds from what ``progress`` counted; on
        cancellation set ``cancel`` and wait until the thread has finished before
        re-raising."""
        cancel = PullCancel()
        progress = PullProgress(total_bytes)
        with progress.reporting(self.progress_interval):
            return await run_to_end(asyncio.to_thread(work, cancel, progress.add), on_cancel=cancel.set)

    async def _unpack(self, archive: Path, dest: Path) -> int:
        """Unpack ``archive`` (in the staging folder) into ``dest``, then delete the
        archive file; when the archive's only top-level entry is a folder named like
        ``dest``, that folder becomes ``dest``. Returns the bytes unpacked. On error or
        cancellation the caller removes the staging folder."""
        cancel = threading.Event()
        max_bytes = self.settings.archive_max_bytes

        def unpack() -> int:
            unpacked = unpack_archive(archive, dest, max_bytes=max_bytes, cancel=cancel)
            try:
                archive.unlink()
                entries = list(dest.iterdir())
                only = entries[0] if len(entries) == 1 else None
                if only is not None and only.name == dest.name and only.is_dir() and not only.is_symlink():
                    only.rename(archive)  # the archive's name is free again
                    dest.rmdir()
                    archive.rename(dest)
                    # one level up, a link to ".." would now lead above the model
                    _check_links_inside(dest)
            except OSError as exc:
                raise StorageError(f"cannot lay out the unpacked archive at {dest}: {exc.strerror}") from exc
            return unpacked

        return await run_to_end(asyncio.to_thread(unpack), on_cancel=cancel.set)

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
        """:meth:`remove_now` in a worker thread, run to its end even if the caller is
        cancelled."""
        await run_to_end(asyncio.to_thread(self.remove_now, model_id))

    def remove_if_small(self, model_id: str) -> bool:
        """Delete ``ROOT_MODEL_DIR/<model_id>`` here and now, like :meth:`remove_now`,
        when this puller placed it as a small model (at most ``INLINE_MAX_BYTES`` in at
        most ``INLINE_MAX_PARTS`` files, on the pod's own disk, where the placement's
        renames already run in the event loop): deleting a few files costs less than
        handing them to a worker thread. Returns ``False``, doing nothing, otherwise."""
        if model_id not in self._small:
            return False
        self.remove_now(model_id)
        return True

    def remove_now(self, model_id: str) -> None:
        """Delete ``ROOT_MODEL_DIR/<model_id>``; no error when it is absent. The
        directory disappears at once (renamed aside into ``_tmp``, where a restart
        sweeps what an interrupted delete left) and is then deleted; a link (pvc) is
        removed, never followed. Blocking."""
        target = self.model_dir(model_id)
        self._small.discard(model_id)
        # a unique name for this process's purpose, not a secret
        aside = self.root / STAGING_DIR_NAME / f"rm.{random.getrandbits(64):016x}"
        try:
            target.rename(aside)
        except FileNotFoundError:
            if not os.path.lexists(target):
                return
            try:  # no _tmp any more: make it again
                staging_root(self.root)
                target.rename(aside)
            except OSError:
                remove_tree(target)
                return
        except OSError:
            remove_tree(target)
            return
        remove_tree(aside)

    def purge(self) -> list[str]:
        """Remove every model directory of ROOT_MODEL_DIR (a folder or a link whose
        name does not start with ``_``: models of a previous life) and everything under
        ``_tmp``; return the names removed. Plain files at the top are not models and
        stay (a runtime's own config there, e.g. OVMS's ``model_config_list.json``).
        The content cache (``_cache``) stays too: its entries are now unused and
        evictable, and serve the next pulls. Blocking: run it in a thread."""
        self._small.clear()
        removed: list[str] = []
        try:
            entries = sorted(self.root.iterdir())
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.name.startswith("_") or (entry.is_file() and not entry.is_symlink()):
                continue
            remove_tree(entry)
            removed.append(entry.name)
        sweep_staging(self.root)
        return removed


def _check_links_inside(top: Path) -> None:
    """Raise ``UnsafePath`` when a symbolic link below ``top`` resolves outside it."""
    outside = first_link_outside(top, os.path.realpath(top))
    if outside is not None:
        raise UnsafePath(f"the archive's link '{outside.relative_to(top)}' leads outside the model")


def _link_schema(model: Path, schema_path: str, target: Path) -> None:
    """Link the file ``schema_path`` of a model pulled from an image (relative to the
    model folder) to ``target``; a copy where hard links fail. Raises ``UnsafePath``
    for a path leading outside the model, ``StorageNotFound`` when it is no file."""
    source = safe_join(model, schema_path)
    if not source.is_file() or source.is_symlink():
        raise StorageNotFound(f"schema_path '{schema_path}' is not a file of the image's model")
    try:
        link_or_copy(source, target)
    except OSError as exc:
        raise StorageError(f"cannot link the schema '{schema_path}': {exc.strerror or exc}") from exc


def _placements(plan: Plan, dest: Path) -> list[tuple[Blob, Path]]:
    """Every blob of ``plan`` with its file below ``dest``, all names checked
    (``UnsafePath``) and no two blobs on one file (``StorageError``)."""
    placements = [(blob, safe_join(dest, blob.relpath)) for blob in plan.blobs]
    seen: set[Path] = set()
    for blob, path in placements:
        if path in seen:
            raise StorageError(
                f"two objects land on the same file '{path.relative_to(dest)}' (from '{blob.name}')"
            )
        seen.add(path)
    return placements


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
