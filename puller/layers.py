"""Applying image layers: a plan of kind ``layers`` (OCI and Docker images, KServe
ModelCar images, KitOps ModelKits, CNCF ModelPacks) becomes one model directory.

:func:`apply_layers` works in four steps, all below ``dest``:

1. **Stream and unpack, in parallel.** Each layer is read on a pool of
   ``PULL_WORKERS`` threads. The store's bytes pass through the layer's digest (over
   the bytes as stored, i.e. compressed) and its decompressor (chosen by the media type:
   ``+gzip``/``.gzip`` through :mod:`zlib`, ``+zstd`` through :mod:`zstandard`, none
   otherwise) into :mod:`tarfile`, which unpacks them into the layer's own folder
   ``dest/.layers.*/<index>/``. The layer is never written to disk as a file first.
   A raw layer (media type ending in ``raw``) is one file at the blob's relpath; with
   an engine it is fetched by the engine's parallel ranges (verified there).
2. **Verify.** Once the tar ends, the rest of the blob is read and hashed: its size and
   digest must match. A mismatch discards the layer's folder and streams the layer once
   more; a second one is an :class:`IntegrityError` naming the layer. A tar or
   decompression error is judged by the digest as well: a mismatch means damaged bytes
   (one more try), a match means a malformed layer (:class:`BadArchive`). A transient
   read error (:class:`StorageUnavailable`, a stream ending early) resumes the stream
   where it stopped, ``PULL_RETRIES`` times in a row at most, with backoff.
3. **Merge, in order, by renames.** Into one image root, lowest layer first: the
   layer's whiteouts remove what lower layers made (``.wh.<name>`` that path,
   ``.wh..wh..opq`` the content of its folder), then its entries move in: a file or a
   link replaces whatever was there, a folder merges into a folder and replaces
   anything else. Nothing in the image root is ever followed: a folder of an upper
   layer replaces a link of a lower one instead of being written through it. Cheap: a
   folder that is new to the image moves in one rename.
4. **Keep the subtree.** With ``plan.subtree`` (``models`` for a ModelCar image) only
   that folder's content becomes ``dest``'s content; an image without it fails with
   :class:`StorageNotFound`. ``None`` keeps the whole tree.

Safety: every tar entry goes through the checks of :mod:`puller.archive` (names: no
absolute paths, ``..``, NUL or backslash; symbolic links relative and inside the image
root, also through other links; hard links to a file of the image; device files, FIFOs
and unknown types refused; modes ``0644``/``0755``, never setuid, setgid or sticky;
giant headers refused) whether or not the entry lies in the subtree, and every link of
the final directory must resolve inside it. A refusal names the layer digest and the
entry; on any error ``dest`` is left empty. The sizes all entries declare count towards
``ARCHIVE_MAX_BYTES`` across all layers (bytes written are capped by them); a raw
layer counts its size.

With a subtree, entries outside it are checked and streamed past but not written (the
base image of a ModelCar is not unpacked). Hard links: one to a file of the same layer
links to the file already unpacked; one to a file of a lower layer is resolved at merge
time, against the image as the lower layers left it (before this layer's whiteouts). A
hard link into the subtree whose target lies outside it (so was not written) makes the
whole image be unpacked again, without skipping: rare, and always correct.

Content cache (``cache`` given, ``CACHE_MAX_BYTES`` > 0): each unpacked layer folder,
verified, moves into the cache as a tree entry keyed by its digest (plus what was kept
of it: the subtree, or a raw layer's path), with its whiteouts and deferred hard links
beside it; the merge then builds the image from hard links into that tree (folders are
made fresh, files are links: read-only ``0444``/``0555``, no second copy). A layer
already cached is not fetched again, from any registry: a digest names the same bytes
everywhere. Trees count in the cache's byte cap and LRU; one that a model still links
is never evicted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import random
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal, Protocol, cast

import structlog
import zstandard

from adapter.errors import (
    ArchiveTooLarge,
    BadArchive,
    DiskFull,
    IntegrityError,
    InvalidRequest,
    SidecarError,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
    UnsafePath,
)
from adapter.settings import Settings
from puller.archive import HEADER_READ_LIMIT, MAX_MEMBERS, HeaderTooLarge, TarUnpacker
from puller.cache import CachedTree, ContentCache, link_or_copy
from puller.cancel import PullCancel, run_watching
from puller.checksums import HEX_LENGTHS
from puller.engine import FetchCancelled, PullEngine, blob_label
from puller.placement import is_within, remove_tree, safe_join, safe_relpath
from puller.storage.base import Blob, ByteStream, Plan, Storage

log = structlog.get_logger(__name__)

#: called with the byte count of every chunk received from the store
Progress = Callable[[int], None]

#: the storage identity of cached layer trees: a digest names the same bytes on any
#: registry, so a layer cached from one image serves every other
LAYER_CACHE_IDENTITY = "image-layer"

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
#: other names with this prefix are AUFS bookkeeping, with nothing to apply
_AUFS_META_PREFIX = ".wh..wh."

#: bytes per read from the store (and per decompressed read)
CHUNK_BYTES = 256 * 1024
#: how many times one layer is streamed at most (a digest mismatch costs one more)
_LAYER_ATTEMPTS = 2
#: bytes tarfile may step back (it re-reads the last byte before a header)
_LOOKBACK_BYTES = 512
#: digest algorithms a layer may name
_DIGESTS = ("sha256", "sha512")
#: how often the caller's cancel event is looked at while the layers stream
_POLL_SECONDS = 0.05
_BACKOFF_BASE_SECONDS = 0.2
_BACKOFF_CAP_SECONDS = 5.0
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: what reading a damaged or malformed layer raises (besides BadArchive)
_DECODE_ERRORS = (tarfile.TarError, zlib.error, zstandard.ZstdError, EOFError, ValueError, RecursionError)

Compression = Literal["none", "gzip", "zstd"]


@dataclass(frozen=True)
class LayerFormat:
    """How a layer's bytes are read: a tar (possibly compressed) or one raw file."""

    raw: bool
    compression: Compression


