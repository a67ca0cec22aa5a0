"""Property tests of archive unpacking (``puller.archive``) against hostile tar, tar.gz
and zip archives built by hypothesis.

The archives mix absolute names, ``..`` segments, NUL and backslash in names, unicode
and undecodable bytes, symbolic and hard links pointing outside (directly, or chained
through other links, or re-aimed by a later entry), device files, FIFOs, sockets,
unknown entry types, setuid modes, duplicate entries, and sizes that lie (a huge
declared size, or fewer or more bytes than declared).

Properties, for every archive:

- nothing outside the destination changes (the rest of the example's folder is
  compared entry by entry, link counts included, so a hard link to a file outside shows);
- the unpacking either succeeds, and then the destination holds only regular files,
  folders and links that resolve inside it, no file shares an inode with anything
  outside, and no setuid/setgid/sticky bit is set; or it fails with one of our own
  error types, whose message names the archive. No other exception escapes.

The example-based cases of the same checks are in ``tests/puller/test_archive.py``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import stat
import struct
import tarfile
import tempfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, reject, settings
from hypothesis import strategies as st

from adapter.errors import (
    ArchiveTooLarge,
    BadArchive,
    SidecarError,
    StorageError,
    UnsafePath,
)
from puller.archive import unpack_archive

KiB = 1024
#: the cap every hostile archive is unpacked under
MAX_BYTES = 256 * KiB

#: hypothesis settings of this suite: bounded, no deadline (the machine may be busy),
#: no example database (it would be written into the working tree)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: stands for the absolute path of the example's ``outside`` folder in names and targets
OUT = "{OUT}"

#: what the archive's own error types may be: every refusal is one of ours
REFUSALS = (UnsafePath, BadArchive, ArchiveTooLarge, StorageError)


# --- the example's folder -------------------------------------------------------------------------


def fingerprint(top: Path, *skip: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below ``top`` except those in ``skip`` and what lies below them: its
    type, mode, link count and content (a file's digest, a link's target). A folder's
    size is left out (it changes with the entries made in it, e.g. ``skip`` itself)."""
    found: dict[str, tuple[object, ...]] = {}
    for folder, dirs, files in os.walk(top):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in (*dirs, *files):
            path = here / name
            if path in skip:
                continue
            st = path.lstat()
            rel = path.relative_to(top).as_posix()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", st.st_mode)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
                found[rel] = ("file", st.st_mode, st.st_size, st.st_nlink, digest)
    return found


class Sandbox:
    """One example's folder: ``outside/`` (what attacks aim at: a file, a folder and a
    link), ``stage/`` (the destination's parent) and the destination ``stage/dest``
    (absent at first). Everything but the destination must stay as it was."""

    def __init__(self, parent: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ex.", dir=parent))
        self.outside = self.root / "outside"
        (self.outside / "folder").mkdir(parents=True)
        (self.outside / "precious.txt").write_bytes(b"keep me")
        (self.outside / "link").symlink_to("precious.txt")
        (self.root / "stage").mkdir()
        self.dest = self.root / "stage" / "dest"
        #: folders the code under test may write besides the destination
        self.writable: list[Path] = []
        self._before: dict[str, tuple[object, ...]] = {}

    def freeze(self) -> None:
        self._before = fingerprint(self.root, self.dest, *self.writable)

    def assert_outside_untouched(self) -> None:
        assert fingerprint(self.root, self.dest, *self.writable) == self._before
        assert (self.outside / "precious.txt").read_bytes() == b"keep me"

    def expand(self, text: str) -> str:
        """``text`` with :data:`OUT` replaced by the absolute path of ``outside``."""
        return text.replace(OUT, str(self.outside))

    def remove(self) -> None:
        shutil.rmtree(self.root)  # never follows a link


@contextlib.contextmanager
def sandbox(parent: Path) -> Iterator[Sandbox]:
    box = Sandbox(parent)
    try:
        yield box
    finally:
        box.remove()


def assert_contained(dest: Path, *, links_checked: bool = True, shared: Sequence[Path] = ()) -> None:
    """What an unpacking left in ``dest``: only regular files, folders and links; no
    setuid, setgid or sticky bit; no file hard-linked to anything outside ``dest`` (or
    ``shared``: a content cache, other models built from it); with ``links_checked``,
    every link resolving inside ``dest`` (after a refusal the refused link itself may
    still be there: the caller removes the folder)."""
    if not dest.exists():
        return
    real_dest = os.path.realpath(dest)
    inodes: Counter[tuple[int, int]] = Counter()
    links: dict[tuple[int, int], int] = {}
    for folder, dirs, files in os.walk(dest):
        for name in (*dirs, *files):
            path = Path(folder) / name
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            assert kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK), f"{path} is a special file"
            if kind == stat.S_IFLNK:
                if links_checked:
                    real = os.path.realpath(path)
                    assert real == real_dest or real.startswith(real_dest + os.sep), f"{path} -> {real}"
                continue
            assert st.st_mode & 0o7000 == 0, f"{path} has mode {oct(st.st_mode)}"
            if kind == stat.S_IFREG:
                inodes[(st.st_dev, st.st_ino)] += 1
                links[(st.st_dev, st.st_ino)] = st.st_nlink
    for area in shared:
        for folder, _dirs, files in os.walk(area):
            for name in files:
                st = (Path(folder) / name).lstat()
                if (st.st_dev, st.st_ino) in inodes:
                    inodes[(st.st_dev, st.st_ino)] += 1
    for inode, seen in inodes.items():
        assert links[inode] == seen, "a file in the destination is also linked from outside it"


