"""The ``file`` and ``pvc`` backends on real directories, files and links."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapter.errors import IntegrityError, StorageConfigError, StorageError, StorageNotFound, UnsafePath
from adapter.settings import Settings
from puller.config import StorageConfig
from puller.storage.base import Blob, ByteStream, Plan
from puller.storage.file import FileStorage, LocalDirectoryStorage
from puller.storage.pvc import PVCStorage

MODEL_BYTES = bytes(range(256)) * 40 + b"tail"  # 10244 bytes


def read_all(stream: ByteStream, chunk: int = 1000) -> bytes:
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    out = bytearray()
    try:
        for _ in range(1_000_000):
            count = stream.readinto(view)
            if count == 0:
                return bytes(out)
            out += view[:count]
        raise AssertionError("the stream did not end")
    finally:
        stream.close()


def build_tree(root: Path) -> None:
    """root/model.bin, root/dir/{a.txt, sub/b.txt, empty/, sub/deeper/}, a file link
    and a directory link inside the root."""
    (root / "dir" / "sub" / "deeper").mkdir(parents=True)
    (root / "dir" / "empty").mkdir()
    (root / "model.bin").write_bytes(MODEL_BYTES)
    (root / "dir" / "a.txt").write_text("alpha")
    (root / "dir" / "sub" / "b.txt").write_text("bravo!")
    os.symlink("dir/a.txt", root / "link_to_a")
    os.symlink("dir/sub", root / "link_to_sub")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    build_tree(path)
    return path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(root_model_dir=tmp_path / "models", pvc_mounts_dir=tmp_path / "pvc_mounts")


@pytest.fixture
def storage(root: Path, settings: Settings) -> FileStorage:
    return FileStorage(StorageConfig(type="file", fields={"type": "file", "root": str(root)}), settings)


def relpaths(plan: Plan) -> list[str]:
    return [blob.relpath for blob in plan.blobs]


# --- file: plans ----------------------------------------------------------------------


def test_plan_of_a_file(storage: FileStorage) -> None:
    plan = storage.plan("model.bin")
    assert plan.single_object
    assert plan.kind == "files"
    assert len(plan.blobs) == 1
    blob = plan.blobs[0]
    assert blob.relpath == "model.bin"
    assert blob.name == "model.bin"
    assert blob.size == len(MODEL_BYTES)
    assert blob.version
    assert plan.total_bytes == len(MODEL_BYTES)


@pytest.mark.parametrize("path", ["/model.bin", "//model.bin", "./model.bin", "dir/../model.bin"])
def test_plan_path_forms_reach_the_same_file(storage: FileStorage, path: str) -> None:
    plan = storage.plan(path)
    assert plan.single_object
    assert relpaths(plan) == ["model.bin"]
    assert plan.blobs[0].name == "model.bin"


def test_plan_of_a_nested_file(storage: FileStorage) -> None:
    plan = storage.plan("dir/sub/b.txt")
    assert plan.single_object
    assert relpaths(plan) == ["b.txt"]
    assert plan.blobs[0].name == "dir/sub/b.txt"
    assert plan.blobs[0].size == 6


def test_plan_of_a_file_link_keeps_the_link_name(storage: FileStorage) -> None:
    plan = storage.plan("link_to_a")
    assert plan.single_object
    assert relpaths(plan) == ["link_to_a"]
    assert plan.blobs[0].size == 5


def test_plan_of_a_directory(storage: FileStorage) -> None:
    plan = storage.plan("dir")
    assert not plan.single_object
    assert relpaths(plan) == ["a.txt", "sub/b.txt"]  # empty directories skipped
    assert [b.name for b in plan.blobs] == ["dir/a.txt", "dir/sub/b.txt"]
    assert plan.total_bytes == 11


@pytest.mark.parametrize("path", ["dir/", "/dir", "/dir/"])
def test_plan_of_a_directory_with_slashes(storage: FileStorage, path: str) -> None:
    assert relpaths(storage.plan(path)) == ["a.txt", "sub/b.txt"]


def test_plan_through_a_directory_link(storage: FileStorage) -> None:
    plan = storage.plan("link_to_sub")
    assert not plan.single_object
    assert relpaths(plan) == ["b.txt"]


@pytest.mark.parametrize("path", ["", "/"])
def test_empty_path_is_everything_under_root(storage: FileStorage, path: str) -> None:
    plan = storage.plan(path)
    assert not plan.single_object
    assert relpaths(plan) == [
        "dir/a.txt",
        "dir/sub/b.txt",
        "link_to_a",
        "link_to_sub/b.txt",
        "model.bin",
    ]


def test_every_planned_blob_can_be_read(storage: FileStorage, root: Path) -> None:
    for blob in storage.plan("").blobs:
        data = read_all(storage.open_range(blob, 0, blob.size))
        assert data == (root / blob.relpath).read_bytes()


def test_link_cycle_terminates(storage: FileStorage, root: Path) -> None:
    os.symlink("..", root / "dir" / "sub" / "up")  # dir/sub/up -> dir
    os.symlink("../..", root / "dir" / "sub" / "deeper" / "top")  # dir/sub/deeper/top -> dir
    # a link to one of its own ancestors is not followed: the listing ends
    assert relpaths(storage.plan("dir")) == ["a.txt", "sub/b.txt"]
    assert "dir/a.txt" in relpaths(storage.plan(""))


def test_special_files_are_skipped(storage: FileStorage, root: Path) -> None:
    os.mkfifo(root / "dir" / "pipe")
    os.symlink("missing-target", root / "dir" / "dangling")
    assert relpaths(storage.plan("dir")) == ["a.txt", "sub/b.txt"]
    with pytest.raises(StorageNotFound, match="not a regular file"):
        storage.plan("dir/pipe")


def test_missing_path_is_not_found(storage: FileStorage) -> None:
    with pytest.raises(StorageNotFound, match=r"'nope/model\.bin'"):
        storage.plan("nope/model.bin")
    with pytest.raises(StorageNotFound):
        storage.plan("model.bin/inside-a-file")


def test_directory_without_files_is_not_found(storage: FileStorage) -> None:
    with pytest.raises(StorageNotFound, match="no files under path 'dir/empty'"):
        storage.plan("dir/empty")


def test_absolute_path_is_relative_to_root(storage: FileStorage) -> None:
    with pytest.raises(StorageNotFound):
        storage.plan("/etc/hostname")


# --- file: escapes --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["..", "../outside.txt", "dir/../../outside.txt", "dir/sub/../../../x"])
def test_dotdot_escape_is_refused(storage: FileStorage, root: Path, path: str) -> None:
    (root.parent / "outside.txt").write_text("outside")
    with pytest.raises(UnsafePath):
        storage.plan(path)


def test_nul_is_refused(storage: FileStorage) -> None:
    with pytest.raises(UnsafePath, match="NUL"):
        storage.plan("model.bin\x00.txt")


def test_link_to_etc_inside_root_is_refused(storage: FileStorage, root: Path) -> None:
    os.symlink("/etc", root / "etc")
    for path in ("etc", "etc/hostname", "etc/passwd"):
        with pytest.raises(UnsafePath):
            storage.plan(path)
    # listing a directory that contains it is refused too
    with pytest.raises(UnsafePath, match="'etc'"):
        storage.plan("")


def test_file_link_leading_outside_is_refused(storage: FileStorage, root: Path) -> None:
    secret = root.parent / "secret.txt"
    secret.write_text("top secret")
    os.symlink(secret, root / "dir" / "innocent.txt")
    with pytest.raises(UnsafePath):
        storage.plan("dir/innocent.txt")
    with pytest.raises(UnsafePath, match=r"'dir/innocent\.txt'"):
        storage.plan("dir")


def test_relative_link_climbing_out_is_refused(storage: FileStorage, root: Path) -> None:
    (root.parent / "sibling").mkdir()
    (root.parent / "sibling" / "x.bin").write_text("x")
    os.symlink("../../sibling", root / "dir" / "climb")
    with pytest.raises(UnsafePath):
        storage.plan("dir/climb/x.bin")


def test_open_range_refuses_a_crafted_blob(storage: FileStorage, root: Path) -> None:
    (root.parent / "outside.txt").write_text("outside")
    for name in ("../outside.txt", "/../outside.txt"):
        with pytest.raises(UnsafePath):
            storage.open_range(Blob(name=name, relpath="x", size=7), 0, 7)


def test_open_range_rechecks_a_link_changed_after_the_plan(storage: FileStorage, root: Path) -> None:
    plan = storage.plan("dir")
    (root / "dir" / "a.txt").unlink()
    os.symlink("/etc/hostname", root / "dir" / "a.txt")
    blob = next(b for b in plan.blobs if b.relpath == "a.txt")
    with pytest.raises(UnsafePath):
        storage.open_range(blob, 0, blob.size)


def test_open_range_rechecks_a_folder_swapped_for_a_link_after_the_plan(
    storage: FileStorage, root: Path
) -> None:
    plan = storage.plan("dir")
    blob = next(b for b in plan.blobs if b.relpath == "a.txt")
    outside = root.parent / "elsewhere"
    outside.mkdir()
    (outside / "a.txt").write_bytes((root / "dir" / "a.txt").read_bytes())
    (root / "dir").rename(root / "moved")
    (root / "dir").symlink_to(outside)
    with pytest.raises(UnsafePath):
        storage.open_range(blob, 0, blob.size)


def test_open_range_refuses_a_crafted_blob_with_the_version_of_a_file_outside(
    storage: FileStorage, root: Path
) -> None:
    outside = root.parent / "outside.txt"
    outside.write_text("outside")
    storage.plan("dir")  # the root is resolved
    st = outside.stat()
    version = f"{st.st_dev:x}-{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"
    with pytest.raises(UnsafePath):
        storage.open_range(Blob(name="../outside.txt", relpath="x", size=7, version=version), 0, 7)


def test_a_file_replaced_after_the_plan_is_read_as_it_is_now(storage: FileStorage, root: Path) -> None:
    plan = storage.plan("dir")
    blob = next(b for b in plan.blobs if b.relpath == "a.txt")
    data = (root / "dir" / "a.txt").read_bytes()
    (root / "dir" / "a.txt").unlink()
    (root / "dir" / "a.txt").write_bytes(bytes(reversed(data)))  # another file, same size
    with storage.open_range(blob, 0, blob.size) as stream:  # type: ignore[attr-defined]
        buffer = memoryview(bytearray(blob.size))
        assert stream.readinto(buffer) == blob.size
    assert bytes(buffer) == bytes(reversed(data))


# --- file: ranges ---------------------------------------------------------------------


def test_open_range_reads_the_whole_file(storage: FileStorage) -> None:
    blob = storage.plan("model.bin").blobs[0]
    assert read_all(storage.open_range(blob, 0, blob.size)) == MODEL_BYTES


@pytest.mark.parametrize(("start", "end"), [(0, 1), (1, 2), (100, 3000), (1000, 1000), (10000, 10244)])
def test_open_range_reads_exactly_the_range(storage: FileStorage, start: int, end: int) -> None:
    blob = storage.plan("model.bin").blobs[0]
    assert read_all(storage.open_range(blob, start, end), chunk=333) == MODEL_BYTES[start:end]


def test_open_range_stops_at_end_with_a_large_buffer(storage: FileStorage) -> None:
    blob = storage.plan("model.bin").blobs[0]
    stream = storage.open_range(blob, 10, 20)
    buffer = bytearray(b"\xee" * 100)
    view = memoryview(buffer)
    try:
        assert stream.readinto(view) == 10
        assert bytes(buffer[:10]) == MODEL_BYTES[10:20]
        assert buffer[10:] == b"\xee" * 90  # nothing written past the range
        assert stream.readinto(view) == 0
    finally:
        stream.close()
    stream.close()  # closing twice is harmless


def test_open_range_rejects_bad_ranges(storage: FileStorage) -> None:
    blob = storage.plan("model.bin").blobs[0]
    for start, end in ((-1, 5), (10, 5)):
        with pytest.raises(StorageError, match="invalid byte range"):
            storage.open_range(blob, start, end)


def test_open_range_past_the_end_of_a_shrunk_file(storage: FileStorage, root: Path) -> None:
    blob = storage.plan("model.bin").blobs[0]
    (root / "model.bin").write_bytes(MODEL_BYTES[:100])
    with pytest.raises(IntegrityError, match="shorter"):
        storage.open_range(blob, 0, blob.size)


def test_truncation_during_a_read_is_detected(storage: FileStorage, root: Path) -> None:
    blob = storage.plan("model.bin").blobs[0]
    stream = storage.open_range(blob, 0, blob.size)
    buffer = memoryview(bytearray(1000))
    try:
        assert stream.readinto(buffer) == 1000
        os.truncate(root / "model.bin", 1500)
        assert stream.readinto(buffer) == 500
        with pytest.raises(IntegrityError, match="ended at byte 1500"):
            stream.readinto(buffer)
    finally:
        stream.close()


def test_open_range_of_a_vanished_file(storage: FileStorage, root: Path) -> None:
    blob = storage.plan("dir/a.txt").blobs[0]
    (root / "dir" / "a.txt").unlink()
    with pytest.raises(StorageNotFound):
        storage.open_range(blob, 0, blob.size)


def test_version_changes_with_the_content(storage: FileStorage, root: Path) -> None:
    before = storage.plan("dir/a.txt").blobs[0].version
    (root / "dir" / "a.txt").write_text("alpha, longer now")
    after = storage.plan("dir/a.txt").blobs[0].version
    assert before != after


# --- file: config ---------------------------------------------------------------------


@pytest.mark.parametrize("fields", [{}, {"root": ""}, {"root": 5}, {"root": "a\x00b"}])
def test_file_storage_needs_a_root(settings: Settings, fields: dict[str, object]) -> None:
    with pytest.raises(StorageConfigError, match="root"):
        FileStorage(StorageConfig(type="file", fields={"type": "file", **fields}), settings)


def test_missing_root_is_not_found(tmp_path: Path, settings: Settings) -> None:
    storage = FileStorage(StorageConfig(type="file", fields={"root": str(tmp_path / "absent")}), settings)
    with pytest.raises(StorageNotFound, match="does not exist"):
        storage.plan("")


def test_root_that_is_a_file(tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "plain").write_text("x")
    storage = FileStorage(StorageConfig(type="file", fields={"root": str(tmp_path / "plain")}), settings)
    with pytest.raises(StorageNotFound, match="not a directory"):
        storage.plan("")


def test_identity_and_flags(storage: FileStorage, root: Path) -> None:
    assert storage.identity() == f"file:{root}"
    assert not storage.links_in_place
    assert storage.local_path("model.bin") is None
    assert isinstance(storage, LocalDirectoryStorage)


def test_relative_root_is_made_absolute(
    root: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(root.parent)
    storage = FileStorage(StorageConfig(type="file", fields={"root": "store/./dir/.."}), settings)
    assert storage.identity() == f"file:{root}"
    assert storage.plan("model.bin").blobs[0].size == len(MODEL_BYTES)


def test_root_slash_serves_absolute_paths(root: Path, settings: Settings) -> None:
    # the `file://` URI form: root "/" and the absolute path as model path
    storage = FileStorage(StorageConfig(type="file", fields={"root": "/"}), settings)
    plan = storage.plan(str(root / "model.bin"))
    assert relpaths(plan) == ["model.bin"]
    assert read_all(storage.open_range(plan.blobs[0], 0, 4)) == MODEL_BYTES[:4]


def test_root_reached_through_a_link(root: Path, tmp_path: Path, settings: Settings) -> None:
    os.symlink(root, tmp_path / "alias")
    storage = FileStorage(StorageConfig(type="file", fields={"root": str(tmp_path / "alias")}), settings)
    assert relpaths(storage.plan("dir")) == ["a.txt", "sub/b.txt"]


# --- pvc ------------------------------------------------------------------------------


@pytest.fixture
def mount(settings: Settings) -> Path:
    path = settings.pvc_mounts_dir / "claim"
    path.mkdir(parents=True)
    build_tree(path)
    other = settings.pvc_mounts_dir / "other-claim"
    other.mkdir()
    (other / "theirs.bin").write_text("not yours")
    return path


def pvc(settings: Settings, name: object = "claim") -> PVCStorage:
    return PVCStorage(StorageConfig(type="pvc", fields={"type": "pvc", "name": name}), settings)


def test_pvc_local_path(mount: Path, settings: Settings) -> None:
    storage = pvc(settings)
    assert storage.links_in_place
    assert storage.local_path("model.bin") == str(mount.resolve() / "model.bin")
    assert storage.local_path("/dir/") == str(mount.resolve() / "dir")
    assert storage.local_path("") == str(mount.resolve())
    assert Path(storage.local_path("dir/sub/b.txt")).read_text() == "bravo!"


def test_pvc_local_path_is_absolute(mount: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative_settings = Settings(pvc_mounts_dir=Path("pvc_mounts"))
    path = pvc(relative_settings).local_path("model.bin")
    assert os.path.isabs(path)
    assert Path(path).read_bytes() == MODEL_BYTES


def test_pvc_local_path_missing(mount: Path, settings: Settings) -> None:
    with pytest.raises(StorageNotFound, match="'no/such/model'"):
        pvc(settings).local_path("no/such/model")


@pytest.mark.parametrize("path", ["../other-claim/theirs.bin", "..", "dir/../../other-claim", "a\x00"])
def test_pvc_local_path_stays_inside_the_mount(mount: Path, settings: Settings, path: str) -> None:
    with pytest.raises(UnsafePath):
        pvc(settings).local_path(path)


def test_pvc_link_to_another_claim_is_refused(mount: Path, settings: Settings) -> None:
    os.symlink("../other-claim", mount / "sneaky")
    with pytest.raises(UnsafePath):
        pvc(settings).local_path("sneaky/theirs.bin")
    os.symlink("/etc", mount / "etc")
    with pytest.raises(UnsafePath):
        pvc(settings).local_path("etc/passwd")


def test_pvc_model_holding_a_link_out_of_the_claim_is_refused(mount: Path, settings: Settings) -> None:
    model = mount / "linked-model"
    (model / "inner").mkdir(parents=True)
    (model / "weights.bin").write_bytes(b"w")
    os.symlink("../weights.bin", model / "inner" / "same-model.bin")  # inside: fine
    os.symlink("../../dir", model / "inner" / "same-claim")  # inside the claim: fine
    assert pvc(settings).local_path("linked-model") == str(model.resolve())
    os.symlink("../../../other-claim/theirs.bin", model / "inner" / "theirs.bin")
    with pytest.raises(UnsafePath, match=r"inner/theirs\.bin"):
        pvc(settings).local_path("linked-model")
    (model / "inner" / "theirs.bin").unlink()
    os.symlink("/etc/passwd", model / "passwd")
    with pytest.raises(UnsafePath, match="'passwd'"):
        pvc(settings).local_path("linked-model")


def test_pvc_not_mounted(settings: Settings) -> None:
    settings.pvc_mounts_dir.mkdir(parents=True)
    with pytest.raises(StorageNotFound, match="'absent'"):
        pvc(settings, "absent").local_path("model.bin")


@pytest.mark.parametrize("name", ["a/b", "..", "../etc", "a..b", "x\x00y", ".", "/abs"])
def test_pvc_name_is_one_folder(settings: Settings, name: str) -> None:
    with pytest.raises(UnsafePath):
        pvc(settings, name)


@pytest.mark.parametrize("name", [None, "", 3, ["claim"]])
def test_pvc_name_is_required(settings: Settings, name: object) -> None:
    with pytest.raises(StorageConfigError, match="name"):
        pvc(settings, name)


def test_pvc_plan_and_read_as_file_does(mount: Path, settings: Settings) -> None:
    storage = pvc(settings)
    assert storage.identity() == "pvc:claim"
    plan = storage.plan("dir")
    assert relpaths(plan) == ["a.txt", "sub/b.txt"]
    assert [read_all(storage.open_range(b, 0, b.size)) for b in plan.blobs] == [b"alpha", b"bravo!"]
    single = storage.plan("model.bin")
    assert single.single_object
    assert read_all(storage.open_range(single.blobs[0], 5, 50)) == MODEL_BYTES[5:50]


def test_single_file_relpath_is_never_dotdot(storage: FileStorage, root: Path) -> None:
    # "link_to_a/x/.." resolves to the file dir/a.txt: its relpath must be a name
    plan = storage.plan("link_to_a/x/..")
    assert plan.single_object
    assert relpaths(plan) == ["a.txt"]
    assert plan.blobs[0].name == "dir/a.txt"