def layer_format(media_type: str | None) -> LayerFormat:
    """The format a layer media type announces, by its suffix: ``raw`` (a raw file,
    e.g. ``application/vnd.cncf.model.weight.v1.raw``); ``+gzip`` / ``.gzip`` (a
    gzipped tar, e.g. ``application/vnd.docker.image.rootfs.diff.tar.gzip``);
    ``+zstd`` (a zstd tar); ``tar`` (a plain tar). Parameters after ``;`` are ignored.
    Raises :class:`InvalidRequest` for anything else."""
    base = (media_type or "").partition(";")[0].strip().lower()
    if base.endswith("raw"):
        return LayerFormat(raw=True, compression="none")
    if base.endswith(("+gzip", ".gzip")):
        return LayerFormat(raw=False, compression="gzip")
    if base.endswith(("+zstd", ".zstd")):
        return LayerFormat(raw=False, compression="zstd")
    if base.endswith("tar"):
        return LayerFormat(raw=False, compression="none")
    raise InvalidRequest(f"layer media type {media_type!r} is not a tar (plain, +gzip, +zstd) or raw layer")


@dataclass(frozen=True)
class LayerStats:
    """What :func:`apply_layers` did: ``bytes`` received from the store (a layer
    streamed again counts again), regular ``files`` and ``model_bytes`` (each inode
    once) in the result, ``layers`` in the plan, of which ``cache_hits`` came from the
    content cache (``cache_bytes``: their sizes as stored), and wall-clock ``seconds``."""

    bytes: int
    files: int
    model_bytes: int
    layers: int
    cache_hits: int
    cache_bytes: int
    seconds: float


def apply_layers(
    storage: Storage,
    plan: Plan,
    dest: Path,
    cancel: threading.Event,
    *,
    settings: Settings,
    progress: Progress | None = None,
    cache: ContentCache | None = None,
    engine: PullEngine | None = None,
) -> LayerStats:
    """Apply the image layers of ``plan`` (kind ``layers``, lowest layer first) into
    ``dest``; blocking (the Puller runs it in a thread). See the module docstring.

    ``dest`` must be absent or an empty folder. On return it holds the image (or its
    ``plan.subtree``): every layer verified against its digest and size, every entry
    checked. Raises :class:`UnsafePath` (an entry or link leading outside, a device
    file or FIFO; names the layer digest and the entry), :class:`IntegrityError` (a
    layer's digest or size wrong twice, or too short), :class:`BadArchive` (a layer
    that is not a readable tar though its digest is right), :class:`ArchiveTooLarge`
    (``settings.archive_max_bytes``), :class:`StorageNotFound` (no ``plan.subtree`` in
    the image), :class:`InvalidRequest` (an unknown media type), the store's errors,
    :class:`DiskFull`, or :class:`FetchCancelled` soon after ``cancel`` is set. On any
    error every worker has stopped and ``dest`` is empty (a ``dest`` that was not empty
    is refused with :class:`StorageError` and left as it was).

    ``progress`` is called with the byte count of every chunk received, from worker
    threads: it must be thread-safe and quick. ``cache`` (open) keeps and reuses
    unpacked layers; ``engine`` fetches raw layers by parallel ranges (without one they
    stream like tar layers).
    """
    started = time.monotonic()
    if plan.kind != "layers":
        raise StorageError(f"apply_layers was given a plan of kind '{plan.kind}'")
    layers = [_Layer.of(index, blob) for index, blob in enumerate(plan.blobs)]
    subtree = safe_relpath(plan.subtree) if plan.subtree else None
    try:
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise StorageError(f"cannot apply image layers into {dest}: the folder is not empty")
        work = Path(tempfile.mkdtemp(prefix=".layers.", dir=dest))
    except OSError as exc:
        raise _local_error(exc, f"creating {dest}") from exc
    run = _Run(
        storage,
        plan,
        layers,
        subtree=subtree,
        dest=dest,
        work=work,
        cancel=cancel,
        settings=settings,
        progress=progress,
        cache=cache,
        engine=engine,
    )
    try:
        files, model_bytes = run.apply()
    except BaseException:
        _empty_folder(dest)
        raise
    return LayerStats(
        bytes=run.received,
        files=files,
        model_bytes=model_bytes,
        layers=len(layers),
        cache_hits=run.cache_hits,
        cache_bytes=run.cache_bytes,
        seconds=time.monotonic() - started,
    )


