"""The content cache: blobs fetched once, models built from hard links.

Layout under ``ROOT_MODEL_DIR/_cache/``::

    blobs/<k[:2]>/<k>        the bytes of one blob, read-only (0444)
    blobs/<k[:2]>/<k>.json   what they are: storage identity, blob name, version, size
    tmp/                     entries being written (swept at start)

``k`` is the sha256 of (storage identity, blob name, blob version, size), so a changed
object (new ETag, generation or version id) is a different entry and is fetched
afresh. A blob without a version is never cached: nothing would tell a changed object
from the cached one.

Entries enter only after a fetch succeeded (every size and checksum verified): the
fetched file is linked (or, where hard links fail, cloned or copied) into ``tmp/``
under a unique name, then renamed into ``blobs/``, its metadata file last. An entry is
complete when both files exist; :meth:`ContentCache.open` removes everything else,
so a crash never leaves a half-written entry in use.

A model directory uses an entry through a hard link, so an entry whose link count is
above 1 is in use and is never evicted; the others are evicted least recently used
first (last use = the metadata file's mtime, so it survives a restart) until the
cache holds at most ``max_bytes``. A blob larger than ``max_bytes`` is not cached.

Tree entries (:meth:`ContentCache.admit_tree`, used for unpacked image layers) are a
folder in place of the file: its regular files read-only, its folders not (nothing
links a folder), with a small JSON ``info`` kept in the metadata. Such an entry counts
its unpacked bytes, is pinned while a pull links from it, and is in use while any of
its files has more links than the tree itself holds.

Every method is blocking and thread-safe; the puller calls them from worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from adapter.errors import DiskFull, StorageError
from puller.metrics import PullMetrics
from puller.storage.base import Blob

log = structlog.get_logger(__name__)

#: the cache's directory under ROOT_MODEL_DIR
CACHE_DIR_NAME = "_cache"
#: permissions of every cached file: shared bytes must not be changed through a link
READ_ONLY = 0o444

_META_SUFFIX = ".json"
_META_FORMAT = 1
#: ioctl FICLONE (linux/fs.h): share the extents of a file on btrfs, xfs, ...
_FICLONE = 0x40049409
#: errors of os.link that mean "no hard link here", not "something is broken"
_NO_LINK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def cache_key(identity: str, blob: Blob) -> str | None:
    """The cache key of ``blob`` on the store ``identity``; ``None`` when the blob has
    no version (such blobs are not cached)."""
    if not blob.version:
        return None
    material = json.dumps([identity, blob.name, blob.version, blob.size], ensure_ascii=False)
    # a store's JSON listing can spell a lone surrogate in a name: still one key of its own
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()


def clone_or_copy(source: Path, target: Path) -> None:
    """Create ``target`` (which must not exist) with the bytes of ``source``: a
    copy-on-write clone where the filesystem offers one, else a plain copy. On failure
    no ``target`` is left behind."""
    with source.open("rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(fd, "wb") as dst:
                try:
                    fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
                except OSError:
                    shutil.copyfileobj(src, dst, 1024 * 1024)
        except BaseException:
            target.unlink(missing_ok=True)
            raise


def link_or_copy(source: Path, target: Path) -> bool:
    """Make ``target`` the same bytes as ``source``: a hard link when the filesystem
    allows one (returns True), else a clone or copy (returns False). Raises
    ``OSError`` (``FileNotFoundError`` when ``source`` is gone, ``FileExistsError``
    when ``target`` exists)."""
    try:
        os.link(source, target)
        return True
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
    clone_or_copy(source, target)
    return False


def _os_error(exc: OSError, what: str) -> Exception:
    if exc.errno in _DISK_FULL_ERRNOS:
        return DiskFull(f"no space left on the device while {what}")
    return StorageError(f"local filesystem error while {what}: {exc.strerror or exc}")


@dataclass
class _Entry:
    key: str
    size: int
    last_used: float
    #: a tree entry's info (see :meth:`ContentCache.admit_tree`); None for a blob file
    info: dict[str, Any] | None = None


@dataclass(frozen=True)
class CachedTree:
    """A tree entry held by one pull: pinned (never evicted) until
    :meth:`ContentCache.release`. ``path`` is the folder, ``info`` what was stored with
    it; neither may be changed."""

    key: str
    path: Path
    info: Mapping[str, Any]


@dataclass
class Checkout:
    """What :meth:`ContentCache.checkout` did: the blobs now at their targets (served
    from the cache) and the blobs still to fetch, in plan order."""

    hits: list[Blob] = field(default_factory=list)
    misses: list[Blob] = field(default_factory=list)

    @property
    def hit_bytes(self) -> int:
        return sum(b.size for b in self.hits)


class ContentCache:
    """The content cache of one ROOT_MODEL_DIR, capped at ``max_bytes`` (> 0).

    Call :meth:`open` once before use (it rebuilds the index from disk)."""

    def __init__(self, root_model_dir: Path, max_bytes: int, *, metrics: PullMetrics | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError("a content cache needs a positive byte cap")
        self.path = Path(root_model_dir) / CACHE_DIR_NAME
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._blobs = self.path / "blobs"
        self._tmp = self.path / "tmp"
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._pins: dict[str, int] = {}
        self._opened = False

    # --- state ------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._opened

    @property
    def total_bytes(self) -> int:
        """Bytes of every entry (in use or not)."""
        with self._lock:
            return self._total()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def blob_path(self, key: str) -> Path:
        """Where the bytes of entry ``key`` live."""
        return self._blobs / key[:2] / key

    def _meta_path(self, key: str) -> Path:
        return self._blobs / key[:2] / (key + _META_SUFFIX)

    def _total(self) -> int:
        return sum(e.size for e in self._entries.values())

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.cache_state(self._total(), len(self._entries))

    # --- start --------------------------------------------------------------------------

    def open(self) -> None:
        """Create the cache directories, remove half-written entries (everything in
        ``tmp/``, a blob without its metadata or the reverse, metadata that does not
        describe its blob), rebuild the index from what remains, and evict down to the
        cap. Raises ``StorageError`` when the directories cannot be created."""
        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, f"creating the content cache at {self.path}") from exc
        swept = 0
        for leftover in list(self._tmp.iterdir()):
            _remove(leftover)
            swept += 1
        entries: dict[str, _Entry] = {}
        for shard in sorted(self._blobs.iterdir()):
            if not shard.is_dir() or shard.is_symlink():
                _remove(shard)
                swept += 1
                continue
            found = self._scan_shard(shard)
            entries.update(found)
            known = set(found) | {k + _META_SUFFIX for k in found}
            for item in sorted(shard.iterdir()):
                if item.name not in known:
                    _remove(item)
                    swept += 1
        with self._lock:
            self._entries = entries
            self._opened = True
            self._publish()
        if swept:
            log.info("content cache: removed half-written entries", count=swept)
        self.evict()
        log.info("content cache ready", entries=len(self), bytes=self.total_bytes, max_bytes=self.max_bytes)

    def _scan_shard(self, shard: Path) -> dict[str, _Entry]:
        """The complete entries of one shard folder."""
        found: dict[str, _Entry] = {}
        for meta in shard.glob("*" + _META_SUFFIX):
            key = meta.name.removesuffix(_META_SUFFIX)
            entry = self._read_entry(shard, key, meta)
            if entry is not None:
                found[key] = entry
        return found

    @staticmethod
    def _read_entry(shard: Path, key: str, meta: Path) -> _Entry | None:
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            meta_stat = meta.stat()
            blob_stat = (shard / key).lstat()
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != _META_FORMAT:
            return None
        if data.get("kind") == "tree":
            return ContentCache._read_tree_entry(shard, key, data, meta_stat, blob_stat)
        try:
            blob = Blob(
                name=str(data["name"]),
                relpath="",
                size=int(data["size"]),
                version=str(data["version"] or "") or None,
            )
        except (KeyError, TypeError, ValueError):
            return None
        if (
            cache_key(str(data.get("identity", "")), blob) != key
            or shard.name != key[:2]
            or not stat.S_ISREG(blob_stat.st_mode)
            or blob_stat.st_size != blob.size
        ):
            return None
        if stat.S_IMODE(blob_stat.st_mode) != READ_ONLY:
            with contextlib.suppress(OSError):
                (shard / key).chmod(READ_ONLY)
        return _Entry(key=key, size=blob.size, last_used=meta_stat.st_mtime)

    @staticmethod
    def _read_tree_entry(
        shard: Path, key: str, data: dict[str, Any], meta_stat: os.stat_result, tree_stat: os.stat_result
    ) -> _Entry | None:
        try:
            blob = Blob(
                name=str(data["name"]),
                relpath="",
                size=int(data["size"]),
                version=str(data["version"] or "") or None,
            )
            size = int(data["bytes"])
            info = data["info"]
        except (KeyError, TypeError, ValueError):
            return None
        if (
            cache_key(str(data.get("identity", "")), blob) != key
            or shard.name != key[:2]
            or not stat.S_ISDIR(tree_stat.st_mode)
            or not isinstance(info, dict)
            or size < 0
        ):
            return None
        return _Entry(key=key, size=size, last_used=meta_stat.st_mtime, info=info)

    # --- use ----------------------------------------------------------------------------

    def checkout(self, identity: str, placements: Sequence[tuple[Blob, Path]]) -> Checkout:
        """Put every cached blob of ``placements`` (blob, target file) at its target:
        a hard link into the cache where the filesystem allows, else a clone or copy
        (read-only either way). Parent folders are created. Blobs that are not cached
        (or have no version) are returned as misses, untouched. Marks the hits as used
        now. Raises ``StorageError``/``DiskFull`` when a target cannot be created
        (targets already made stay: they lie in the caller's staging folder)."""
        result = Checkout()
        copies: list[tuple[Blob, str, Path]] = []
        now = time.time()
        with self._lock:
            for blob, target in placements:
                key = cache_key(identity, blob) if self._opened else None
                entry = self._entries.get(key) if key is not None else None
                if key is None or entry is None or entry.info is not None or entry.size != blob.size:
                    result.misses.append(blob)
                    continue
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise _os_error(exc, f"creating {target.parent}") from exc
                try:
                    os.link(self.blob_path(key), target)
                except FileNotFoundError:
                    self._forget(key)  # removed behind our back: fetch it again
                    result.misses.append(blob)
                    continue
                except OSError as exc:
                    if exc.errno not in _NO_LINK_ERRNOS:
                        raise _os_error(exc, f"linking {target} from the content cache") from exc
                    self._pins[key] = self._pins.get(key, 0) + 1
                    copies.append((blob, key, target))
                else:
                    result.hits.append(blob)
                self._touch(entry, now)
        try:
            for blob, key, target in copies:
                try:
                    clone_or_copy(self.blob_path(key), target)
                    target.chmod(READ_ONLY)
                except FileNotFoundError:
                    result.misses.append(blob)
                except OSError as exc:
                    raise _os_error(exc, f"copying {target} from the content cache") from exc
                else:
                    result.hits.append(blob)
        finally:
            with self._lock:
                for _blob, key, _target in copies:
                    self._pins[key] -= 1
                    if not self._pins[key]:
                        del self._pins[key]
        return result

    def _touch(self, entry: _Entry, now: float) -> None:
        entry.last_used = now
        with contextlib.suppress(OSError):
            os.utime(self._meta_path(entry.key), (now, now))

    def _forget(self, key: str) -> None:
        self._entries.pop(key, None)
        _remove(self._meta_path(key))
        self._publish()

    def admit(self, identity: str, fetched: Iterable[tuple[Blob, Path]]) -> int:
        """Add fetched, verified files to the cache: each ``(blob, file)`` becomes read
        only (0444) and is linked (or cloned/copied) into the cache, unless it has no
        version, is larger than the cap or is cached already. Returns how many entries
        were added. A file that cannot be added is logged and skipped: the cache never
        fails a pull."""
        added = 0
        for blob, path in fetched:
            key = cache_key(identity, blob)
            if key is None or blob.size > self.max_bytes or not self._opened:
                continue
            with self._lock:
                if key in self._entries:
                    continue
            try:
                self._add(identity, key, blob, path)
            except OSError as exc:
                log.warning(
                    "content cache: could not add a blob", blob=blob.name, error=exc.strerror or str(exc)
                )
                continue
            added += 1
        return added

    def _add(self, identity: str, key: str, blob: Blob, path: Path) -> None:
        path.chmod(READ_ONLY)
        unique = uuid.uuid4().hex
        tmp_blob = self._tmp / f"{key}.{unique}"
        tmp_meta = self._tmp / f"{key}.{unique}{_META_SUFFIX}"
        meta = {
            "format": _META_FORMAT,
            "identity": identity,
            "name": blob.name,
            "version": blob.version,
            "size": blob.size,
        }
        try:
            link_or_copy(path, tmp_blob)
            tmp_blob.chmod(READ_ONLY)
            tmp_meta.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            shard = self._blobs / key[:2]
            shard.mkdir(exist_ok=True)
            with self._lock:
                if key in self._entries:  # another pull added it meanwhile
                    return
                tmp_blob.replace(self.blob_path(key))
                tmp_meta.replace(self._meta_path(key))  # the entry is complete from here
                self._entries[key] = _Entry(key=key, size=blob.size, last_used=time.time())
                self._publish()
        finally:
            tmp_blob.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)

    # --- tree entries -------------------------------------------------------------------

    def pin_tree(self, identity: str, blob: Blob) -> CachedTree | None:
        """The tree entry of ``blob`` (see :meth:`admit_tree`), marked used now and
        pinned until :meth:`release`; None when there is none."""
        key = cache_key(identity, blob)
        if key is None or not self._opened:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.info is None:
                return None
            path = self.blob_path(key)
            if not path.is_dir() or path.is_symlink():
                self._forget(key)  # removed behind our back (the folder is swept at start)
                return None
            self._pins[key] = self._pins.get(key, 0) + 1
            self._touch(entry, time.time())
            return CachedTree(key=key, path=path, info=entry.info)

    def release(self, tree: CachedTree) -> None:
        """Unpin a tree returned by :meth:`pin_tree` or :meth:`admit_tree`."""
        with self._lock:
            left = self._pins.get(tree.key, 0) - 1
            if left > 0:
                self._pins[tree.key] = left
            else:
                self._pins.pop(tree.key, None)

    def admit_tree(
        self, identity: str, blob: Blob, tree: Path, *, size: int, info: Mapping[str, Any]
    ) -> CachedTree | None:
        """Move the finished, verified folder ``tree`` into the cache as the entry of
        ``blob``, its regular files made read-only (``0444``, ``0555`` when
        executable), with ``size`` (its unpacked bytes) counted against the cap and
        ``info`` (JSON) kept beside it. Returns it pinned (:meth:`release` it), or None
        when it was not added: no version, larger than the cap, already cached, or a
        filesystem error (logged; the cache never fails a pull). On None the folder
        stays at ``tree`` (possibly made read-only)."""
        key = cache_key(identity, blob)
        if key is None or size > self.max_bytes or not self._opened:
            return None
        with self._lock:
            if key in self._entries:
                return None
        tmp_meta = self._tmp / f"{key}.{uuid.uuid4().hex}{_META_SUFFIX}"
        meta = {
            "format": _META_FORMAT,
            "kind": "tree",
            "identity": identity,
            "name": blob.name,
            "version": blob.version,
            "size": blob.size,
            "bytes": size,
            "info": dict(info),
        }
        try:
            _make_tree_read_only(tree)
            tmp_meta.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            shard = self._blobs / key[:2]
            shard.mkdir(exist_ok=True)
            with self._lock:
                if key in self._entries:  # another pull added it meanwhile
                    return None
                target = self.blob_path(key)
                tree.rename(target)
                try:
                    tmp_meta.replace(self._meta_path(key))  # the entry is complete from here
                except OSError:
                    target.rename(tree)
                    raise
                entry = _Entry(key=key, size=size, last_used=time.time(), info=dict(info))
                self._entries[key] = entry
                self._pins[key] = self._pins.get(key, 0) + 1
                self._publish()
                return CachedTree(key=key, path=target, info=entry.info or {})
        except OSError as exc:
            log.warning("content cache: could not add a tree", blob=blob.name, error=exc.strerror or str(exc))
            return None
        finally:
            tmp_meta.unlink(missing_ok=True)

    # --- eviction -----------------------------------------------------------------------

    def evict(self) -> list[str]:
        """Remove unused entries (link count 1, not being copied), least recently
        used first, until the cache holds at most ``max_bytes`` or only entries in
        use remain. Returns the keys removed."""
        removed: list[str] = []
        with self._lock:
            total = self._total()
            if total <= self.max_bytes:
                return removed
            for entry in sorted(self._entries.values(), key=lambda e: (e.last_used, e.key)):
                if total <= self.max_bytes:
                    break
                if self._pins.get(entry.key):
                    continue
                blob = self.blob_path(entry.key)
                try:
                    if entry.info is not None:
                        if _tree_in_use(blob):
                            continue  # a model directory links one of its files
                        shutil.rmtree(blob)
                    elif blob.lstat().st_nlink > 1:
                        continue  # a model directory links it
                    else:
                        blob.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("content cache: could not evict", key=entry.key, error=exc.strerror)
                    continue
                _remove(self._meta_path(entry.key))
                del self._entries[entry.key]
                total -= entry.size
                removed.append(entry.key)
            self._publish()
        if removed:
            if self.metrics is not None:
                self.metrics.cache_evictions.inc(len(removed))
            log.info("content cache: evicted unused blobs", count=len(removed), bytes_left=total)
        return removed


def _make_tree_read_only(tree: Path) -> None:
    """Every regular file below ``tree`` becomes ``0444`` (``0555`` when executable by
    its owner); folders and links are left as they are. Raises ``OSError``."""
    for folder, _dirs, files in os.walk(tree):
        for name in files:
            path = Path(folder) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                path.chmod(0o555 if st.st_mode & stat.S_IXUSR else READ_ONLY)


def _tree_in_use(tree: Path) -> bool:
    """True when a regular file below ``tree`` has more links than the tree holds
    (a model directory links it). Raises ``FileNotFoundError`` when ``tree`` is gone."""
    tree.lstat()
    names: dict[int, int] = {}
    links: dict[int, int] = {}
    for folder, _dirs, files in os.walk(tree):
        for name in files:
            st = (Path(folder) / name).lstat()
            if stat.S_ISREG(st.st_mode):
                names[st.st_ino] = names.get(st.st_ino, 0) + 1
                links[st.st_ino] = st.st_nlink
    return any(links[ino] > count for ino, count in names.items())


def _remove(path: Path) -> None:
    """Remove a file or folder; absent is fine, errors are logged (best effort)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("content cache: could not remove", path=str(path), error=exc.strerror)
