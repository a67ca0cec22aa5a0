"""Storage backends over a local directory: the shared base, and type ``file``.

:class:`LocalDirectoryStorage` answers ``plan`` and ``open_range`` for any backend whose
objects are files under one directory (``file`` here, ``pvc`` in :mod:`puller.storage.pvc`).
Every model path is resolved (symbolic links included) and must stay inside that
directory: a name or a link leading outside is refused with ``UnsafePath``.

``file`` serves demos and local development: config ``{"type": "file", "root": DIR}``;
a model path is relative to ``root``.
"""

from __future__ import annotations

import abc
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, ClassVar

from adapter.errors import (
    IntegrityError,
    StorageConfigError,
    StorageError,
    StorageNotFound,
    UnsafePath,
)
from puller.placement import is_within
from puller.storage.base import Blob, ByteStream, Plan, Storage

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.config import StorageConfig

#: a plan of more files (or directories) than this is refused: a farm of links to
#: directories could otherwise list for a very long time
MAX_FILES = 1_000_000
MAX_DIRECTORIES = 100_000

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _posix_relative(real: str, root_real: str) -> str:
    """``real`` relative to ``root_real`` in posix form (``.`` for the root itself)."""
    return PurePosixPath(*Path(os.path.relpath(real, root_real)).parts).as_posix()


def _resolve_below(root_real: str, relative: str) -> tuple[str, os.stat_result | None]:
    """``root_real/relative`` resolved (``root_real`` is resolved already), and its
    ``lstat`` when no component of ``relative`` is a link (then only those components
    were looked at); otherwise ``os.path.realpath`` of the whole, and ``None``."""
    if not relative:
        return root_real, None
    base = root_real.rstrip("/")
    whole = f"{base}/{relative}"
    parts = relative.split("/")
    if "" in parts or "." in parts or ".." in parts:
        return os.path.realpath(whole), None
    current = base
    found: os.stat_result | None = None
    for part in parts:
        current = f"{current}/{part}"
        try:
            found = os.lstat(current)
        except OSError:
            return os.path.realpath(whole), None  # missing: the caller's stat says so
        if stat.S_ISLNK(found.st_mode):
            return os.path.realpath(whole), None
    return current, found


def _version(st: os.stat_result) -> str:
    """What identifies a local file's bytes: its device and inode (which file), its
    size and modification time (which contents)."""
    return f"{st.st_dev:x}-{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


@dataclass(frozen=True)
class _Located:
    real: str
    st: os.stat_result