# --- one layer ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """One blob of the plan, its format and digest checked before anything is fetched."""

    index: int
    blob: Blob
    label: str
    format: LayerFormat
    algorithm: str
    digest: str
    #: where a raw layer's file lands, checked
    relpath: str = ""

    @classmethod
    def of(cls, index: int, blob: Blob) -> _Layer:
        label = blob_label(blob)
        fmt = layer_format(blob.media_type)
        algorithm, digest = _expected_digest(blob, label)
        if blob.size < 0:
            raise StorageError(f"layer '{label}' has a negative size")
        relpath = ""
        if fmt.raw:
            try:
                relpath = safe_relpath(blob.relpath)
                # an annotation's text: a lone surrogate there (JSON can spell one)
                # is no name at all, and could not key the cache
                relpath.encode("utf-8")
            except UnsafePath as exc:
                raise UnsafePath(f"layer '{label}': raw file {exc.message}") from None
            except UnicodeEncodeError:
                raise UnsafePath(
                    f"layer '{label}': raw file name {blob.relpath!r} is not valid Unicode"
                ) from None
        return cls(index, blob, label, fmt, algorithm, digest, relpath)

    def cache_blob(self, keep: str | None) -> Blob:
        """The cache's name for this layer unpacked as it is here: its digest plus what
        was kept of it (a tar unpacked whole or only a subtree; a raw file's path)."""
        variant = f"raw/{self.relpath}" if self.format.raw else f"tar/{keep or ''}"
        return Blob(
            name=f"{self.algorithm}:{self.digest}#{variant}",
            relpath="",
            size=self.blob.size,
            version=f"{self.algorithm}:{self.digest}",
        )


def _expected_digest(blob: Blob, label: str) -> tuple[str, str]:
    """The algorithm and hex digest a layer must match: ``checksums['sha256']`` (or
    sha512), else the ``sha256:<hex>`` of its version or name."""
    candidates = [(alg, blob.checksums.get(alg, "")) for alg in _DIGESTS]
    for reference in (blob.version, blob.name):
        algorithm, _, value = (reference or "").partition(":")
        candidates.append((algorithm, value))
    for algorithm, value in candidates:
        hexdigest = value.lower()
        if (
            algorithm in _DIGESTS
            and len(hexdigest) == HEX_LENGTHS[algorithm]
            and all(c in "0123456789abcdef" for c in hexdigest)
        ):
            return algorithm, hexdigest
    raise StorageError(f"layer '{label}' names no sha256 digest; image layers are always verified")


@dataclass
class _Tree:
    """A layer unpacked into ``path`` (its own folder, or a cache entry when ``held``):
    what it deletes below it and the hard links it makes to files of lower layers."""

    layer: _Layer
    path: Path
    whiteouts: list[str] = field(default_factory=list)
    opaques: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)
    symlinks: list[str] = field(default_factory=list)
    declared: int = 0
    held: CachedTree | None = None

    def info(self) -> dict[str, Any]:
        return {
            "whiteouts": self.whiteouts,
            "opaques": self.opaques,
            "links": [list(pair) for pair in self.links],
            "symlinks": self.symlinks,
            "declared": self.declared,
        }

    @classmethod
    def cached(cls, layer: _Layer, held: CachedTree) -> _Tree | None:
        """The tree of a cache entry; None when its info is not what we stored."""
        info = held.info
        try:
            whiteouts = [str(x) for x in info["whiteouts"]]
            opaques = [str(x) for x in info["opaques"]]
            links = [(str(a), str(b)) for a, b in info["links"]]
            symlinks = [str(x) for x in info["symlinks"]]
            declared = int(info["declared"])
        except (KeyError, TypeError, ValueError):
            return None
        return cls(layer, held.path, whiteouts, opaques, links, symlinks, declared, held)


class _NeedsWholeImage(Exception):
    """A hard link into the subtree points at a file outside it, which was not
    unpacked: the image must be unpacked whole."""


class _Budget:
    """The bytes all layers of one image declare, against ``ARCHIVE_MAX_BYTES``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._used = 0
        self._lock = threading.Lock()

    def take(self, count: int, label: str, name: str) -> None:
        with self._lock:
            self._used += count
            over = self._used > self.max_bytes
        if over:
            raise ArchiveTooLarge(
                f"the image's layers unpack to more than the {self.max_bytes} bytes allowed "
                f"(ARCHIVE_MAX_BYTES): layer '{label}', entry {name!r}"
            )

    def give_back(self, count: int) -> None:
        with self._lock:
            self._used -= count

    def reset(self) -> None:
        with self._lock:
            self._used = 0


# --- bytes in: the store, the digest, the decompressor -------------------------------------


class _ShortRead(StorageUnavailable):
    """The store's stream ended before the layer did (retried as transient)."""


