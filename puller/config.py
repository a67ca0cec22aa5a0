"""The storage-config directory and its resolution rules.

The ``storage-config`` secret is mounted as a directory with one file per secret key,
each file a JSON object with a ``"type"`` (contract, section 3). Kubernetes updates it
in place by writing the new files into a fresh ``..<timestamp>`` directory and swapping
the ``..data`` symlink atomically; the visible names are symlinks through ``..data``.
:class:`StorageConfigDirectory` keeps the parsed entries in memory and re-reads them only
after a watchdog event says the directory changed, so a changed secret is picked up
without a restart and an unchanged one costs no file I/O.

:func:`resolve_storage` turns a model key into the one :class:`StorageConfig` a pull
uses. Entry contents are secrets: nothing here logs them or puts them in a message.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import stat
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from adapter.errors import StorageConfigError

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.model_key import ModelKey

log = structlog.get_logger(__name__)

#: an entry larger than this is refused (a Kubernetes secret holds at most 1 MiB)
MAX_ENTRY_BYTES = 4 * 1024 * 1024

DEFAULT_ENTRY = "default"


_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def parse_flag(value: Any) -> bool | None:
    """True, False, or None for a value that is neither (see ``StorageConfig.flag``)."""
    if isinstance(value, bool):
        return value
    if value is None:
        return None
    word = str(value).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    return None


@dataclass(frozen=True)
class StorageConfig:
    """One resolved storage config: its ``type`` and its fields (after storage_params
    overrides). ``name`` is the storage-config entry it came from, if any. The repr
    shows field names only, never values (they hold secrets)."""

    type: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def flag(self, key: str) -> bool | None:
        """A yes/no field: True for ``true``/``1``/``yes``/``on`` (or JSON true), False
        for ``false``/``0``/``no``/``off`` (or JSON false), None when absent or neither
        (storage params arrive as strings, secrets written by hand as either)."""
        return parse_flag(self.fields.get(key))

    def __repr__(self) -> str:
        return f"StorageConfig(type={self.type!r}, name={self.name!r}, fields={sorted(self.fields)})"


# --- the directory --------------------------------------------------------------------


@dataclass(frozen=True)
class _Invalid:
    """An entry that exists but cannot be used; ``reason`` never quotes its content."""

    reason: str


_Entry = dict[str, Any] | _Invalid

#: watchdog event types that mean the directory's content may have changed; opening
#: and reading a file (our own reads) are not among them
_CHANGE_EVENTS = frozenset({"created", "deleted", "modified", "moved", "closed", "attrib"})


class _ChangeListener:
    """Receives watchdog events for the directory. Runs on the observer's thread while
    the observer holds its own lock, so it must not take any lock of ours: it only
    sets flags."""

    def __init__(self, directory: StorageConfigDirectory, watched_path: str) -> None:
        self._directory = directory
        self._watched_path = watched_path

    def dispatch(self, event: Any) -> None:
        event_type = getattr(event, "event_type", "")
        if event_type not in _CHANGE_EVENTS:
            return
        # the watched directory itself deleted or moved away: its inotify watch is dead
        lost = event_type in ("deleted", "moved") and getattr(event, "src_path", None) == self._watched_path
        self._directory._mark_changed(watch_lost=lost)


class StorageConfigDirectory:
    """The entries of a mounted storage-config directory, cached and hot-reloaded.

    Every visible file (names starting with ``.`` are Kubernetes' own: skipped) is one
    entry. A file that is not a JSON object is logged (without its content) and reads
    as absent through :meth:`get`; :meth:`lookup` reports it as an error instead.

    After :meth:`start`, a watchdog observer marks the cache dirty on any change in the
    directory (the ``..data`` symlink swap, a plain rewrite, a new or removed file) and
    the next read re-scans it; reads in between cost no file I/O. The directory need not
    exist: while it is missing the set is empty and each read checks (one ``stat``)
    whether it has appeared. Without :meth:`start` (or after :meth:`stop`) every read
    re-scans the directory: always current, never cached. Thread-safe.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._dirty = threading.Event()
        self._dirty.set()
        self._watch_lost = False
        self._observer: Any = None
        self._watch: Any = None
        self._watched_id: tuple[int, int] | None = None
        self._scans = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> StorageConfigDirectory:
        """The directory at ``settings.storage_config_dir`` (STORAGE_CONFIG_DIR)."""
        return cls(settings.storage_config_dir)

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start watching the directory for changes (idempotent). The directory may
        not exist yet: it is watched from the first read that finds it."""
        from watchdog.observers import Observer

        with self._lock:
            if self._observer is not None:
                return
            try:
                observer = Observer()
                observer.daemon = True
                observer.start()
            except OSError as exc:
                # e.g. the inotify instance limit: stay correct by re-scanning on every read
                log.warning(
                    "storage_config_watch_failed",
                    directory=str(self.directory),
                    error=errno.errorcode.get(exc.errno or 0, type(exc).__name__),
                )
                return
            self._observer = observer
            self._dirty.set()
        try:
            self._snapshot()
        except StorageConfigError as exc:
            # reads will report it again; starting must not fail on a bad mount
            log.warning("storage_config_unreadable", directory=str(self.directory), error=str(exc))

    def stop(self) -> None:
        """Stop watching and wait for the observer thread to end. Reads keep working,
        re-scanning the directory each time."""
        with self._lock:
            observer, self._observer = self._observer, None
            self._watch = None
            self._watched_id = None
            self._dirty.set()
        if observer is not None:
            observer.unschedule_all()
            observer.stop()
            observer.join(timeout=10)

    def __enter__(self) -> StorageConfigDirectory:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _mark_changed(self, *, watch_lost: bool) -> None:
        """Called from the observer thread: flags only, no lock (see _ChangeListener)."""
        if watch_lost:
            self._watch_lost = True
        self._dirty.set()

    @property
    def watching(self) -> bool:
        """True while an observer watches the (existing) directory."""
        return self._watch is not None

    @property
    def scans(self) -> int:
        """How many times the directory has been read (for tests and metrics)."""
        return self._scans

    # -- reads ---------------------------------------------------------------------

    def names(self) -> list[str]:
        """The names of the valid entries, sorted."""
        return sorted(name for name, entry in self._snapshot().items() if not isinstance(entry, _Invalid))

    def get(self, name: str) -> Mapping[str, Any] | None:
        """A copy of the entry ``name``, or ``None`` when there is no such entry or it
        is not a JSON object."""
        entry = self._snapshot().get(name)
        if entry is None or isinstance(entry, _Invalid):
            return None
        return copy.deepcopy(entry)

    def lookup(self, name: str) -> dict[str, Any] | None:
        """Like :meth:`get` (a copy the caller may change), but an entry that exists and
        cannot be used raises ``StorageConfigError`` (saying why, never quoting it)
        instead of reading as absent."""
        entry = self._snapshot().get(name)
        if entry is None:
            return None
        if isinstance(entry, _Invalid):
            raise StorageConfigError(f"storage config entry {name!r} {entry.reason}")
        return copy.deepcopy(entry)

    def _snapshot(self) -> dict[str, _Entry]:
        """The current entries; re-scans only when something changed (or nothing
        watches). The returned dict is never mutated afterwards."""
        if self._watch is not None and not self._dirty.is_set():
            return self._entries
        with self._lock:
            if self._watch is None or self._dirty.is_set():
                self._refresh_locked()
            return self._entries

    def _refresh_locked(self) -> None:
        try:
            st = self.directory.stat()
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            self._unwatch_locked()
            if self._entries:
                log.warning("storage_config_dir_gone", directory=str(self.directory))
            self._entries = {}
            return
        if self._observer is not None:
            identity = (st.st_dev, st.st_ino)
            if self._watch is None or self._watch_lost or self._watched_id != identity:
                self._watch_locked(identity)
        # cleared before the scan: a change during the scan marks it dirty again
        self._dirty.clear()
        try:
            self._entries = self._scan(self._entries)
        except BaseException:
            self._dirty.set()
            raise

    def _watch_locked(self, identity: tuple[int, int]) -> None:
        from watchdog.events import (
            DirCreatedEvent,
            DirDeletedEvent,
            DirModifiedEvent,
            DirMovedEvent,
            FileAttribEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
        )

        self._unwatch_locked()
        path = str(self.directory)
        self._watch_lost = False
        try:
            self._watch = self._observer.schedule(
                _ChangeListener(self, path),
                path,
                recursive=False,
                event_filter=[
                    FileCreatedEvent,
                    DirCreatedEvent,
                    FileDeletedEvent,
                    DirDeletedEvent,
                    FileMovedEvent,
                    DirMovedEvent,
                    FileModifiedEvent,
                    DirModifiedEvent,
                    FileClosedEvent,
                    FileAttribEvent,
                ],
            )
        except OSError as exc:
            # e.g. the inotify watch limit: stay correct by re-scanning on every read
            log.warning(
                "storage_config_watch_failed",
                directory=path,
                error=errno.errorcode.get(exc.errno or 0, type(exc).__name__),
            )
            self._watch = None
            return
        self._watched_id = identity

    def _unwatch_locked(self) -> None:
        watch, self._watch = self._watch, None
        self._watched_id = None
        if watch is not None and self._observer is not None:
            try:
                self._observer.unschedule(watch)
            except KeyError:
                # the observer dropped the watch on its own (it stops on delete-self)
                log.debug("storage_config_watch_already_gone", directory=str(self.directory))

    def _scan(self, previous: Mapping[str, _Entry]) -> dict[str, _Entry]:
        self._scans += 1
        try:
            names = [child.name for child in self.directory.iterdir()]
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as exc:
            raise StorageConfigError(
                f"storage config directory {str(self.directory)!r} cannot be listed "
                f"({errno.errorcode.get(exc.errno or 0, type(exc).__name__)})"
            ) from None
        entries: dict[str, _Entry] = {}
        for name in sorted(names):
            if name.startswith("."):
                continue
            entry = _read_entry(self.directory / name)
            if entry is None:
                continue
            if isinstance(entry, _Invalid):
                before = previous.get(name)
                if not (isinstance(before, _Invalid) and before.reason == entry.reason):
                    log.warning("storage_config_entry_invalid", entry=name, reason=entry.reason)
            entries[name] = entry
        log.debug("storage_config_loaded", directory=str(self.directory), entries=len(entries))
        return entries


def _read_entry(path: Path) -> _Entry | None:
    """The parsed entry at ``path``; ``None`` for what is not an entry (a directory, a
    special file, a link whose target vanished during a swap)."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang the reader; no effect on files
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        return _Invalid(f"cannot be read ({errno.errorcode.get(exc.errno or 0, type(exc).__name__)})")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > MAX_ENTRY_BYTES:
            return _Invalid(f"is larger than {MAX_ENTRY_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_ENTRY_BYTES + 1)
    except OSError as exc:
        return _Invalid(f"cannot be read ({errno.errorcode.get(exc.errno or 0, type(exc).__name__)})")
    finally:
        os.close(fd)
    if len(data) > MAX_ENTRY_BYTES:
        return _Invalid(f"is larger than {MAX_ENTRY_BYTES} bytes")
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        return _Invalid("is not valid JSON")
    if not isinstance(parsed, dict):
        return _Invalid(f"is not valid JSON: expected an object, found {_json_kind(parsed)}")
    return parsed


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


# --- resolution -----------------------------------------------------------------------


def resolve_storage(
    key: ModelKey, directory: StorageConfigDirectory, known_types: Collection[str]
) -> StorageConfig:
    """The storage config one pull uses, built like the Go puller does.

    1. The entry: ``key.storage_key`` when given (missing: ``StorageConfigError`` naming
       it). Otherwise ``default_<type>`` when ``storage_params`` has a ``type``, else
       ``default``; a missing default entry means an empty config. As upstream, a typed
       request never falls back to ``default``: that entry may hold credentials for a
       different store.
    2. The deprecated top-level ``bucket`` of the key is set as ``bucket``. (The Go
       puller set it only when the entry already had a bucket, so a request whose
       config had none lost it and failed later; we always apply it.)
    3. ``storage_params`` on top: ``a.b`` sets ``fields["a"]["b"]`` (missing objects are
       created; a value that is an object cannot be replaced by a string).
    4. Legacy s3: ``default_bucket`` becomes ``bucket`` when no bucket is set, and is
       dropped either way.

    The result's ``type`` must be one of ``known_types`` (else ``StorageConfigError``
    naming it and the known ones); ``name`` is the entry used, ``None`` for none. An
    entry that is not a JSON object raises ``StorageConfigError`` when it would be used.
    No message contains a config value other than the type.
    """
    if key.storage_key is not None:
        name: str | None = key.storage_key
        fields = directory.lookup(key.storage_key)
        if fields is None:
            raise StorageConfigError(f"storage config has no entry for storage_key {key.storage_key!r}")
    else:
        type_param = key.storage_params.get("type", "")
        name = f"{DEFAULT_ENTRY}_{type_param}" if type_param else DEFAULT_ENTRY
        fields = directory.lookup(name)
        if fields is None:
            name, fields = None, {}

    if key.bucket:
        fields["bucket"] = key.bucket
    _apply_params(fields, key.storage_params, name)

    type_name = fields.get("type")
    if type_name == "s3":
        legacy = fields.pop("default_bucket", None)
        if not fields.get("bucket") and isinstance(legacy, str) and legacy:
            fields["bucket"] = legacy

    known = ", ".join(sorted(known_types)) or "none"
    where = f"storage config entry {name!r}" if name is not None else "the storage params"
    if type_name is not None and not isinstance(type_name, str):
        raise StorageConfigError(f'"type" in {where} must be a string, found {_json_kind(type_name)}')
    if not type_name:
        raise StorageConfigError(
            f'no storage type: {where} sets no "type" and the model key\'s storage_params '
            f"has none (known types: {known})"
        )
    if type_name not in known_types:
        raise StorageConfigError(f"unknown storage type {type_name[:64]!r} in {where} (known types: {known})")
    return StorageConfig(type=type_name, fields=fields, name=name)


def _apply_params(fields: dict[str, Any], params: Mapping[str, str], entry: str | None) -> None:
    """Set each ``storage_params`` value at its dotted path; shallow keys first so the
    outcome does not depend on the order of the JSON object."""
    where = f"storage config entry {entry!r}" if entry is not None else "the storage config"
    for dotted in sorted(params, key=lambda k: (k.count("."), k)):
        parts = dotted.split(".")
        if not all(parts):
            raise StorageConfigError(f"storage_params key {dotted!r} has an empty part")
        target = fields
        for depth, part in enumerate(parts[:-1]):
            child = target.get(part)
            if child is None:
                child = target[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise StorageConfigError(
                    f"storage_params key {dotted!r}: {prefix!r} in {where} is not an object"
                )
            target = child
        leaf = parts[-1]
        if isinstance(target.get(leaf), dict):
            raise StorageConfigError(
                f"storage_params key {dotted!r}: {where} holds an object there, which a string cannot replace"
            )
        target[leaf] = params[dotted]
