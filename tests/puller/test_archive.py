"""Unpacking archives built here, good ones and hostile ones; nothing may ever land
outside the destination."""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapter.errors import InvalidRequest, StorageError, UnsafePath
from puller.archive import (
    HEADER_READ_LIMIT,
    ArchiveTooLarge,
    BadArchive,
    is_archive,
    sniff_archive,
    unpack_archive,
)
from puller.archive import (
    unpack_archive as unpack,
)
from puller.engine import FetchCancelled

MiB = 1024 * 1024

#: a model tree with nested folders, unicode and spaces in names, empty files
TREE: dict[str, bytes] = {
    "model-settings.json": b'{"name": "m"}',
    "1/model.bin": os.urandom(70_000),
    "1/sub/deeper/weights.bin": os.urandom(5000),
    "modèle/数据 file.txt": "données".encode(),
    "empty.txt": b"",
    "variables/empty-too": b"",
}


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` except ``skip`` and what is below it: (mode, size)."""
    found: dict[str, tuple[int, int]] = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if here == skip or skip in here.parents:
            continue
        for name in dirs + files:
            if here / name == skip:
                continue
            st = (here / name).lstat()
            found[str((here / name).relative_to(root))] = (st.st_mode, st.st_size)
    return found


class Box:
    """A temp folder holding the archives, an ``outside`` folder that attacks aim at,
    and the destination ``dest``; everything but ``dest`` must stay as it was."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dest = root / "staging" / "dest"
        self.outside = root / "outside"
        self.outside.mkdir()
        (self.outside / "precious.txt").write_bytes(b"keep me")
        (root / "staging").mkdir()
        self._before: dict[str, tuple[int, int]] = {}

    def freeze(self) -> None:
        self._before = snapshot(self.root, self.dest)

    def assert_untouched(self) -> None:
        assert snapshot(self.root, self.dest) == self._before
        assert (self.outside / "precious.txt").read_bytes() == b"keep me"

    def tree(self) -> dict[str, bytes]:
        return {
            p.relative_to(self.dest).as_posix(): p.read_bytes()
            for p in sorted(self.dest.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    made = Box(tmp_path)
    yield made
    made.assert_untouched()


# --- building archives ----------------------------------------------------------------

Entry = tuple[tarfile.TarInfo, bytes | None]


def file_entry(name: str, data: bytes, mode: int = 0o644) -> Entry:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def special_entry(name: str, kind: bytes, linkname: str = "", mode: int = 0o755) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    return info, None


def write_tar(path: Path, entries: list[Entry], *, compress: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if compress else "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tree_entries(tree: dict[str, bytes]) -> list[Entry]:
    entries: list[Entry] = [special_entry("./", tarfile.DIRTYPE)]
    folders = sorted({str(Path(name).parent) for name in tree} - {"."})
    entries += [special_entry(f"./{folder}/", tarfile.DIRTYPE) for folder in folders]
    entries += [file_entry(f"./{name}", data) for name, data in tree.items()]
    return entries


def write_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for info, data in entries:
            bundle.writestr(info, data)
    return path


def zip_entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: the high 16 bits of external_attr are st_mode
    info.external_attr = mode << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


# --- names ----------------------------------------------------------------------------


def test_kinds_by_name_and_by_magic(tmp_path: Path) -> None:
    assert is_archive("m.tar") == "tar"
    assert is_archive("M.TAR.GZ") == "tar.gz"
    assert is_archive("m.tgz") == "tar.gz"
    assert is_archive("weights.zip") == "zip"
    for name in ("model.bin", "tar", "m.tar.bz2", "m.gz", "zip.json", ""):
        assert is_archive(name) is None, name
    assert sniff_archive(write_tar(tmp_path / "a.bin", [file_entry("x", b"1")])) == "tar"
    assert sniff_archive(write_tar(tmp_path / "b.bin", [file_entry("x", b"1")], compress=True)) == "tar.gz"
    assert sniff_archive(write_zip(tmp_path / "c.bin", [("x", b"1")])) == "zip"
    assert sniff_archive(write_zip(tmp_path / "d.bin", [])) == "zip"
    (tmp_path / "e.bin").write_bytes(b"just bytes")
    assert sniff_archive(tmp_path / "e.bin") is None


# --- good archives --------------------------------------------------------------------


Builder = Callable[[Path], Path]


def build_tar(directory: Path) -> Path:
    return write_tar(directory / "model.tar", tree_entries(TREE))


def build_tar_gz(directory: Path) -> Path:
    return write_tar(directory / "model.tar.gz", tree_entries(TREE), compress=True)


def build_tgz(directory: Path) -> Path:
    return write_tar(directory / "model.tgz", tree_entries(TREE), compress=True)


def build_zip(directory: Path) -> Path:
    folders = sorted({str(Path(name).parent) for name in TREE} - {"."})
    entries: list[tuple[zipfile.ZipInfo | str, bytes]] = [(f"{folder}/", b"") for folder in folders]
    entries += list(TREE.items())
    return write_zip(directory / "model.zip", entries)


def build_tar_without_suffix(directory: Path) -> Path:
    return write_tar(directory / "model", tree_entries(TREE), compress=True)


@pytest.mark.parametrize(
    "build",
    [build_tar, build_tar_gz, build_tgz, build_zip, build_tar_without_suffix],
    ids=lambda b: b.__name__,
)
def test_an_archive_unpacks_in_place(box: Box, build: Builder) -> None:
    archive = build(box.root)
    box.freeze()
    written = unpack_archive(archive, box.dest, max_bytes=10 * MiB)
    assert box.tree() == TREE
    assert written == sum(len(d) for d in TREE.values())
    assert (box.dest / "1" / "sub" / "deeper").is_dir()
    for path in box.dest.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o7022 == 0, f"{path}: {oct(mode)}"


def test_links_inside_the_model_are_kept(box: Box) -> None:
    entries = [
        file_entry("blobs/abc", b"weights"),
        special_entry("snapshots/main/model.bin", tarfile.SYMTYPE, "../../blobs/abc"),
        special_entry("current", tarfile.SYMTYPE, "snapshots/main"),
        special_entry("copy.bin", tarfile.LNKTYPE, "blobs/abc"),
        file_entry("current/extra.txt", b"through an inside link"),
    ]
    archive = write_tar(box.root / "links.tar", entries)
    box.freeze()
    unpack_archive(archive, box.dest, max_bytes=MiB)
    assert (box.dest / "snapshots/main/model.bin").read_bytes() == b"weights"
    assert os.readlink(box.dest / "current") == "snapshots/main"
    assert (box.dest / "snapshots/main/extra.txt").read_bytes() == b"through an inside link"
    assert (box.dest / "copy.bin").stat().st_ino == (box.dest / "blobs/abc").stat().st_ino


def test_special_mode_bits_are_never_written(box: Box) -> None:
    entries = [
        special_entry("tools/", tarfile.DIRTYPE, mode=0o3777),
        file_entry("tools/run.sh", b"#!/bin/sh\n", mode=0o6755),
        file_entry("tools/data.bin", b"x", mode=0o4666),
        file_entry("tools/secret.key", b"k", mode=0o000),
    ]
    archive = write_tar(box.root / "modes.tar", entries)
    box.freeze()
    unpack_archive(archive, box.dest, max_bytes=MiB)
    assert stat.S_IMODE((box.dest / "tools/run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((box.dest / "tools/data.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((box.dest / "tools/secret.key").stat().st_mode) == 0o644
    assert stat.S_IMODE((box.dest / "tools").stat().st_mode) & 0o7000 == 0


def test_zip_modes_and_links(box: Box) -> None:
    archive = write_zip(
        box.root / "modes.zip",
        [
            (zip_entry("bin/tool", stat.S_IFREG | 0o4755), b"#!/bin/sh\n"),
            (zip_entry("lib/data.bin", stat.S_IFREG | 0o666), b"data"),
            (zip_entry("link", stat.S_IFLNK | 0o777), b"lib/data.bin"),
        ],
    )
    box.freeze()
    unpack_archive(archive, box.dest, max_bytes=MiB)
    assert stat.S_IMODE((box.dest / "bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((box.dest / "lib/data.bin").stat().st_mode) == 0o644
    assert os.readlink(box.dest / "link") == "lib/data.bin"


def test_a_later_entry_replaces_an_earlier_one_without_following_it(box: Box) -> None:
    entries = [
        file_entry("real.txt", b"original"),
        special_entry("alias", tarfile.SYMTYPE, "real.txt"),
        file_entry("alias", b"replaces the link, not its target"),
    ]
    archive = write_tar(box.root / "dup.tar", entries)
    box.freeze()
    unpack_archive(archive, box.dest, max_bytes=MiB)
    assert (box.dest / "real.txt").read_bytes() == b"original"
    assert not (box.dest / "alias").is_symlink()
    assert (box.dest / "alias").read_bytes() == b"replaces the link, not its target"


# --- hostile names and links ----------------------------------------------------------


def refused(box: Box, archive: Path, error: type[Exception], *, match: str, max_bytes: int = MiB) -> str:
    box.freeze()
    with pytest.raises(error, match=match) as caught:
        unpack_archive(archive, box.dest, max_bytes=max_bytes)
    message = str(caught.value)
    assert archive.name in message, "the error names the archive"
    return message


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (file_entry("../outside/pwned.txt", b"x"), r"\.\./outside/pwned\.txt"),
        (file_entry("ok/../../outside/pwned.txt", b"x"), r"leads outside"),
        (file_entry("/tmp/absolute-pwned.txt", b"x"), r"absolute"),
        (file_entry("a\\..\\..\\pwned.txt", b"x"), r"backslash"),
        (special_entry("etc", tarfile.SYMTYPE, "/etc"), r"link 'etc' points to the absolute path '/etc'"),
        (special_entry("up", tarfile.SYMTYPE, "../outside"), r"link 'up' -> '\.\./outside' leads outside"),
        (special_entry("deep/up", tarfile.SYMTYPE, "../../outside"), r"leads outside"),
        (special_entry("hard", tarfile.LNKTYPE, "../outside/precious.txt"), r"leads outside"),
        (special_entry("hard", tarfile.LNKTYPE, "/etc/passwd"), r"hard link 'hard' points to the absolute"),
        (special_entry("hard", tarfile.LNKTYPE, "later.txt"), r"does not name a file unpacked before"),
        (special_entry("tty", tarfile.CHRTYPE), r"entry 'tty' is a device file"),
        (special_entry("disk", tarfile.BLKTYPE), r"device file"),
        (special_entry("pipe", tarfile.FIFOTYPE), r"entry 'pipe' is a FIFO"),
    ],
    ids=lambda v: v if isinstance(v, str) else v[0].name,
)
def test_hostile_tar_entries_are_refused(box: Box, entry: Entry, match: str) -> None:
    archive = write_tar(
        box.root / "hostile.tar", [file_entry("fine.txt", b"ok"), entry, file_entry("later.txt", b"")]
    )
    refused(box, archive, UnsafePath, match=match)
    assert not (box.dest / "later.txt").exists(), "nothing after the refused entry"


def test_a_link_chain_that_escapes_is_refused(box: Box) -> None:
    # 'here' -> '.', then 'esc' -> 'here/../outside': written out it stays inside
    # ('outside' at the top), resolved it is the folder above the destination
    entries = [
        special_entry("here", tarfile.SYMTYPE, "."),
        special_entry("esc", tarfile.SYMTYPE, "here/../outside"),
        file_entry("esc/pwned.txt", b"x"),
    ]
    refused(box, write_tar(box.root / "chain.tar", entries), UnsafePath, match="'esc'")


def test_a_link_made_to_escape_by_a_later_link_is_refused(box: Box) -> None:
    # 'esc' -> 'd/../outside' is inside while 'd' is missing; 'd' -> '.' then makes it
    # lead above the destination: the check once everything is out catches it
    entries = [
        special_entry("esc", tarfile.SYMTYPE, "d/../outside"),
        special_entry("d", tarfile.SYMTYPE, "."),
    ]
    refused(box, write_tar(box.root / "later.tar", entries), UnsafePath, match="'esc' leads outside")


def test_a_destination_that_is_not_empty_is_refused(box: Box) -> None:
    # e.g. a link planted before unpacking, which a later entry could write through
    archive = write_tar(box.root / "through.tar", [file_entry("planted/pwned.txt", b"x")])
    box.dest.mkdir()
    (box.dest / "planted").symlink_to(box.outside)
    box.freeze()
    with pytest.raises(StorageError, match="not empty"):
        unpack_archive(archive, box.dest, max_bytes=MiB)


def test_hostile_zip_entries_are_refused(box: Box) -> None:
    cases: list[tuple[list[tuple[zipfile.ZipInfo | str, bytes]], str]] = [
        ([("../outside/pwned.txt", b"x")], r"leads outside"),
        ([("/abs.txt", b"x")], r"absolute"),
        ([(zip_entry("etc", stat.S_IFLNK | 0o777), b"/etc")], r"absolute path '/etc'"),
        ([(zip_entry("up", stat.S_IFLNK | 0o777), b"../../outside")], r"leads outside"),
        (
            [
                (zip_entry("here", stat.S_IFLNK | 0o777), b"."),
                (zip_entry("esc", stat.S_IFLNK | 0o777), b"here/../outside"),
                ("esc/pwned.txt", b"x"),
            ],
            r"link 'esc' -> 'here/\.\./outside' leads outside the model through another link",
        ),
        ([(zip_entry("tty", stat.S_IFCHR | 0o666), b"")], r"device file"),
        ([(zip_entry("pipe", stat.S_IFIFO | 0o666), b"")], r"FIFO"),
    ]
    for number, (entries, match) in enumerate(cases):
        archive = write_zip(box.root / f"hostile{number}.zip", entries)
        refused(box, archive, UnsafePath, match=match)
        for leftover in box.dest.iterdir():  # the caller's clean-up, between cases
            assert leftover.is_symlink() or leftover.is_file()
            leftover.unlink()


# --- sizes and bombs ------------------------------------------------------------------


def test_a_zip_bomb_fails_on_its_declared_size_before_writing(box: Box) -> None:
    archive = box.root / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as bundle:
        for number in range(3):
            with bundle.open(f"zeros{number}.bin", "w", force_zip64=True) as out:
                chunk = bytes(MiB)
                for _ in range(40):
                    out.write(chunk)
    assert archive.stat().st_size < MiB // 2
    refused(box, archive, ArchiveTooLarge, match="declares 125829120 bytes", max_bytes=100 * MiB)
    assert not any(box.dest.iterdir()), "refused before a byte was written"


def patch_zip_sizes(archive: Path, real_size: int, lie: int) -> None:
    """Rewrite the uncompressed size of the archive's only entry, in the local header
    and in the central directory."""
    raw = bytearray(archive.read_bytes())
    local = raw.index(b"PK\x03\x04")
    central = raw.index(b"PK\x01\x02")
    assert struct.unpack_from("<I", raw, local + 22)[0] == real_size
    assert struct.unpack_from("<I", raw, central + 24)[0] == real_size
    struct.pack_into("<I", raw, local + 22, lie)
    struct.pack_into("<I", raw, central + 24, lie)
    archive.write_bytes(bytes(raw))


def test_a_zip_bomb_with_lying_headers_fails(box: Box) -> None:
    archive = write_zip(box.root / "liar.zip", [("weights.bin", bytes(8 * MiB))])
    patch_zip_sizes(archive, 8 * MiB, 1000)  # declares 1000 bytes, inflates to 8 MiB
    message = refused(box, archive, BadArchive, match="weights.bin", max_bytes=2 * MiB)
    assert "CRC" in message
    written = box.dest / "weights.bin"
    assert not written.exists() or written.stat().st_size <= 1000


def test_a_zip_entry_shorter_than_declared_fails(box: Box) -> None:
    archive = write_zip(box.root / "short.zip", [("weights.bin", b"x" * 1000)])
    patch_zip_sizes(archive, 1000, 5000)
    refused(box, archive, BadArchive, match="weights.bin")


def test_a_tar_gz_bomb_fails(box: Box) -> None:
    archive = box.root / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 32 * MiB
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < MiB
    refused(box, archive, ArchiveTooLarge, match=r"'zeros\.bin' declares 33554432 bytes", max_bytes=4 * MiB)
    assert not any(box.dest.iterdir())


def test_the_total_over_many_entries_is_capped(box: Box) -> None:
    entries = [file_entry(f"part{n}.bin", bytes(300_000)) for n in range(5)]
    refused(box, write_tar(box.root / "many.tar", entries), ArchiveTooLarge, match="part3.bin", max_bytes=MiB)


def test_the_entry_count_is_capped(box: Box) -> None:
    tar = write_tar(box.root / "count.tar", [file_entry(f"f{n}", b"") for n in range(20)])
    zipped = write_zip(box.root / "count.zip", [(f"f{n}", b"") for n in range(20)])
    box.freeze()
    with pytest.raises(ArchiveTooLarge, match="more than 10 entries"):
        unpack(tar, box.dest, max_bytes=MiB, max_members=10)
    with pytest.raises(ArchiveTooLarge, match="20 entries, over 10"):
        unpack(zipped, box.dest / "second", max_bytes=MiB, max_members=10)
    unpack(tar, box.dest / "third", max_bytes=MiB, max_members=20)


def test_a_giant_header_is_not_read_into_memory(box: Box) -> None:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = HEADER_READ_LIMIT + 1
    raw = header.tobuf(format=tarfile.USTAR_FORMAT) + bytes(1024)
    archive = box.root / "pax.tar.gz"
    archive.write_bytes(gzip.compress(raw))
    refused(box, archive, BadArchive, match="header of more than")


# --- broken archives and the rest -----------------------------------------------------


def test_broken_archives_are_bad_archives(box: Box) -> None:
    not_one = box.root / "model.tar"
    not_one.write_bytes(b"this is no archive at all" * 40)
    refused(box, not_one, BadArchive, match="model.tar")

    whole = write_tar(box.root / "cut.tar.gz", [file_entry("big.bin", os.urandom(200_000))], compress=True)
    cut = box.root / "cut2.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    refused(box, cut, BadArchive, match="cut2.tar.gz")

    unknown = box.root / "model.bin"
    unknown.write_bytes(b"neither by name nor by content")
    refused(box, unknown, BadArchive, match="not a tar, tar.gz or zip")
    assert issubclass(BadArchive, InvalidRequest) and issubclass(ArchiveTooLarge, InvalidRequest)


def test_an_encrypted_zip_entry_is_a_bad_archive(box: Box) -> None:
    archive = write_zip(box.root / "locked.zip", [("secret.bin", b"x" * 100)])
    raw = bytearray(archive.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.index(signature)
        flags = struct.unpack_from("<H", raw, at + flags_at)[0]
        struct.pack_into("<H", raw, at + flags_at, flags | 0x1)  # the "encrypted" bit
    archive.write_bytes(bytes(raw))
    refused(box, archive, BadArchive, match="secret.bin")


def test_a_cancel_stops_the_unpacking(box: Box) -> None:
    archive = build_tar(box.root)
    box.freeze()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(FetchCancelled):
        unpack_archive(archive, box.dest, max_bytes=MiB, cancel=cancel)
    assert not any(box.dest.iterdir())