class _LayerSource:
    """The stored bytes of one layer, in order, each fed to the digest once. A
    transient failure reopens the stream where it stopped."""

    def __init__(self, run: _Run, layer: _Layer) -> None:
        self._run = run
        self._layer = layer
        self._digest = hashlib.new(layer.algorithm)
        self._stream: ByteStream | None = None
        self._buffer = memoryview(bytearray(CHUNK_BYTES))
        self._failures = 0
        self.pos = 0

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (``b""`` at the end of the layer)."""
        want = len(self._buffer) if size is None or size < 0 else min(size, len(self._buffer))
        count = self.readinto(self._buffer[:want])
        return bytes(self._buffer[:count])

    def readinto(self, view: memoryview) -> int:
        size = self._layer.blob.size
        want = min(len(view), size - self.pos)
        if want <= 0:
            return 0
        target = view[:want]
        while True:  # each turn reads bytes or counts a failure: bounded by PULL_RETRIES
            self._run.check()
            try:
                if self._stream is None:
                    self._stream = self._run.storage.open_range(self._layer.blob, self.pos, size)
                count = self._stream.readinto(target)
                if count <= 0:
                    raise _ShortRead(f"layer '{self._layer.label}': the stream ended at byte {self.pos}")
                break
            except StorageUnavailable as exc:
                self._drop_stream()
                self._failures += 1
                if self._failures >= self._run.attempts:
                    if isinstance(exc, _ShortRead):
                        raise IntegrityError(
                            f"layer '{self._layer.label}' is shorter than the {size} bytes announced: "
                            f"bytes from {self.pos} never arrived in {self._failures} attempts"
                        ) from exc
                    raise
                self._run.pause(_backoff(self._failures - 1))
        self._failures = 0  # progress since the last failure
        self._digest.update(target[:count])
        self.pos += count
        self._run.received_bytes(count)
        return count

    def drain(self) -> None:
        """Read (and hash) what is left of the layer."""
        while self.readinto(self._buffer):
            pass

    def mismatch(self) -> str | None:
        """Why the bytes read are not the layer (call after :meth:`drain`); None when
        they are."""
        layer = self._layer
        if self.pos != layer.blob.size:  # pragma: no cover - readinto stops at the size
            return f"{self.pos} bytes received, {layer.blob.size} announced"
        actual = self._digest.hexdigest()
        if actual != layer.digest:
            return f"{layer.algorithm} of the bytes received is {actual}, the image names {layer.digest}"
        return None

    def _drop_stream(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()
            self._stream = None

    def close(self) -> None:
        self._drop_stream()


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _GzipReader:
    """gzip members (one or more, back to back) decompressed with :mod:`zlib`, at most
    ``size`` bytes per read."""

    def __init__(self, source: _Reader) -> None:
        self._source = source
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def read(self, size: int = -1) -> bytes:
        size = CHUNK_BYTES if size is None or size <= 0 else size
        while True:  # each turn consumes input or returns: bounded by the layer's size
            if self._inflate.eof:
                data = self._inflate.unused_data or self._source.read(CHUNK_BYTES)
                if not data:
                    return b""
                self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the next member
            else:
                data = self._inflate.unconsumed_tail or self._source.read(CHUNK_BYTES)
                if not data:
                    out = self._inflate.decompress(b"", size)
                    if out:
                        return out
                    raise EOFError("the gzip stream ends before its end marker")
            out = self._inflate.decompress(data, size)
            if out:
                return out


def _decompressing(source: _LayerSource, compression: Compression) -> _Reader:
    if compression == "gzip":
        return _GzipReader(source)
    if compression == "zstd":
        reader: _Reader = zstandard.ZstdDecompressor().stream_reader(
            cast("IO[bytes]", source), read_size=CHUNK_BYTES, read_across_frames=True, closefd=False
        )
        return reader
    return source


class _TarReader:
    """What :mod:`tarfile` reads a layer through: ``read`` returns exactly ``size``
    bytes (fewer only at the end), refuses a single read over
    :data:`~puller.archive.HEADER_READ_LIMIT` (a giant pax or GNU long-name header);
    ``seek`` goes forward by reading, or back by up to :data:`_LOOKBACK_BYTES` (tarfile
    re-reads the byte before each header)."""

    def __init__(self, inner: _Reader, label: str) -> None:
        self._inner = inner
        self._label = label
        self._pos = 0
        self._tail = b""  # the last bytes returned, for a short step back
        self._replay = b""  # bytes stepped back over, returned again first

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > HEADER_READ_LIMIT:
            raise HeaderTooLarge(
                f"archive '{self._label}' has a header of more than {HEADER_READ_LIMIT} bytes"
            )
        parts: list[bytes] = []
        need = size
        if self._replay:
            parts.append(self._replay[:need])
            self._replay = self._replay[need:]
            need -= len(parts[0])
        while need > 0:  # each turn reads bytes or ends: bounded by the layer's size
            chunk = self._inner.read(need)
            if not chunk:
                break
            parts.append(chunk)
            need -= len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos += len(data)
        if len(data) >= _LOOKBACK_BYTES:
            self._tail = data[-_LOOKBACK_BYTES:]
        else:
            self._tail = (self._tail + data)[-_LOOKBACK_BYTES:]
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence not in (os.SEEK_SET, os.SEEK_CUR):
            raise BadArchive(f"archive '{self._label}': tarfile asked to seek from the end")
        target = offset if whence == os.SEEK_SET else self._pos + offset
        if target < self._pos:
            back = self._pos - target
            if back > len(self._tail):
                raise BadArchive(f"archive '{self._label}': tarfile asked to go back {back} bytes")
            self._replay = self._tail[len(self._tail) - back :] + self._replay
            self._tail = self._tail[: len(self._tail) - back]
            self._pos = target
        while self._pos < target:  # each turn reads bytes or ends: bounded by the target
            if not self.read(min(target - self._pos, CHUNK_BYTES)):
                break
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True


# --- one layer's entries ------------------------------------------------------------------


class _LayerUnpacker(TarUnpacker):
    """The archive unpacker (every check of :mod:`puller.archive`), taught image
    layers: whiteouts are recorded instead of written, a hard link to a file this layer
    did not unpack waits for the merge, entries outside ``keep`` (when set) are checked
    but not written, and the declared sizes count against the image's budget."""

    def __init__(
        self, label: str, dest: Path, budget: _Budget, halt: threading.Event, keep: str | None
    ) -> None:
        super().__init__(label, dest, budget.max_bytes, MAX_MEMBERS, halt)
        self.budget = budget
        self.keep = keep
        self.whiteouts: list[str] = []
        self.opaques: list[str] = []
        #: hard links to files of lower layers: name -> target
        self.pending: dict[str, str] = {}
        #: files (and hard links) outside ``keep``, not written
        self.skipped: set[str] = set()

    def unpack(self, reader: _TarReader) -> None:
        with contextlib.ExitStack() as stack:
            try:
                tar = stack.enter_context(tarfile.open(fileobj=cast("IO[bytes]", reader), mode="r:"))
            except HeaderTooLarge:
                raise
            except tarfile.TarError as exc:
                raise BadArchive(f"archive '{self.label}' is not a readable tar archive: {exc}") from None
            for member in self._tar_members(tar):
                self._tar_member(tar, member)
        self.check_links()

    def tree(self, layer: _Layer) -> _Tree:
        return _Tree(
            layer,
            self.dest,
            whiteouts=list(self.whiteouts),
            opaques=list(self.opaques),
            links=sorted(self.pending.items()),
            symlinks=sorted(self.links),
            declared=self.declared,
        )

    # --- what is kept -------------------------------------------------------------------

    def _wanted(self, rel: str) -> bool:
        keep = self.keep
        return keep is None or rel == keep or rel.startswith(keep + "/")

    def _relevant(self, rel: str) -> bool:
        """A whiteout of ``rel`` can change what is kept: it lies in ``keep`` or above."""
        keep = self.keep
        return keep is None or self._wanted(rel) or rel == "" or keep.startswith(rel + "/")

    # --- entries ------------------------------------------------------------------------

    def _count(self, name: str, declared: int) -> None:
        super()._count(name, declared)
        self.budget.take(declared, self.label, name)

    def _tar_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        if not self._is_root(name):
            rel = self._relpath(name)
            base = rel.rsplit("/", 1)[-1]
            if base.startswith(WHITEOUT_PREFIX):
                self._count(name, 0)
                self._whiteout(name, rel, base)
                return
            if member.islnk():
                target = self._link_target(name, rel, member.linkname)
                if target not in self.files:
                    self._count(name, 0)
                    self._second_opinion(member)
                    self._defer_link(name, rel, target)
                    return
        super()._tar_member(tar, member)

    def _whiteout(self, name: str, rel: str, base: str) -> None:
        parent = posixpath.dirname(rel)
        if base == OPAQUE_WHITEOUT:
            if self._relevant(parent):
                self.opaques.append(parent)
            return
        if base.startswith(_AUFS_META_PREFIX):
            return
        victim = base[len(WHITEOUT_PREFIX) :]
        if victim in ("", ".", ".."):
            raise UnsafePath(f"archive '{self.label}': whiteout {name!r} names no path inside the image")
        target = posixpath.join(parent, victim) if parent else victim
        if self._relevant(target):
            self.whiteouts.append(target)

    def _link_target(self, name: str, rel: str, linkname: str) -> str:
        if linkname.startswith("/"):
            raise UnsafePath(
                f"archive '{self.label}': hard link {name!r} points to the absolute path {linkname!r}"
            )
        try:
            target = safe_relpath(linkname)
        except UnsafePath:
            raise UnsafePath(
                f"archive '{self.label}': hard link {name!r} -> {linkname!r} leads outside the image"
            ) from None
        if target == rel:
            raise UnsafePath(f"archive '{self.label}': hard link {name!r} points to itself")
        return target

    def _defer_link(self, name: str, rel: str, target: str) -> None:
        """A hard link to a file this layer did not unpack: a file of a lower layer,
        linked at merge time."""
        if not self._wanted(rel):
            self.skipped.add(rel)
            return
        if target in self.skipped:
            raise _NeedsWholeImage(f"layer '{self.label}': hard link {name!r} -> {target!r}")
        target = self.pending.get(target, target)  # a link to a link that waits too
        self._prepare(name, rel, self._path(name, rel))
        self.pending[rel] = target

    # --- creation, skipped outside ``keep`` ----------------------------------------------

    def _prepare(self, name: str, rel: str, path: Path) -> None:
        self.pending.pop(rel, None)  # a later entry of the same name wins
        super()._prepare(name, rel, path)

    def make_dir(self, name: str) -> None:
        if self._is_root(name):
            return
        rel = self._relpath(name)
        self.pending.pop(rel, None)
        if self._wanted(rel):
            super().make_dir(name)

    def write_file(self, name: str, source: IO[bytes], size: int, executable: bool) -> None:
        rel = self._relpath(name)
        if self._wanted(rel):
            super().write_file(name, source, size, executable)
        else:
            self.skipped.add(rel)  # its bytes are streamed past, still hashed

    def make_symlink(self, name: str, target: str) -> None:
        if self._wanted(self._relpath(name)):
            super().make_symlink(name, target)

    def make_hardlink(self, name: str, target: str) -> None:
        rel = self._relpath(name)
        if self._wanted(rel):
            super().make_hardlink(name, target)
        else:
            self.skipped.add(rel)


