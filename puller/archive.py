"""Unpacking a model archive (``.tar``, ``.tar.gz``/``.tgz``, ``.zip``) safely.

An archive comes from a store we do not control, so every entry is checked before
anything is created for it, by our own code (Python's extraction filters are only a
second opinion):

- names: no absolute names, no ``..`` components, no NUL or backslash
  (:func:`~puller.placement.safe_relpath`), and no path through a link that leads
  outside the destination (:func:`~puller.placement.safe_join`);
- symbolic links: the target must be relative and must stay inside the destination,
  both written out and resolved through the links already there (re-checked once every
  entry is out, since a later link can change where an earlier one leads);
- hard links: only to a regular file this archive already unpacked (by the same name);
- device files, FIFOs, sockets and unknown entry types are refused;
- modes: files get ``0o644``, or ``0o755`` when the archive marks them executable;
  folders ``0o755``; never setuid, setgid or sticky bits, never an owner from the
  archive;
- sizes: every size an entry declares counts towards ``max_bytes`` before it is
  unpacked, the bytes actually written count again while they are written, an entry
  may not deliver more or fewer bytes than it declared, and ``max_members`` caps the
  number of entries. A zip bomb fails on its declared sizes before a byte is written;
  one whose headers lie fails on its actual bytes (or on zip's CRC, since Python's
  zipfile stops at the declared size).

Everything streams: tar through :mod:`tarfile` over a guarded reader (one entry's data
at a time; a single header read larger than :data:`HEADER_READ_LIMIT`, i.e. a giant pax
or GNU long-name header, is refused instead of being read into memory), zip through
:mod:`zipfile` reading the archive file in place.

On any error the destination may hold part of the archive: the caller removes it
(the Puller unpacks into its staging directory, which it deletes on every error).
Nothing is ever written outside the destination.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import posixpath
import stat
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol, cast

from adapter.errors import (
    ArchiveTooLarge,
    BadArchive,
    DiskFull,
    SidecarError,
    StorageError,
    UnsafePath,
)
from puller.engine import FetchCancelled
from puller.placement import safe_join, safe_relpath

#: archive kinds, as :func:`is_archive` and :func:`sniff_archive` name them
TAR, TAR_GZ, ZIP = "tar", "tar.gz", "zip"

#: most entries (files, folders, links) one archive may hold
MAX_MEMBERS = 100_000

#: the largest single read tarfile may make for one header (pax, GNU long names)
HEADER_READ_LIMIT = 16 * 1024 * 1024

#: the longest symbolic link target a zip entry may hold
_LINK_TARGET_LIMIT = 4096
_COPY_BUFFER_BYTES = 1024 * 1024
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: what reading a broken archive raises (RecursionError: tarfile follows chains of pax
#: headers recursively)
_READ_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    RecursionError,
)


def is_archive(name: str) -> str | None:
    """The archive kind a file name announces (case-insensitive): ``"tar"`` for
    ``.tar``, ``"tar.gz"`` for ``.tar.gz`` and ``.tgz``, ``"zip"`` for ``.zip``;
    None for any other name."""
    lowered = name.lower()
    if lowered.endswith((".tar.gz", ".tgz")):
        return TAR_GZ
    if lowered.endswith(".tar"):
        return TAR
    if lowered.endswith(".zip"):
        return ZIP
    return None


def sniff_archive(path: Path) -> str | None:
    """The archive kind of the file at ``path`` by its first bytes: gzip (taken as a
    ``tar.gz``), zip (a local header or an empty archive's end record), or a POSIX/GNU
    tar (``ustar`` at offset 257); None otherwise. Raises ``OSError`` when the file
    cannot be read."""
    with path.open("rb") as handle:
        head = handle.read(262)
    if head.startswith(b"\x1f\x8b"):
        return TAR_GZ
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ZIP
    if head[257:262] == b"ustar":
        return TAR
    return None


def unpack_archive(
    archive: Path,
    dest: Path,
    *,
    max_bytes: int,
    max_members: int = MAX_MEMBERS,
    cancel: threading.Event | None = None,
) -> int:
    """Unpack ``archive`` into ``dest`` and return the bytes written (file data; hard
    links add nothing). Blocking.

    ``dest`` must be an empty directory or absent (it is then created). The kind is
    taken from the file's first bytes, else from its name. Guarantees on return: every
    entry passed the checks of the module docstring, and nothing was created outside
    ``dest``. Raises :class:`UnsafePath` (a name or link leading outside, a device file
    or FIFO), :class:`ArchiveTooLarge` (over ``max_bytes`` declared or written, over
    ``max_members`` entries), :class:`BadArchive` (unreadable or corrupt),
    :class:`DiskFull`, :class:`StorageError` (another local error), or
    :class:`FetchCancelled` soon after ``cancel`` is set; each names the archive and,
    where there is one, the entry. After an error ``dest`` may hold part of the
    archive: the caller removes it.
    """
    label = archive.name
    try:
        kind = sniff_archive(archive) or is_archive(archive.name)
    except OSError as exc:
        raise StorageError(f"cannot read the archive '{label}': {exc.strerror or exc}") from exc
    if kind is None:
        raise BadArchive(f"'{label}' is not a tar, tar.gz or zip archive")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise StorageError(f"cannot unpack '{label}' into {dest}: the folder is not empty")
    except OSError as exc:
        raise _local_error(exc, f"creating {dest}") from exc
    unpacker = TarUnpacker(label, dest, max_bytes, max_members, cancel)
    if kind == ZIP:
        unpacker.unpack_zip(archive)
    else:
        unpacker.unpack_tar(archive, compressed=kind == TAR_GZ)
    unpacker.check_links()
    return unpacker.written


# --- the unpacker -----------------------------------------------------------------------


class _Readable(Protocol):
    """An entry's data: tarfile's and zipfile's entry readers both have it."""

    def readinto(self, buffer: memoryview, /) -> int: ...


class _RawReader(Protocol):
    """What tarfile needs of the (decompressed) archive."""

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def tell(self) -> int: ...


class TarUnpacker:
    """The state of one unpacking: what was declared, written and created so far."""

    def __init__(
        self, label: str, dest: Path, max_bytes: int, max_members: int, cancel: threading.Event | None
    ) -> None:
        self.label = label
        self.dest = dest
        self.real_dest = os.path.realpath(dest)
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.cancel = cancel
        self.members = 0
        self.declared = 0
        self.written = 0
        #: relpaths of the regular files unpacked (hard links may point at these)
        self.files: set[str] = set()
        #: relpaths of the symbolic links created (checked again at the end)
        self.links: set[str] = set()
        self._buffer = memoryview(bytearray(_COPY_BUFFER_BYTES))

    # --- checks ---------------------------------------------------------------------

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise FetchCancelled(f"unpacking '{self.label}' was cancelled")

    def _count(self, name: str, declared: int) -> None:
        """Count one entry and the bytes it declares against the caps."""
        self._check_cancel()
        self.members += 1
        if self.members > self.max_members:
            raise ArchiveTooLarge(
                f"archive '{self.label}' holds more than {self.max_members} entries (at {name!r})"
            )
        if declared < 0:
            raise BadArchive(f"archive '{self.label}': entry {name!r} declares a negative size")
        self.declared += declared
        if self.declared > self.max_bytes:
            raise ArchiveTooLarge(
                f"archive '{self.label}' unpacks to more than the {self.max_bytes} bytes allowed "
                f"(ARCHIVE_MAX_BYTES): entry {name!r} declares {declared} bytes"
            )

    def _relpath(self, name: str) -> str:
        try:
            return safe_relpath(name)
        except UnsafePath as exc:
            raise UnsafePath(f"archive '{self.label}': {exc.message}") from None

    def _path(self, name: str, rel: str) -> Path:
        try:
            return safe_join(self.dest, rel)
        except UnsafePath as exc:
            # a link on the way leads outside, or the whole path is too long
            raise UnsafePath(f"archive '{self.label}': {exc.message}") from None

    def _inside(self, path: Path) -> bool:
        real = os.path.realpath(path)
        return real == self.real_dest or real.startswith(self.real_dest.rstrip(os.sep) + os.sep)

    @staticmethod
    def _is_root(name: str) -> bool:
        """``.``, ``./`` and the like: the archive's own top folder."""
        return not name.startswith("/") and all(part in ("", ".") for part in name.split("/"))

    # --- creating entries -------------------------------------------------------------

    def _prepare(self, name: str, rel: str, path: Path) -> None:
        """Make room for a new non-folder entry at ``path``: its parents exist, and an
        earlier entry of the same name (not a folder) is removed (the later one wins,
        as tar does). A link there is removed, never followed."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.EEXIST):
                raise BadArchive(
                    f"archive '{self.label}': entry {name!r} lies below something that is not a folder"
                ) from None
            raise _local_error(exc, f"unpacking {name!r} from '{self.label}'") from exc
        if stat.S_ISDIR(st.st_mode):
            raise BadArchive(f"archive '{self.label}': entry {name!r} is both a folder and a file")
        try:
            path.unlink()
        except OSError as exc:
            raise _local_error(exc, f"unpacking {name!r} from '{self.label}'") from exc
        self.files.discard(rel)
        self.links.discard(rel)

    def make_dir(self, name: str) -> None:
        if self._is_root(name):
            return
        rel = self._relpath(name)
        path = self._path(name, rel)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise BadArchive(f"archive '{self.label}': entry {name!r} is both a folder and a file or link")
        try:
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.EEXIST):
                raise BadArchive(
                    f"archive '{self.label}': entry {name!r} lies below something that is not a folder"
                ) from None
            raise _local_error(exc, f"unpacking {name!r} from '{self.label}'") from exc

    def write_file(self, name: str, source: IO[bytes], size: int, executable: bool) -> None:
        """Create the regular file ``name`` with exactly ``size`` bytes from
        ``source``."""
        rel = self._relpath(name)
        path = self._path(name, rel)
        self._prepare(name, rel, path)
        mode = 0o755 if executable else 0o644
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        except OSError as exc:
            raise _local_error(exc, f"unpacking {name!r} from '{self.label}'") from exc
        try:
            os.fchmod(fd, mode)  # exactly this mode, whatever the umask
            self._copy(name, source, size, fd)
        finally:
            os.close(fd)
        self.files.add(rel)

    def _copy(self, name: str, source: IO[bytes], size: int, fd: int) -> None:
        # typeshed gives both entry readers as IO[bytes]; both are buffered readers
        # with readinto, which fills our buffer without a bytes object per chunk
        reader = cast("_Readable", source)
        view = self._buffer
        left = size
        while True:
            self._check_cancel()
            # ask for one byte more than is left: an entry longer than it declared shows
            want = min(len(view), left + 1)
            try:
                count = reader.readinto(view[:want])
            except _READ_ERRORS as exc:
                raise BadArchive(f"archive '{self.label}': entry {name!r} cannot be read: {exc}") from None
            if not count:
                break
            if count > left:
                raise ArchiveTooLarge(
                    f"archive '{self.label}': entry {name!r} holds more than the {size} bytes it declares"
                )
            left -= count
            self.written += count
            if self.written > self.max_bytes:  # pragma: no cover - the declared sizes bound it
                raise ArchiveTooLarge(
                    f"archive '{self.label}' unpacks to more than the {self.max_bytes} bytes allowed"
                )
            _write_all(fd, view[:count], f"unpacking {name!r} from '{self.label}'")
        if left:
            raise BadArchive(
                f"archive '{self.label}': entry {name!r} ends {left} bytes before the {size} it declares"
            )

    def _check_link_target(self, name: str, rel: str, target: str) -> None:
        """A symbolic link's target, written out: relative, and inside ``dest``."""
        if not target or "\x00" in target or "\\" in target:
            raise UnsafePath(f"archive '{self.label}': link {name!r} has an unusable target {target!r}")
        if target.startswith("/"):
            raise UnsafePath(f"archive '{self.label}': link {name!r} points to the absolute path {target!r}")
        lexical = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if lexical == ".." or lexical.startswith("../"):
            raise UnsafePath(f"archive '{self.label}': link {name!r} -> {target!r} leads outside the model")

    def _check_hardlink_target(self, name: str, rel: str, target: str) -> str:
        """A hard link's target: a regular file this archive unpacked before, by name."""
        if target.startswith("/"):
            raise UnsafePath(
                f"archive '{self.label}': hard link {name!r} points to the absolute path {target!r}"
            )
        try:
            target_rel = safe_relpath(target)
        except UnsafePath:
            raise UnsafePath(
                f"archive '{self.label}': hard link {name!r} -> {target!r} leads outside the model"
            ) from None
        if target_rel not in self.files or target_rel == rel:
            raise UnsafePath(
                f"archive '{self.label}': hard link {name!r} -> {target!r} does not name a file "
                "unpacked before it"
            )
        return target_rel

    def make_symlink(self, name: str, target: str) -> None:
        rel = self._relpath(name)
        self._check_link_target(name, rel, target)
        path = self._path(name, rel)
        self._prepare(name, rel, path)
        try:
            path.symlink_to(target)
        except OSError as exc:
            raise _local_error(exc, f"unpacking {name!r} from '{self.label}'") from exc
        self.links.add(rel)
        if not self._inside(path):
            raise UnsafePath(
                f"archive '{self.label}': link {name!r} -> {target!r} leads outside the model "
                "through another link"
            )

    def make_hardlink(self, name: str, target: str) -> None:
        rel = self._relpath(name)
        target_rel = self._check_hardlink_target(name, rel, target)
        source = self._path(target, target_rel)
        path = self._path(name, rel)
        if not self._inside(source):
            raise UnsafePath(f"archive '{self.label}': hard link {name!r} -> {target!r} leads outside")
        try:
            source_mode = os.lstat(source).st_mode
        except OSError:
            # a link on the way was re-aimed since the file was unpacked through it
            source_mode = 0
        if not stat.S_ISREG(source_mode):
            raise UnsafePath(
                f"archive '{self.label}': hard link {name!r} -> {target!r} does not name a file "
                "unpacked before it"
            )
        self._prepare(name, rel, path)
        try:
            os.link(source, path, follow_symlinks=False)
        except OSError as exc:
            raise _local_error(exc, f"unpacking {name!r} from '{self.label}'") from exc
        self.files.add(rel)

    def check_links(self) -> None:
        """Every link created still resolves inside ``dest`` now that all entries are
        out (a later link can change where an earlier one leads)."""
        for rel in sorted(self.links):
            if not self._inside(self.dest / rel):
                raise UnsafePath(f"archive '{self.label}': link {rel!r} leads outside the model")

    # --- tar ------------------------------------------------------------------------

    def unpack_tar(self, archive: Path, *, compressed: bool) -> None:
        with contextlib.ExitStack() as stack:
            try:
                raw: _RawReader = stack.enter_context(archive.open("rb"))
                if compressed:
                    raw = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
                reader = _HeaderGuard(raw, self.label)
                tar = stack.enter_context(tarfile.open(fileobj=reader, mode="r:"))  # type: ignore[call-overload]
            except _READ_ERRORS as exc:
                raise BadArchive(f"'{self.label}' is not a readable tar archive: {exc}") from None
            for member in self._tar_members(tar):
                self._tar_member(tar, member)

    def _tar_members(self, tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        while True:
            self._check_cancel()
            try:
                member = tar.next()
            except HeaderTooLarge:
                raise
            except _READ_ERRORS as exc:
                raise BadArchive(f"archive '{self.label}' is corrupt: {exc}") from None
            if member is None:
                return
            yield member
            # tarfile keeps every member it has seen; the member cap bounds that list

    def _tar_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        self._count(name, member.size)
        if member.ischr() or member.isblk():
            raise UnsafePath(f"archive '{self.label}': entry {name!r} is a device file")
        if member.isfifo():
            raise UnsafePath(f"archive '{self.label}': entry {name!r} is a FIFO")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise UnsafePath(f"archive '{self.label}': entry {name!r} has an unsupported type")
        if not self._is_root(name):
            rel = self._relpath(name)
            if member.issym():
                self._check_link_target(name, rel, member.linkname)
            elif member.islnk():
                self._check_hardlink_target(name, rel, member.linkname)
            self._second_opinion(member)
        if member.isdir():
            self.make_dir(name)
        elif member.issym():
            self.make_symlink(name, member.linkname)
        elif member.islnk():
            self.make_hardlink(name, member.linkname)
        else:
            try:
                source = tar.extractfile(member)
            except _READ_ERRORS as exc:
                raise BadArchive(f"archive '{self.label}': entry {name!r} cannot be read: {exc}") from None
            if source is None:  # pragma: no cover - isreg() members always have data
                raise BadArchive(f"archive '{self.label}': entry {name!r} has no data")
            with source:
                self.write_file(name, source, member.size, executable=bool(member.mode & 0o111))

    def _second_opinion(self, member: tarfile.TarInfo) -> None:
        """Python's own ``data`` extraction filter, once our own checks of the name and
        link target passed (so that our messages come first): anything it still
        refuses is refused."""
        data_filter = getattr(tarfile, "data_filter", None)  # Python 3.11.4 and later
        if data_filter is None:
            return
        try:
            data_filter(member, self.real_dest)
        except tarfile.FilterError as exc:
            raise UnsafePath(f"archive '{self.label}': entry {member.name!r} is refused: {exc}") from None

    # --- zip ------------------------------------------------------------------------

    def unpack_zip(self, archive: Path) -> None:
        try:
            bundle = zipfile.ZipFile(archive)
        except _READ_ERRORS as exc:
            raise BadArchive(f"'{self.label}' is not a readable zip archive: {exc}") from None
        with bundle:
            infos = bundle.infolist()
            if len(infos) > self.max_members:
                raise ArchiveTooLarge(
                    f"archive '{self.label}' holds {len(infos)} entries, over {self.max_members}"
                )
            total = sum(info.file_size for info in infos)
            if total > self.max_bytes:
                raise ArchiveTooLarge(
                    f"archive '{self.label}' declares {total} bytes, over the {self.max_bytes} allowed "
                    "(ARCHIVE_MAX_BYTES)"
                )
            for info in infos:
                self._zip_member(bundle, info)

    def _zip_member(self, bundle: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
        name = info.filename
        self._count(name, info.file_size)
        unix_mode = info.external_attr >> 16 if info.create_system == 3 else 0
        kind = stat.S_IFMT(unix_mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise UnsafePath(f"archive '{self.label}': entry {name!r} is a device file")
        if kind in (stat.S_IFIFO, stat.S_IFSOCK):
            raise UnsafePath(f"archive '{self.label}': entry {name!r} is a FIFO or socket")
        # not info.is_dir(): it fails on an empty name (IndexError)
        if name.endswith("/") or kind == stat.S_IFDIR:
            self.make_dir(name)
            return
        try:
            source = bundle.open(info)
        except (RuntimeError, NotImplementedError, *_READ_ERRORS) as exc:
            # RuntimeError: encrypted; NotImplementedError: an unknown compression
            raise BadArchive(f"archive '{self.label}': entry {name!r} cannot be read: {exc}") from None
        with source:
            if kind == stat.S_IFLNK:
                self.make_symlink(name, self._zip_link_target(name, source))
            else:
                self.write_file(name, source, info.file_size, executable=bool(unix_mode & 0o111))

    def _zip_link_target(self, name: str, source: IO[bytes]) -> str:
        try:
            data = source.read(_LINK_TARGET_LIMIT + 1)
        except _READ_ERRORS as exc:
            raise BadArchive(f"archive '{self.label}': link {name!r} cannot be read: {exc}") from None
        if len(data) > _LINK_TARGET_LIMIT:
            raise BadArchive(
                f"archive '{self.label}': link {name!r} has a target over {_LINK_TARGET_LIMIT} bytes"
            )
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadArchive(
                f"archive '{self.label}': link {name!r} has a target that is not UTF-8"
            ) from None


class HeaderTooLarge(BadArchive):
    """tarfile asked for more header bytes at once than :data:`HEADER_READ_LIMIT`."""


class _HeaderGuard:
    """A file object for :mod:`tarfile` that refuses any single read over
    :data:`HEADER_READ_LIMIT`: tarfile reads a pax or GNU long-name header in one call
    of its declared size, which must not be allowed to fill the memory. Entry data is
    read in our own, small, chunks and is not affected."""

    def __init__(self, raw: _RawReader, label: str) -> None:
        self._raw = raw
        self._label = label

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > HEADER_READ_LIMIT:
            raise HeaderTooLarge(
                f"archive '{self._label}' has a header of more than {HEADER_READ_LIMIT} bytes"
            )
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _write_all(fd: int, data: memoryview, what: str) -> None:
    done = 0
    try:
        while done < len(data):
            written = os.write(fd, data[done:])
            if written <= 0:
                raise DiskFull(f"could not write while {what}")
            done += written
    except OSError as exc:
        raise _local_error(exc, what) from exc


def _local_error(exc: OSError, what: str) -> SidecarError:
    if exc.errno in _DISK_FULL_ERRNOS:
        return DiskFull(f"no space left on the device while {what}")
    return StorageError(f"local filesystem error while {what}: {exc.strerror or exc}")
