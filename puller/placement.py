"""Safe names and atomic placement under ROOT_MODEL_DIR.

Every name that comes from a store (an object key, a file name) is untrusted: it goes
through :func:`safe_relpath` / :func:`safe_join` before anything is created. A model is
assembled in a staging directory under ``ROOT_MODEL_DIR/_tmp/`` (the same filesystem,
so the final step is a rename) and :func:`place_atomically` moves it into place: a
model directory is either complete or absent, never half-written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from types import TracebackType

from adapter.errors import DiskFull, StorageError, UnsafePath

#: staging and aside directories, under ROOT_MODEL_DIR
STAGING_DIR_NAME = "_tmp"

#: the longest file name (one path component) in bytes, as on Linux filesystems
NAME_MAX = 255

_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def safe_relpath(name: str) -> str:
    """Return ``name`` as a normalised relative posix path that stays below its root.

    Empty and ``.`` components are dropped (``a//./b`` -> ``a/b``). Raises
    :class:`UnsafePath` naming the entry when the name is empty (or only ``.`` and
    ``/``), absolute, contains a ``..`` component, a NUL, or a backslash (refused
    outright: on another reader it would be a separator, so ``..\\x`` could escape);
    also when it cannot be a file name at all: a lone surrogate that no file name
    encodes, or a component longer than :data:`NAME_MAX` bytes.
    """
    if not name:
        raise UnsafePath("empty name in the model's file list")
    if "\x00" in name:
        raise UnsafePath(f"name {name!r} contains a NUL character")
    if "\\" in name:
        raise UnsafePath(f"name {name!r} contains a backslash")
    if name.startswith("/"):
        raise UnsafePath(f"name {name!r} is absolute")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"name {name!r} leads outside its folder ('..')")
    if not parts:
        raise UnsafePath(f"name {name!r} names no file")
    for part in parts:
        try:
            encoded = os.fsencode(part)
        except UnicodeEncodeError:
            raise UnsafePath(f"name {name!r} is not valid Unicode (a lone surrogate)") from None
        if len(encoded) > NAME_MAX:
            raise UnsafePath(f"name {name[:80]!r}... has a component longer than {NAME_MAX} bytes")
    return "/".join(parts)


def is_within(path: str, root: str) -> bool:
    """True when the resolved path ``path`` is the resolved path ``root`` or below it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def first_link_outside(top: Path, root_real: str) -> Path | None:
    """The first symbolic link below ``top`` (walked without following links) that
    resolves outside ``root_real`` (a resolved path), or ``None``."""
    for folder, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            path = Path(folder) / name
            if path.is_symlink() and not is_within(os.path.realpath(path), root_real):
                return path
    return None


def safe_join(root: Path, relpath: str) -> Path:
    """Join ``relpath`` (checked with :func:`safe_relpath`) below ``root``.

    Guarantees: the result is lexically inside ``root``, and no component of it between
    ``root`` and the result is an existing symlink whose target lies outside ``root``
    (a link inside ``root`` is allowed). Raises :class:`UnsafePath` otherwise.
    """
    clean = safe_relpath(relpath)
    real_root: str | None = None  # resolved only when a link is met
    current = os.fspath(root)
    try:
        for part in clean.split("/"):
            current = f"{current}/{part}"
            try:
                is_link = stat.S_ISLNK(os.lstat(current).st_mode)
            except (FileNotFoundError, NotADirectoryError):
                break  # nothing exists below a missing component or a file
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                break  # a loop of links: writing through it fails later
            if is_link:
                real_root = real_root or os.path.realpath(root)
                if not is_within(os.path.realpath(current), real_root):
                    raise UnsafePath(f"name {relpath!r} passes through a link that leads outside {root}")
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UnsafePath(f"name {relpath[:80]!r}... is too long for a path below {root}") from None
        raise _os_error(exc, f"checking the name {relpath!r}") from exc
    return Path(root) / clean


#: how a folder being deleted is opened: never through a link
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: folders nested deeper than this are left to ``shutil.rmtree``
_FAST_REMOVE_DEPTH = 32


class _TooDeep(Exception):
    pass


def _remove_path(path: Path) -> None:
    """Remove a file, a link (never its target) or a directory tree; absent is fine.

    A tree is deleted through folder descriptors, every folder opened with
    ``O_NOFOLLOW``: a link inside it is removed, never followed, and a folder swapped
    for a link meanwhile stops the removal with an error. A tree nested deeper than
    ``_FAST_REMOVE_DEPTH`` is finished by ``shutil.rmtree`` (just as careful)."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a file, or a link
        return
    try:
        try:
            _empty_folder(fd, 0)
        finally:
            os.close(fd)
    except _TooDeep:
        shutil.rmtree(path)
        return
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


def _empty_folder(fd: int, depth: int) -> None:
    """Delete everything in the open folder ``fd``."""
    if depth > _FAST_REMOVE_DEPTH:
        raise _TooDeep
    with os.scandir(fd) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_folder in names:
        if not is_folder:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
            continue
        sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
        try:
            _empty_folder(sub, depth + 1)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=fd)


def _os_error(exc: OSError, what: str) -> Exception:
    if exc.errno in _DISK_FULL_ERRNOS:
        return DiskFull(f"no space left on the device while {what}")
    return StorageError(f"local filesystem error while {what}: {exc.strerror or exc}")


def staging_root(root_model_dir: Path) -> Path:
    """``ROOT_MODEL_DIR/_tmp``, created when missing."""
    path = Path(root_model_dir) / STAGING_DIR_NAME
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _os_error(exc, f"creating {path}") from exc
    return path


class StagingDir:
    """A fresh, private directory under ``ROOT_MODEL_DIR/_tmp/`` (or, with ``parent``,
    a hidden one directly in ``parent``: for a destination outside ROOT_MODEL_DIR,
    staged beside it so that the final rename stays on one filesystem).

    Created by the constructor. Used as a context manager it is removed on exit unless
    :func:`place_atomically` already moved it away, so a failed or cancelled pull
    leaves nothing behind.
    """

    def __init__(self, root_model_dir: Path, label: str = "", *, parent: Path | None = None) -> None:
        prefix = f"{label}." if label else "pull."
        try:
            if parent is None:
                where = Path(root_model_dir) / STAGING_DIR_NAME
                try:
                    made = tempfile.mkdtemp(prefix=prefix, dir=where)
                except FileNotFoundError:  # no _tmp yet (or any more)
                    made = tempfile.mkdtemp(prefix=prefix, dir=staging_root(root_model_dir))
            else:
                made = tempfile.mkdtemp(prefix="." + prefix, dir=parent)
            self.path = Path(made)
        except OSError as exc:
            raise _os_error(exc, "creating a staging directory") from exc

    def remove(self) -> None:
        """Delete the staging directory and everything in it; absent is fine."""
        _remove_path(self.path)

    def __enter__(self) -> StagingDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def staging_dir(root_model_dir: Path, label: str = "", *, parent: Path | None = None) -> StagingDir:
    """A new :class:`StagingDir`; ``label`` (e.g. the model id) prefixes its name."""
    return StagingDir(root_model_dir, label, parent=parent)


def place_atomically(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` directory to ``target``.

    ``staging`` must live on the same filesystem as ``target`` (it does when it is a
    :class:`StagingDir` of the same ROOT_MODEL_DIR). When ``target`` exists (a directory,
    a file or a link) it is first renamed aside into ``staging``'s parent and deleted
    after the new one is in place; if the final rename fails the old one is put back.
    So at every moment ``target`` is either absent or complete. On any failure the
    staging directory is removed and :class:`StorageError` (or :class:`DiskFull`) is
    raised.
    """
    aside_parent: Path | None = None
    try:
        if os.path.lexists(target):  # a folder, a file or a link (even a dangling one)
            aside_parent = Path(tempfile.mkdtemp(prefix=".old.", dir=staging.parent))
            aside = aside_parent / "old"
            target.rename(aside)
            try:
                staging.rename(target)
            except OSError:
                with contextlib.suppress(OSError):
                    aside.rename(target)  # put the old one back
                raise
        else:
            staging.rename(target)
    except OSError as exc:
        _remove_path(staging)
        raise _os_error(exc, f"placing the model at {target}") from exc
    finally:
        if aside_parent is not None:
            # a leftover here lies under _tmp, swept at the next start
            with contextlib.suppress(OSError):
                _remove_path(aside_parent)


def sweep_staging(root_model_dir: Path) -> list[str]:
    """Remove every leftover under ``ROOT_MODEL_DIR/_tmp`` (half-done pulls of a
    previous process). Returns the names removed. Call it at start-up only: it would
    delete the staging directory of a pull that is running."""
    root = Path(root_model_dir) / STAGING_DIR_NAME
    removed: list[str] = []
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        _remove_path(entry)
        removed.append(entry.name)
    return removed


def remove_tree(path: Path) -> None:
    """Remove ``path`` (a file, a link, or a directory tree, never following a link);
    absent is fine. Filesystem errors become :class:`StorageError`."""
    try:
        _remove_path(path)
    except OSError as exc:
        raise _os_error(exc, f"removing {path}") from exc