def note_outcome(outcome: str) -> None:
    """Count ``outcome`` in hypothesis' statistics (``--hypothesis-show-statistics``)."""
    if currently_in_test_context():
        event(outcome)


def assert_refusal(exc: BaseException, label: str) -> None:
    """``exc`` is one of our archive errors, with a message naming the archive."""
    assert isinstance(exc, REFUSALS), f"{type(exc).__name__} escaped: {exc!r}"
    assert str(exc).strip(), "the error says what went wrong"
    assert label in str(exc), f"the message names the archive: {exc}"


# --- hostile names --------------------------------------------------------------------------------

#: name segments: ordinary ones (so that entries collide and refer to each other) and
#: hostile ones (traversal, separators of other systems, NUL, bidi overrides, an
#: undecodable byte, a whiteout, an over-long name)
SEGMENTS = [
    "a",
    "b",
    "d",
    "m",
    "..",
    ".",
    "",
    "outside",
    "precious.txt",
    "é",
    "数据",
    " ",
    "a\\b",
    "..\\..",
    "x\x00y",
    "\u202etxt.exe",
    "\udcff",
    ".wh.a",
    "a" * 300,
]

segment = st.sampled_from(SEGMENTS) | st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=6
)

#: names aimed at the example's ``outside`` folder (the destination is ``stage/dest``)
AIMED = [
    "../../outside/pwned.txt",
    "../../outside/precious.txt",
    "a/../../../outside/pwned.txt",
    f"{OUT}/pwned.txt",
    f"{OUT}/precious.txt",
    "/tmp/../" + OUT.lstrip("/") + "/pwned.txt",
    "..",
    "/",
    "./",
    "",
]

hostile_names = st.sampled_from(AIMED) | st.builds(
    lambda prefix, parts, slash: prefix + "/".join(parts) + slash,
    st.sampled_from(["", "", "", "./", "/", "//", "../", f"{OUT}/"]),
    st.lists(segment, min_size=1, max_size=4),
    st.sampled_from(["", "", "/"]),
)

#: plain names of a few folders: entries collide, replace each other and are reached
#: through each other's links
plain_names = st.lists(st.sampled_from(["a", "b", "d", "m"]), min_size=1, max_size=3).map("/".join)

#: entry names: mostly plain (so that many archives unpack and their links are checked),
#: else hostile
names = st.one_of(plain_names, plain_names, hostile_names)

#: link targets: relative walks over the same folders (chains that only escape once
#: resolved through other links), the names above, and targets that lead out
walks = st.lists(st.sampled_from(["a", "b", "d", "m", ".", ".."]), min_size=1, max_size=4).map("/".join)
link_targets = (
    walks
    | walks
    | names
    | st.sampled_from(
        [
            "..",
            "../..",
            "../../outside",
            "../../outside/precious.txt",
            OUT,
            f"{OUT}/precious.txt",
            f"{OUT}/link",
            "/etc/passwd",
            ".",
            "a/../..",
            "d/../../outside",
            "a/b/../../..",
            "a\\..\\..",
            "x\x00y",
        ]
    )
)

#: entry modes, with setuid, setgid and sticky bits among them
modes = st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o2755, 0o1777, 0o7777, 0o000])

#: sizes a header may declare instead of the true one
lies = st.sampled_from([0, 1, 511, 513, MAX_BYTES + 1, 10**9, 8**11 - 1, 10**15])


# --- tar ----------------------------------------------------------------------------------------

TAR_KINDS: dict[str, bytes] = {
    "file": tarfile.REGTYPE,
    "contiguous": tarfile.CONTTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "unknown": b"Z",
}
#: kinds whose data follows the header
_WITH_DATA = ("file", "contiguous", "unknown")