class LocalDirectoryStorage(Storage):
    """A backend whose objects are the regular files under one local directory.

    Subclasses set :attr:`root` (absolute) in their constructor and may override
    :meth:`describe` for messages. ``Blob.name`` is the file's path relative to the
    root, in posix form, one that resolves to the planned file (a listed file keeps
    its own name, which may be a link's); ``open_range`` resolves and checks it again,
    so a link changed after the plan cannot lead outside either.
    """

    #: the directory the objects live under, absolute (set by the subclass)
    root: Path

    reads_locally = True

    #: :attr:`root` resolved, once it was found to be a directory
    _resolved_root: str | None = None

    @abc.abstractmethod
    def describe(self) -> str:
        """The store named for messages (public values only), e.g. ``PVC 'models'``."""

    # -- path resolution ----------------------------------------------------------

    def _root_real(self) -> str:
        """The root, resolved; checked to be a directory. Resolved once per backend
        (a storage config that changes makes a new backend); its existence is checked
        every time."""
        real = self._resolved_root
        if real is None:
            real = os.path.realpath(self.root)
        try:
            st = os.stat(real)  # noqa: PTH116 - a hot path: no Path object
        except FileNotFoundError:
            raise StorageNotFound(f"{self.describe()}: directory {str(self.root)!r} does not exist") from None
        except OSError as exc:
            raise StorageError(
                f"{self.describe()}: directory {str(self.root)!r} cannot be read ({_errno_name(exc)})"
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise StorageNotFound(f"{self.describe()}: {str(self.root)!r} is not a directory")
        self._resolved_root = real
        return real

    def _locate(self, path: str) -> tuple[str, _Located]:
        """``(root_real, located)`` for a model path: resolved, inside the root, existing.

        Raises ``UnsafePath`` for a NUL or a path (or link) leading outside the root,
        ``StorageNotFound`` when nothing is there.
        """
        if "\x00" in path:
            raise UnsafePath(f"{self.describe()}: path {path!r} contains a NUL character")
        relative = path.lstrip("/")
        root_real = self._root_real()
        real, found = _resolve_below(root_real, relative)
        if not is_within(real, root_real):
            raise UnsafePath(f"{self.describe()}: path {path!r} leads outside the storage root")
        if found is not None:
            return root_real, _Located(real, found)
        try:
            st = Path(real).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise StorageNotFound(f"{self.describe()}: nothing at path {path!r}") from None
        except OSError as exc:
            raise StorageError(
                f"{self.describe()}: path {path!r} cannot be read ({_errno_name(exc)})"
            ) from None
        return root_real, _Located(real, st)

    def resolve(self, path: str) -> str:
        """The absolute resolved path of ``path`` (file or directory), checked to exist
        and to stay inside the root."""
        return self._locate(path)[1].real

    # -- Storage -------------------------------------------------------------------

    def plan(self, path: str) -> Plan:
        """A file: a single-object plan (relpath = its name). A directory (the whole
        root for an empty path): every regular file below it, relpaths relative to it,
        sorted; links are followed while they stay inside the root (one leading
        outside raises ``UnsafePath``), empty directories and special files skipped.
        ``StorageNotFound`` when there is nothing, or no file below the directory."""
        root_real, located = self._locate(path)
        if stat.S_ISREG(located.st.st_mode):
            name = _posix_relative(located.real, root_real)
            # the object lands under the name the caller used, not a link target's
            relpath = PurePosixPath(path.lstrip("/")).name
            if relpath in ("", ".", ".."):
                relpath = PurePosixPath(name).name
            return Plan(blobs=(self._blob(name, relpath, located.st),), single_object=True)
        if not stat.S_ISDIR(located.st.st_mode):
            raise StorageNotFound(f"{self.describe()}: path {path!r} is not a regular file or a directory")
        blobs = self._walk(root_real, located)
        if not blobs:
            raise StorageNotFound(f"{self.describe()}: no files under path {path!r}")
        return Plan(blobs=tuple(blobs), single_object=False)

    def _walk(self, root_real: str, top: _Located) -> list[Blob]:
        """Every regular file below ``top``. A linked directory is walked like a real
        one (so a tree reached under two names is listed under both, as ``cp -rL``
        would copy it) unless it is one of its own ancestors, which would never end."""
        blobs: list[Blob] = []
        # (real directory, its name relative to the root, its relpath under the plan,
        #  the (device, inode) of it and its ancestors)
        pending: list[tuple[str, str, str, frozenset[tuple[int, int]]]] = [
            (top.real, _posix_relative(top.real, root_real), "", frozenset({(top.st.st_dev, top.st.st_ino)}))
        ]
        scanned = 0
        while pending:
            real_dir, listed_dir, rel_dir, ancestors = pending.pop()
            scanned += 1
            if scanned > MAX_DIRECTORIES:
                raise StorageError(
                    f"{self.describe()}: more than {MAX_DIRECTORIES} directories under one path"
                )
            try:
                with os.scandir(real_dir) as it:
                    children = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                raise StorageError(
                    f"{self.describe()}: directory {listed_dir!r} cannot be listed ({_errno_name(exc)})"
                ) from None
            for child in children:
                listed = child.name if listed_dir == "." else f"{listed_dir}/{child.name}"
                relpath = child.name if not rel_dir else f"{rel_dir}/{child.name}"
                real = child.path
                if child.is_symlink():
                    real = os.path.realpath(child.path)
                    if not is_within(real, root_real):
                        raise UnsafePath(
                            f"{self.describe()}: {listed!r} is a symbolic link leading outside "
                            "the storage root"
                        )
                try:
                    st = Path(real).stat()
                except (FileNotFoundError, NotADirectoryError):
                    continue  # a dangling link
                except OSError as exc:
                    raise StorageError(
                        f"{self.describe()}: {listed!r} cannot be read ({_errno_name(exc)})"
                    ) from None
                if stat.S_ISREG(st.st_mode):
                    blobs.append(self._blob(listed, relpath, st))
                    if len(blobs) > MAX_FILES:
                        raise StorageError(f"{self.describe()}: more than {MAX_FILES} files under one path")
                elif stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in ancestors:
                    pending.append((real, listed, relpath, ancestors | {(st.st_dev, st.st_ino)}))
        blobs.sort(key=lambda b: b.relpath)
        return blobs

    @staticmethod
    def _blob(name: str, relpath: str, st: os.stat_result) -> Blob:
        return Blob(name=name, relpath=relpath, size=st.st_size, version=_version(st))

    def open_range(self, blob: Blob, start: int, end: int) -> ByteStream:
        """Bytes ``[start, end)`` of the file ``blob.name``: the very file the plan
        listed (same device, inode, size and modification time, so inside the root
        as the plan checked), or else resolved and checked again. ``IntegrityError``
        when the file is now shorter than ``end``."""
        if start < 0 or end < start:
            raise StorageError(f"{self.describe()}: invalid byte range [{start}, {end}) for {blob.name!r}")
        fd = self._open_as_planned(blob, end)
        if fd is not None:
            return FileRange(fd, start, end, blob.name)
        _, located = self._locate(blob.name)
        try:
            fd = os.open(located.real, _OPEN_FLAGS)
        except FileNotFoundError:
            raise StorageNotFound(f"{self.describe()}: {blob.name!r} disappeared") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"{self.describe()}: {blob.name!r} was replaced by a link") from None
            raise StorageError(
                f"{self.describe()}: {blob.name!r} cannot be opened ({_errno_name(exc)})"
            ) from None
        try:
            self._check_opened(fd, blob, end)
        except BaseException:
            os.close(fd)
            raise
        return FileRange(fd, start, end, blob.name)

    def _open_as_planned(self, blob: Blob, end: int) -> int | None:
        """``blob.name`` opened below the resolved root when it is still the file the
        plan listed and resolved inside the root (the same device and inode, size and
        modification time: :func:`_version`); ``None`` otherwise (not planned here, a
        link at its end, moved, changed), for the caller to resolve and check again."""
        root_real = self._resolved_root
        name = blob.name
        if root_real is None or not blob.version or end > blob.size:
            return None
        if name.startswith("/") or ".." in name.split("/"):
            return None  # never planned here
        try:
            fd = os.open(f"{root_real}/{name}", _OPEN_FLAGS)
        except OSError:
            return None
        try:
            same = _version(os.fstat(fd)) == blob.version
        except OSError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def _check_opened(self, fd: int, blob: Blob, end: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageNotFound(f"{self.describe()}: {blob.name!r} is no longer a regular file")
        if st.st_size < end:
            raise IntegrityError(
                f"{self.describe()}: {blob.name!r} is {st.st_size} bytes, shorter than the range end {end}"
            )


class FileRange:
    """An open byte range of a local file, read with ``preadv`` straight into the
    caller's buffer (no intermediate ``bytes``). Owns ``fd`` and closes it."""

    def __init__(self, fd: int, start: int, end: int, name: str) -> None:
        self._fd = fd
        self._pos = start
        self._end = end
        self._name = name

    def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` with the next bytes of the range; 0 once the range is done.
        ``IntegrityError`` when the file ends before the range does."""
        remaining = self._end - self._pos
        if remaining <= 0 or len(buffer) == 0:
            return 0
        view = buffer[:remaining] if len(buffer) > remaining else buffer
        count = os.preadv(self._fd, [view], self._pos)
        if count == 0:
            raise IntegrityError(
                f"{self._name!r} ended at byte {self._pos}, before the range end {self._end}"
            )
        self._pos += count
        return count

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> FileRange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class FileStorage(LocalDirectoryStorage):
    """Type ``file``: models under a local directory, config field ``root`` (required).
    For demos and local development; the engine downloads (copies) from it."""

    types: ClassVar[tuple[str, ...]] = ("file",)

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        super().__init__(config, settings)
        root = config.get("root")
        if not isinstance(root, str) or not root:
            raise StorageConfigError('file storage needs "root", the directory the models are under')
        if "\x00" in root:
            raise StorageConfigError('file storage "root" contains a NUL character')
        self.root = Path(os.path.normpath(Path(root).absolute()))

    def describe(self) -> str:
        return f"file storage {str(self.root)!r}"

    def identity(self) -> str:
        return f"file:{self.root}"
