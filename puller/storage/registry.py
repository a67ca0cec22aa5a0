"""The storage backend registry: which backends are installed, and one live backend per
distinct storage config.

Backends are found only through the entry-point group ``modelmesh_sidecar.storage``
(entry-point name = storage ``type``), ours declared in our pyproject like any
third-party plugin. A backend module is imported the first time its type is used; when
that import fails because the backend's SDK is missing, the error names the pip extra
that installs it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

import structlog

from adapter.errors import MissingExtra, StorageConfigError
from puller.storage.base import Storage

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.config import StorageConfig

log = structlog.get_logger(__name__)

ENTRY_POINT_GROUP = "modelmesh_sidecar.storage"
DISTRIBUTION = "modelmesh-sidecar"

#: storage type -> the extra of our distribution that installs its SDK
STORAGE_EXTRAS: dict[str, str] = {
    "s3": "s3",
    "gcs": "gcs",
    "azure": "azure",
}


@functools.cache
def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        # the first one on sys.path wins, as for imports
        found.setdefault(ep.name, ep)
    return found


def reload_entry_points() -> None:
    """Forget the cached entry points, so that backends installed since are seen."""
    _entry_points.cache_clear()


def known_types() -> list[str]:
    """The storage types of every installed backend, sorted. Imports no backend."""
    return sorted(_entry_points())


def extra_for(type_name: str) -> str | None:
    """The extra of ``modelmesh-sidecar`` that installs the SDK of ``type_name``, if
    that type needs one."""
    return STORAGE_EXTRAS.get(type_name)


def install_hint(type_name: str) -> str | None:
    """``pip install 'modelmesh-sidecar[<extra>]'`` for a type that needs an extra."""
    extra = extra_for(type_name)
    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra is not None else None


def storage_class(type_name: str) -> type[Storage]:
    """The backend class registered for ``type_name``, imported on first use.

    Raises ``StorageConfigError`` for an unknown type (naming the known ones) or an
    entry point that does not name a ``Storage`` subclass, and ``MissingExtra`` when the
    backend's SDK is not installed (naming the extra, or the missing module when the
    type has no extra of ours).
    """
    ep = _entry_points().get(type_name)
    if ep is None:
        known = ", ".join(known_types()) or "none"
        raise StorageConfigError(f"unknown storage type {type_name[:64]!r} (known types: {known})")
    try:
        cls = ep.load()
    except ImportError as exc:
        raise _import_failure(type_name, ep, exc) from exc
    if not (isinstance(cls, type) and issubclass(cls, Storage)):
        raise StorageConfigError(
            f"entry point for storage type {type_name!r} does not name a Storage subclass"
        )
    return cls


def _import_failure(type_name: str, ep: EntryPoint, exc: ImportError) -> StorageConfigError:
    missing = exc.name or ""
    module = ep.module
    if missing and (module == missing or module.startswith(missing + ".")):
        # the backend's own module is absent: a broken install, not a missing SDK
        return StorageConfigError(
            f"the backend module {module!r} of storage type {type_name!r} is not installed"
        )
    hint = install_hint(type_name)
    if hint is not None:
        return MissingExtra(f"storage type {type_name!r} needs its SDK, which is not installed: {hint}")
    what = f"module {missing!r}" if missing else "a module it imports"
    return MissingExtra(f"storage type {type_name!r} cannot be loaded: {what} is not installed")


def _config_key(config: StorageConfig) -> str:
    """A digest of type + canonical JSON of the fields: equal configs, equal keys. A
    digest so that the secrets in the fields are not kept a second time as a key."""
    canonical = json.dumps(
        {"type": config.type, "fields": config.fields},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


class StorageRegistry:
    """Live backends, one per distinct storage config, shared by every pull.

    Building a backend may be costly (an SDK client, a connection pool), so a config
    seen before gets the same instance back. One registry serves one process and its
    one ``Settings``. Thread-safe. Never logs config values.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backends: dict[str, Storage] = {}

    def get(self, config: StorageConfig, settings: Settings) -> Storage:
        """The backend for ``config``: the instance made for an identical config
        (same type and fields) if there is one, else a new one. Errors from
        :func:`storage_class` and from the backend's constructor pass through."""
        key = _config_key(config)
        with self._lock:
            backend = self._backends.get(key)
        if backend is not None:
            return backend
        # built outside the lock: one slow SDK client must not hold up other configs
        created = storage_class(config.type)(config, settings)
        with self._lock:
            backend = self._backends.setdefault(key, created)
        if backend is not created:
            # another thread built the same config first: keep one
            created.close()
        else:
            log.debug("storage_backend_created", storage_type=config.type, storage=created.identity())
        return backend

    def __len__(self) -> int:
        with self._lock:
            return len(self._backends)

    def close(self) -> None:
        """Close every backend and forget them. A failing close is logged (type and
        identity only) and does not stop the others."""
        with self._lock:
            backends = list(self._backends.values())
            self._backends.clear()
        for backend in backends:
            try:
                backend.close()
            except Exception as exc:  # one bad backend must not leak the rest
                log.warning(
                    "storage_backend_close_failed",
                    storage_type=backend.config.type,
                    storage=backend.identity(),
                    error=type(exc).__name__,
                )

    def __enter__(self) -> StorageRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