# --- one call ----------------------------------------------------------------------------


class _Run:
    """The state of one :func:`apply_layers` call."""

    def __init__(
        self,
        storage: Storage,
        plan: Plan,
        layers: list[_Layer],
        *,
        subtree: str | None,
        dest: Path,
        work: Path,
        cancel: threading.Event,
        settings: Settings,
        progress: Progress | None,
        cache: ContentCache | None,
        engine: PullEngine | None,
    ) -> None:
        self.storage = storage
        self.plan = plan
        self.layers = layers
        self.subtree = subtree
        self.dest = dest
        self.work = work
        self.cancel = cancel
        #: set on cancel or on the first failure: every worker stops, a wait on a
        #: stalled store included (puller.cancel)
        self.halt = PullCancel()
        self.settings = settings
        self.attempts = settings.pull_retries
        self.progress = progress
        self.cache = cache if cache is not None and cache.is_open else None
        self.engine = engine if engine is not None and engine.verify_checksums else None
        self.budget = _Budget(settings.archive_max_bytes)
        self._lock = threading.Lock()
        self.received = 0
        self.cache_hits = 0
        self.cache_bytes = 0

    @property
    def source(self) -> str:
        return self.plan.source or "the image"

    # --- shared by the workers ----------------------------------------------------------

    def check(self) -> None:
        if self.cancel.is_set():
            raise FetchCancelled("the pull was cancelled")
        if self.halt.is_set():
            raise FetchCancelled("the pull stopped: another layer failed")

    def pause(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early when the pull stops."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.halt.wait(min(left, _POLL_SECONDS)) or self.cancel.is_set():
                break
        self.check()

    def received_bytes(self, count: int) -> None:
        with self._lock:
            self.received += count
        if self.progress is not None:
            self.progress(count)

    # --- the whole ----------------------------------------------------------------------

    def apply(self) -> tuple[int, int]:
        """Every step; returns the files and bytes of the result."""
        try:
            origins = self._attempt(keep=self.subtree)
        except _NeedsWholeImage as exc:
            log.info("a hard link leads out of the model folder: unpacking the whole image", link=str(exc))
            _empty_folder(self.work)
            self.budget.reset()
            self.halt.clear()
            origins = self._attempt(keep=None)
        self._keep_subtree()
        remove_tree(self.work)
        files, model_bytes = self._inspect(origins)
        if self.cache is not None:
            self.cache.evict()  # the new model links what it uses: that stays
        return files, model_bytes

    def _attempt(self, keep: str | None) -> dict[str, str]:
        """Fetch every layer (only ``keep`` written, when set) and merge them into
        ``work/root``; returns which layer made each symbolic link."""
        trees = self._fetch_all(keep)
        try:
            root = self.work / "root"
            try:
                root.mkdir()
            except OSError as exc:
                raise _local_error(exc, f"creating {root}") from exc
            return self._merge(trees, root, skipping=keep is not None)
        finally:
            self._release(trees)

    def _release(self, trees: list[_Tree]) -> None:
        if self.cache is None:
            return
        for tree in trees:
            if tree.held is not None:
                self.cache.release(tree.held)

    # --- fetching ---------------------------------------------------------------------

    def _fetch_all(self, keep: str | None) -> list[_Tree]:
        """Every layer on a pool of ``PULL_WORKERS`` threads; on the first failure (or
        a cancel) the others stop, and the error is raised once all have stopped."""
        if not self.layers:
            return []
        trees: dict[int, _Tree] = {}
        failures: dict[int, BaseException] = {}
        workers = max(1, min(self.settings.pull_workers, len(self.layers)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layer") as pool:
            futures: dict[Future[_Tree], int] = {
                pool.submit(run_watching, self.halt, self._layer, layer, keep): layer.index
                for layer in self.layers
            }
            pending = set(futures)
            while pending:  # ends when every worker has: each checks ``halt`` per chunk
                done, pending = wait(pending, timeout=_POLL_SECONDS, return_when=FIRST_EXCEPTION)
                for future in done:
                    exc = future.exception()
                    if exc is None:
                        trees[futures[future]] = future.result()
                    else:
                        failures[futures[future]] = exc
                if failures or self.cancel.is_set():
                    self.halt.set()
        ordered = [trees[i] for i in sorted(trees)]
        if failures or self.cancel.is_set():
            self._release(ordered)
            raise self._first_error(failures)
        return ordered

    def _first_error(self, failures: dict[int, BaseException]) -> BaseException:
        """The error to report: a cancel; else a real error, lowest layer first; else
        the need to unpack the whole image; else a stop."""
        if self.cancel.is_set():
            return FetchCancelled("the pull was cancelled")
        ranked = [exc for _index, exc in sorted(failures.items())]
        for exc in ranked:
            if not isinstance(exc, (FetchCancelled, _NeedsWholeImage)):
                return exc
        for exc in ranked:
            if isinstance(exc, _NeedsWholeImage):
                return exc
        return ranked[0]

    def _layer(self, layer: _Layer, keep: str | None) -> _Tree:
        """One layer, from the cache or from the store (then offered to the cache)."""
        self.check()
        key = layer.cache_blob(keep)
        if self.cache is not None:
            held = self.cache.pin_tree(LAYER_CACHE_IDENTITY, key)
            if held is not None:
                tree = _Tree.cached(layer, held)
                if tree is not None:
                    try:
                        self.budget.take(tree.declared, layer.label, "(cached)")
                    except BaseException:
                        self.cache.release(held)
                        raise
                    with self._lock:
                        self.cache_hits += 1
                        self.cache_bytes += layer.blob.size
                    return tree
                self.cache.release(held)
        folder = self.work / str(layer.index)
        try:
            if layer.format.raw:
                tree = self._fetch_raw(layer, folder)
            else:
                tree = self._fetch_tar(layer, folder, keep)
        except SidecarError as exc:
            raise _relabelled(exc, layer.label) from None
        if self.cache is not None:
            held = self.cache.admit_tree(
                LAYER_CACHE_IDENTITY, key, folder, size=_tree_bytes(folder), info=tree.info()
            )
            if held is not None:
                tree.path = held.path
                tree.held = held
        return tree

    def _fetch_tar(self, layer: _Layer, folder: Path, keep: str | None) -> _Tree:
        for attempt in range(_LAYER_ATTEMPTS):
            _fresh_folder(folder)
            unpacker = _LayerUnpacker(layer.label, folder, self.budget, self.halt, keep)
            source = _LayerSource(self, layer)
            try:
                mismatch = self._stream_tar(layer, source, unpacker)
            except BaseException:
                self.halt.set()  # the other layers stop at their next chunk
                raise
            finally:
                source.close()
            if mismatch is None:
                return unpacker.tree(layer)
            self.budget.give_back(unpacker.declared)
            if attempt + 1 < _LAYER_ATTEMPTS:
                log.warning("layer digest mismatch, fetching it again", layer=layer.label, error=mismatch)
                continue
            raise IntegrityError(f"layer '{layer.label}': {mismatch} (fetched twice)")
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _stream_tar(layer: _Layer, source: _LayerSource, unpacker: _LayerUnpacker) -> str | None:
        """Unpack the layer from ``source``, read the rest, and say whether the bytes
        were the layer (None) or not (why)."""
        try:
            unpacker.unpack(_TarReader(_decompressing(source, layer.format.compression), layer.label))
        except (BadArchive, *_DECODE_ERRORS) as exc:
            # damaged bytes or a malformed layer: the digest tells which
            source.drain()
            mismatch = source.mismatch()
            if mismatch is not None:
                return mismatch
            if isinstance(exc, BadArchive):
                raise
            raise BadArchive(f"layer '{layer.label}' cannot be unpacked: {exc}") from None
        source.drain()
        return source.mismatch()

    def _fetch_raw(self, layer: _Layer, folder: Path) -> _Tree:
        self.budget.take(layer.blob.size, layer.label, layer.relpath)
        if self.engine is not None:
            _fresh_folder(folder)
            blob = replace(layer.blob, relpath=layer.relpath, checksums={layer.algorithm: layer.digest})
            one = Plan(blobs=(blob,), single_object=False)
            self.engine.fetch(self.storage, one, folder, self.halt, progress=self.received_bytes)
            return _Tree(layer, folder, declared=layer.blob.size)
        for attempt in range(_LAYER_ATTEMPTS):
            _fresh_folder(folder)
            target = safe_join(folder, layer.relpath)
            source = _LayerSource(self, layer)
            try:
                _write_stream(source, target)
            except BaseException:
                self.halt.set()
                raise
            finally:
                source.close()
            mismatch = source.mismatch()
            if mismatch is None:
                return _Tree(layer, folder, declared=layer.blob.size)
            if attempt + 1 < _LAYER_ATTEMPTS:
                log.warning("layer digest mismatch, fetching it again", layer=layer.label, error=mismatch)
                continue
            raise IntegrityError(f"layer '{layer.label}': {mismatch} (fetched twice)")
        raise AssertionError("unreachable")  # pragma: no cover

    # --- merging ------------------------------------------------------------------------

    def _merge(self, trees: list[_Tree], root: Path, *, skipping: bool) -> dict[str, str]:
        origins: dict[str, str] = {}
        links = self.work / "links"
        for tree in trees:
            self.check()
            label = tree.layer.label
            try:
                staged = self._stage_links(tree, root, links, skipping=skipping)
                _apply_whiteouts(root, tree)
                _merge_tree(tree.path, root, link=tree.held is not None)
                for name, holder in staged:
                    _place(holder, root, name, label)
            except OSError as exc:
                raise _local_error(exc, f"merging layer '{label}'") from exc
            for rel in tree.symlinks:
                origins[rel] = label
        return origins

    def _stage_links(self, tree: _Tree, root: Path, links: Path, *, skipping: bool) -> list[tuple[str, Path]]:
        """The files of lower layers that ``tree``'s deferred hard links name, each held
        by a temporary link (this layer's whiteouts and entries may move them)."""
        staged: list[tuple[str, Path]] = []
        for number, (name, target) in enumerate(tree.links):
            found = _lookup(root, target)
            if found is None or not stat.S_ISREG(found[1].st_mode):
                if skipping and self.subtree is not None and not _within(target, self.subtree):
                    raise _NeedsWholeImage(f"layer '{tree.layer.label}': hard link {name!r} -> {target!r}")
                raise BadArchive(
                    f"layer '{tree.layer.label}': hard link {name!r} -> {target!r} names no file of the image"
                )
            links.mkdir(exist_ok=True)
            holder = links / f"{tree.layer.index}.{number}"
            os.link(found[0], holder)
            staged.append((name, holder))
        return staged

    def _keep_subtree(self) -> None:
        """Move the kept part of ``work/root`` into ``dest``."""
        root = self.work / "root"
        top = root
        if self.subtree is not None:
            found = _lookup(root, self.subtree)
            if found is None:
                raise StorageNotFound(
                    f"{self.source} has no '{self.subtree}/' folder, where a model image keeps its model"
                )
            if not stat.S_ISDIR(found[1].st_mode):
                raise InvalidRequest(f"{self.source}: '{self.subtree}' is not a folder")
            top = found[0]
        try:
            for entry in sorted(os.scandir(top), key=lambda e: e.name):
                if entry.name == self.work.name:
                    raise StorageError(f"{self.source} holds an entry {entry.name!r}, a name in use here")
                Path(entry.path).rename(self.dest / entry.name)
        except OSError as exc:
            raise _local_error(exc, f"placing the image's files in {self.dest}") from exc

    def _inspect(self, origins: Mapping[str, str]) -> tuple[int, int]:
        """Check every link of the result (inside ``dest``) and count its files and
        bytes (each inode once)."""
        real_dest = os.path.realpath(self.dest)
        prefix = "" if self.subtree is None else self.subtree + "/"
        files = 0
        total = 0
        seen: set[tuple[int, int]] = set()
        for folder, dirs, names in os.walk(self.dest):
            for name in (*dirs, *names):
                path = Path(folder) / name
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    if not is_within(os.path.realpath(path), real_dest):
                        rel = prefix + path.relative_to(self.dest).as_posix()
                        layer = origins.get(rel, "?")
                        target = str(path.readlink())
                        raise UnsafePath(
                            f"layer '{layer}': link {rel!r} -> {target!r} leads outside the model"
                        )
                elif stat.S_ISREG(st.st_mode):
                    files += 1
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_size
        return files, total


# --- helpers -------------------------------------------------------------------------------


def _relabelled(exc: SidecarError, label: str) -> SidecarError:
    """``exc`` with the archive wording of :mod:`puller.archive` said of a layer."""
    old = f"archive '{label}'"
    if old not in exc.message:
        return exc
    return type(exc)(exc.message.replace(old, f"layer '{label}'"))


def _write_stream(source: _LayerSource, target: Path) -> None:
    """Write all of ``source`` to the new file ``target`` (``0644``)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _local_error(exc, f"creating {target}") from exc
    view = memoryview(bytearray(CHUNK_BYTES))
    try:
        while count := source.readinto(view):
            done = 0
            while done < count:
                done += os.write(fd, view[done:count])
    except OSError as exc:
        raise _local_error(exc, f"writing {target}") from exc
    finally:
        os.close(fd)


def _within(rel: str, top: str) -> bool:
    return rel == top or rel.startswith(top + "/")


def _lookup(root: Path, rel: str) -> tuple[Path, os.stat_result] | None:
    """``root/rel`` and its lstat when it exists and every folder on the way is a real
    folder (links are not followed); None otherwise."""
    path = root
    st = root.lstat()
    for part in rel.split("/") if rel else ():
        if not stat.S_ISDIR(st.st_mode):
            return None
        path = path / part
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
    return path, st


def _remove_entry(path: Path, st: os.stat_result) -> None:
    """Remove a file, a link (never its target) or a folder tree."""
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _apply_whiteouts(root: Path, tree: _Tree) -> None:
    """Delete from ``root`` (the lower layers) what ``tree``'s whiteouts name."""
    for rel in tree.opaques:
        found = _lookup(root, rel)
        if found is not None and stat.S_ISDIR(found[1].st_mode):
            for entry in list(os.scandir(found[0])):
                _remove_entry(Path(entry.path), entry.stat(follow_symlinks=False))
    for rel in tree.whiteouts:
        found = _lookup(root, rel)
        if found is not None:
            _remove_entry(*found)


def _merge_tree(source: Path, root: Path, *, link: bool) -> None:
    """Move (or with ``link``, hard-link) the entries of ``source`` into ``root``: a
    file or link replaces what is there, a folder merges into a folder and replaces
    anything else. Nothing in ``root`` is followed."""
    stack = [(source, root)]
    while stack:  # one turn per folder of ``source``
        src, dst = stack.pop()
        with os.scandir(src) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        for entry in entries:
            target = dst / entry.name
            try:
                existing: os.stat_result | None = target.lstat()
            except FileNotFoundError:
                existing = None
            is_dir = entry.is_dir(follow_symlinks=False)
            if is_dir and existing is not None and stat.S_ISDIR(existing.st_mode):
                stack.append((Path(entry.path), target))
                continue
            if existing is not None:
                _remove_entry(target, existing)
            if not link:
                Path(entry.path).rename(target)
            elif is_dir:
                _link_tree(Path(entry.path), target)
            else:
                _link_entry(Path(entry.path), target)


def _link_entry(source: Path, target: Path) -> None:
    """``target`` as the same file as ``source`` (a hard link, or a copy where the
    filesystem has none), or the same symbolic link."""
    if source.is_symlink():
        target.symlink_to(source.readlink())
    else:
        link_or_copy(source, target)


def _link_tree(source: Path, target: Path) -> None:
    """A new folder ``target`` with the same entries as ``source``: folders made,
    files hard-linked, links copied."""
    stack = [(source, target)]
    while stack:  # one turn per folder of ``source``
        src, dst = stack.pop()
        dst.mkdir(mode=0o755)
        with os.scandir(src) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), dst / entry.name))
                else:
                    _link_entry(Path(entry.path), dst / entry.name)


