"""The storage plugin contract.

A backend answers two questions: *which blobs make up the model at this path* and
*give me bytes start..end of this blob*. Everything else (parallel files and ranges,
retries, size and checksum verification, placement in a temp dir and the atomic rename,
the cache) belongs to the engine and is written once.

Backends are found through the entry-point group ``modelmesh_sidecar.storage``; the
entry-point name is the storage ``type`` of the storage config (one class may be
registered under several names). They are constructed per storage config and reused,
so a backend may keep clients and connection pools.

Backends translate their SDK's errors into :mod:`adapter.errors` types at their edge:
``StorageNotFound``, ``StoragePermissionDenied``, ``StorageUnauthenticated``,
``StorageUnavailable`` (transient: the engine retries), ``StorageError``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.config import StorageConfig


@dataclass(frozen=True)
class Blob:
    """One object of a model.

    ``name`` is the backend's own name for it (an S3 key, a file path); ``relpath`` is
    where it lands, relative to the model's local path, in posix form (the engine
    validates it: no absolute names, no ``..``). ``checksums`` maps an algorithm
    (``md5``, ``sha256``, ``crc32c``) to the hex digest the store announces; ``version``
    is what identifies these exact bytes (ETag, generation, version id), if known.
    ``ranged`` is False when the store cannot serve byte ranges of this blob: the
    engine then reads it as one stream.

    Image layers (plans of kind ``layers``) also carry their ``media_type`` (which says
    how to read them: ``...tar``, ``...tar+gzip``, ``...tar+zstd``, or a raw file) and
    their ``annotations``; ``checksums["sha256"]`` is the layer's digest. A tar layer's
    relpath is ``""`` (it unpacks at the model root); a raw layer's relpath is where its
    bytes land.
    """

    name: str
    relpath: str
    size: int
    version: str | None = None
    checksums: Mapping[str, str] = field(default_factory=dict)
    ranged: bool = True
    media_type: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What a model path resolves to.

    ``single_object``: the path named one object, which lands as a file at the model's
    local path; otherwise the path was a prefix and every blob lands under a directory.
    ``kind`` says how blobs become the model: ``files`` (each at its relpath),
    ``archive`` (one blob to unpack), ``layers`` (image layers applied in order, lowest
    first, with whiteouts). For layers, ``subtree`` names the folder of the unpacked
    image that becomes the model (``"models"`` for a KServe ModelCar image); ``None``
    keeps the whole tree. ``source`` describes what was resolved (an image reference
    with its digest), for logs.
    """

    blobs: tuple[Blob, ...]
    single_object: bool
    kind: Literal["files", "archive", "layers"] = "files"
    subtree: str | None = None
    source: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blobs)


class ByteStream(Protocol):
    """An open byte range: read into a caller's buffer until it returns 0."""

    def readinto(self, buffer: memoryview) -> int: ...

    def close(self) -> None: ...


class Storage(abc.ABC):
    """One storage backend, bound to one resolved storage config."""

    #: the storage ``type`` names this class serves (documentation; the entry points
    #: are what the registry reads)
    types: ClassVar[tuple[str, ...]] = ()

    #: True when the model is used in place (linked), not downloaded (pvc)
    links_in_place: ClassVar[bool] = False

    #: True when reads are local file reads (no network round trip): the engine then
    #: copies a small model in the calling thread instead of spreading it on its pool
    reads_locally: ClassVar[bool] = False

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        self.config = config
        self.settings = settings

    @abc.abstractmethod
    def plan(self, path: str) -> Plan:
        """List what makes up the model at ``path``.

        A path naming one object gives a single-object plan; a path naming a prefix
        gives every object under it (keys ending in ``/`` and empty folder markers are
        skipped), with relpaths relative to the prefix. An empty path means the whole
        bucket/container/root. Raises ``StorageNotFound`` when nothing is there.
        Blocking: the engine calls it in a worker thread.
        """

    @abc.abstractmethod
    def open_range(self, blob: Blob, start: int, end: int) -> ByteStream:
        """Open bytes ``[start, end)`` of ``blob`` for reading. Blocking."""

    def object_path(self, path: str) -> str:
        """The part of a model path that names the object, for the local file name
        (HTTP drops the query string, which may carry a token). Default: the path."""
        return path

    def local_path(self, path: str) -> str | None:
        """For backends whose models are already on a local filesystem (pvc): the
        absolute path to link instead of downloading. ``None`` otherwise."""
        return None

    def identity(self) -> str:
        """A string naming the store (endpoint, bucket, account) without secrets, for
        the content cache and for log lines."""
        return self.config.type

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release clients and connections."""