@dataclass(frozen=True)
class TarMember:
    """One header and its data; ``declared`` is the size the header claims, when it
    lies; ``pax_name`` carries the name in a pax record (where a NUL survives)."""

    kind: str
    name: str
    linkname: str = ""
    data: bytes = b""
    mode: int = 0o644
    declared: int | None = None
    pax_name: bool = False


tar_members = st.builds(
    TarMember,
    kind=st.sampled_from(list(TAR_KINDS)),
    name=names,
    linkname=link_targets,
    data=st.binary(max_size=64),
    mode=modes,
    declared=st.none() | st.none() | st.none() | lies,
    pax_name=st.booleans(),
)


def tar_archive(box: Sandbox, members: list[TarMember], fmt: int) -> bytes:
    """The tar stream of ``members``, header by header, sizes as given (a lying size
    misaligns what follows, as in a real hostile archive)."""
    out = bytearray()
    for member in members:
        info = tarfile.TarInfo(box.expand(member.name))
        info.type = TAR_KINDS[member.kind]
        info.mode = member.mode
        info.linkname = box.expand(member.linkname) if member.kind in ("symlink", "hardlink") else ""
        data = member.data if member.kind in _WITH_DATA else b""
        info.size = member.declared if member.declared is not None else len(data)
        if member.pax_name and fmt == tarfile.PAX_FORMAT:
            info.pax_headers = {"path": info.name}
        try:
            out += info.tobuf(fmt, "utf-8", "surrogateescape")
        except (ValueError, UnicodeError):
            reject()  # a header tarfile cannot even write
        out += data + bytes(-len(data) % tarfile.BLOCKSIZE)
    out += bytes(2 * tarfile.BLOCKSIZE)
    return bytes(out)


def unpack_hostile(box: Sandbox, archive: Path) -> None:
    """Unpack ``archive`` into the destination and check every property."""
    box.freeze()
    try:
        unpack_archive(archive, box.dest, max_bytes=MAX_BYTES)
    except Exception as exc:  # the property: which exceptions may come out
        assert_refusal(exc, archive.name)
        assert_contained(box.dest, links_checked=False)
        note_outcome(f"refused: {type(exc).__name__}")
    else:
        assert_contained(box.dest)
        note_outcome("unpacked")
    box.assert_outside_untouched()


@FUZZ
@given(
    members=st.lists(tar_members, min_size=1, max_size=8),
    fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
    compressed=st.booleans(),
)
@example(  # a link to an outside file through a link that a later entry re-aims
    members=[
        TarMember("dir", "d/"),
        TarMember("file", "s/f", data=b"x"),
        TarMember("symlink", "s", linkname="d"),
    ],
    fmt=tarfile.PAX_FORMAT,
    compressed=False,
)
@example(  # a file unpacked through a link, the link then re-aimed: the hard link to it
    members=[
        TarMember("dir", "d/"),
        TarMember("dir", "e/"),
        TarMember("symlink", "s", linkname="d"),
        TarMember("file", "s/f", data=b"x"),
        TarMember("symlink", "s", linkname="e"),
        TarMember("hardlink", "h", linkname="s/f"),
    ],
    fmt=tarfile.PAX_FORMAT,
    compressed=False,
)
@example(  # the same, the link re-aimed at a file
    members=[
        TarMember("dir", "d/"),
        TarMember("file", "e", data=b"y"),
        TarMember("symlink", "s", linkname="d"),
        TarMember("file", "s/f", data=b"x"),
        TarMember("symlink", "s", linkname="e"),
        TarMember("hardlink", "h", linkname="s/f"),
    ],
    fmt=tarfile.GNU_FORMAT,
    compressed=True,
)
@example(  # names too long for the filesystem: one component, and the whole path
    members=[
        TarMember("file", "a" * 300, data=b"x"),
        TarMember("symlink", "b" * 300, linkname="x"),
        TarMember("dir", "/".join(["d" * 250] * 20)),
    ],
    fmt=tarfile.PAX_FORMAT,
    compressed=False,
)
@example(  # a NUL in a pax name, a huge declared size
    members=[TarMember("file", "a\x00/../../x", pax_name=True), TarMember("file", "big", declared=10**15)],
    fmt=tarfile.PAX_FORMAT,
    compressed=True,
)
def test_no_tar_writes_outside_its_destination(
    tmp_path: Path, members: list[TarMember], fmt: int, compressed: bool
) -> None:
    with sandbox(tmp_path) as box:
        raw = tar_archive(box, members, fmt)
        archive = box.root / ("hostile.tar.gz" if compressed else "hostile.tar")
        archive.write_bytes(gzip.compress(raw, mtime=0) if compressed else raw)
        unpack_hostile(box, archive)