def _place(holder: Path, root: Path, name: str, label: str) -> None:
    """Move the held file ``holder`` to ``root/name`` (a deferred hard link), its
    folders made when missing, replacing what is there."""
    path = root
    parts = name.split("/")
    for part in parts[:-1]:
        path = path / part
        try:
            st = path.lstat()
        except FileNotFoundError:
            path.mkdir(mode=0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise BadArchive(f"layer '{label}': hard link {name!r} lies below something that is not a folder")
    target = path / parts[-1]
    with contextlib.suppress(FileNotFoundError):
        _remove_entry(target, target.lstat())
    holder.rename(target)


def _tree_bytes(folder: Path) -> int:
    """Bytes of the regular files below ``folder`` (each inode once)."""
    total = 0
    seen: set[int] = set()
    for parent, _dirs, names in os.walk(folder):
        for name in names:
            st = (Path(parent) / name).lstat()
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def _fresh_folder(folder: Path) -> None:
    """``folder`` empty: what an earlier attempt left is removed."""
    remove_tree(folder)
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise _local_error(exc, f"creating {folder}") from exc


def _empty_folder(folder: Path) -> None:
    """Remove everything in ``folder`` (best effort: after an error, whose report
    matters more)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(SidecarError):
            remove_tree(entry)


def _local_error(exc: OSError, what: str) -> SidecarError:
    if exc.errno in _DISK_FULL_ERRNOS:
        return DiskFull(f"no space left on the device while {what}")
    return StorageError(f"local filesystem error while {what}: {exc.strerror or exc}")


def _backoff(attempt: int) -> float:
    """Seconds before attempt ``attempt + 1``: exponential, capped, half of it random."""
    delay = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2.0**attempt)
    jitter: float = random.uniform(0, delay / 2)  # noqa: S311 - jitter, not crypto
    return delay / 2 + jitter