@FUZZ
@given(data=st.binary(min_size=1, max_size=2048), cut=st.integers(min_value=0, max_value=4096))
def test_a_damaged_tar_is_refused_with_our_errors(tmp_path: Path, data: bytes, cut: int) -> None:
    """Arbitrary bytes after a valid first header, cut anywhere: a bad archive, never a
    crash."""
    with sandbox(tmp_path) as box:
        info = tarfile.TarInfo("model.bin")
        info.size = len(data)
        raw = info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512) + data
        archive = box.root / "hostile.tar"
        archive.write_bytes(raw[: cut + 512])
        unpack_hostile(box, archive)


# --- zip ------------------------------------------------------------------------------------------

ZIP_KINDS: dict[str, int] = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
    "dos": 0,  # no unix mode at all
}


@dataclass(frozen=True)
class ZipMember:
    """One zip entry: a symbolic link's data is its target (``target``, or raw
    ``data`` when the target is not text); ``declared`` replaces the uncompressed size
    in the central directory."""

    kind: str
    name: str
    target: str = ""
    data: bytes = b""
    mode: int = 0o644
    declared: int | None = None
    raw_target: bool = False


#: sizes a zip's central directory may claim instead (4 bytes: no zip64 here)
zip_lies = st.sampled_from([0, 1, 511, 513, MAX_BYTES + 1, 10**9, 2**32 - 2])

zip_members = st.builds(
    ZipMember,
    kind=st.sampled_from(list(ZIP_KINDS)),
    name=names,
    target=link_targets,
    data=st.binary(max_size=64),
    mode=modes,
    declared=st.none() | st.none() | st.none() | zip_lies,
    raw_target=st.booleans(),
)


def zip_archive(box: Sandbox, path: Path, members: list[ZipMember]) -> None:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as bundle:
        warnings.simplefilter("ignore")  # "Duplicate name": wanted here
        for member in members:
            name = box.expand(member.name)
            if member.kind == "dir" and not name.endswith("/"):
                name += "/"
            if any("\udc80" <= ch <= "\udcff" for ch in name):
                # undecodable bytes: stored without the UTF-8 flag, read back as cp437
                name = name.encode("utf-8", "surrogateescape").decode("cp437")
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if member.kind != "dos":
                info.create_system = 3
                info.external_attr = (ZIP_KINDS[member.kind] | member.mode) << 16
            if member.kind == "symlink" and not member.raw_target:
                payload = box.expand(member.target).encode("utf-8", "surrogateescape")
            else:
                payload = member.data
            bundle.writestr(info, payload)
    lied = [(number, m.declared) for number, m in enumerate(members) if m.declared is not None]
    if lied:
        patch_central_sizes(path, dict(lied))


def patch_central_sizes(path: Path, sizes: dict[int, int]) -> None:
    """Replace the uncompressed size of entry ``n`` in the central directory (what
    zipfile believes) by ``sizes[n]``."""
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")
    number = 0
    while at >= 0 and raw[at : at + 4] == b"PK\x01\x02":
        if number in sizes:
            struct.pack_into("<I", raw, at + 24, sizes[number])
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", raw, at + 28)
        at += 46 + name_len + extra_len + comment_len
        number += 1
    path.write_bytes(bytes(raw))


@FUZZ
@given(members=st.lists(zip_members, min_size=1, max_size=8))
@example(  # a zip link whose target is not UTF-8, beside one that re-aims an earlier one
    members=[
        ZipMember("symlink", "l", data=b"\xff\xfe", raw_target=True),
        ZipMember("symlink", "here", target="."),
        ZipMember("symlink", "esc", target="here/../../outside"),
        ZipMember("file", "esc/pwned.txt", data=b"x"),
    ]
)
@example(members=[ZipMember("file", "big", data=b"x" * 10, declared=10**9)])
@example(members=[ZipMember("file", "")])  # an empty name: zipfile's is_dir() fails on it
def test_no_zip_writes_outside_its_destination(tmp_path: Path, members: list[ZipMember]) -> None:
    with sandbox(tmp_path) as box:
        archive = box.root / "hostile.zip"
        zip_archive(box, archive, members)
        unpack_hostile(box, archive)


@pytest.mark.parametrize("suffix", [".tar", ".zip", ".tar.gz"])
def test_an_empty_or_missing_archive_is_our_error(tmp_path: Path, suffix: str) -> None:
    with sandbox(tmp_path) as box:
        empty = box.root / f"hostile{suffix}"
        empty.write_bytes(b"")
        unpack_hostile(box, empty)
        box.freeze()
        with pytest.raises(SidecarError, match="hostile-missing"):
            unpack_archive(box.root / f"hostile-missing{suffix}", box.dest, max_bytes=MAX_BYTES)
        box.assert_outside_untouched()
