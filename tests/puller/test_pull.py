"""Puller end to end: a real storage-config directory, real backends (file, pvc, s3 on
moto), real files under ROOT_MODEL_DIR."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from adapter.errors import InvalidModelId, StorageConfigError, StorageNotFound, UnsafePath
from adapter.settings import Settings
from puller.archive import ArchiveTooLarge
from puller.config import StorageConfig
from puller.model_key import ModelKey
from puller.pull import Puller, archive_model_name, local_model_name, unpack_enabled
from puller.request import PullRequest
from puller.storage.base import Blob, Plan, Storage
from puller.storage.file import FileRange, FileStorage
from puller.storage.registry import StorageRegistry
from tests.puller.conftest import make_settings
from tests.servers.s3 import MotoS3Server


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def staging_leftovers(settings: Settings) -> list[str]:
    tmp = settings.root_model_dir / "_tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


MODEL_FILES = {
    "models/sk/model.joblib": os.urandom(300_000),
    "models/sk/config/settings.json": b'{"k": "v"}',
    "models/sk/empty.txt": b"",
    "models/single.bin": os.urandom(150_000),
    "schemas/s.json": b'{"inputs": []}',
}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "source"
    write_tree(root, MODEL_FILES)
    return root


@pytest.fixture
def settings(tmp_path: Path, source: Path) -> Settings:
    settings = make_settings(tmp_path)
    settings.storage_config_dir.mkdir(parents=True)
    (settings.storage_config_dir / "default").write_text(json.dumps({"type": "file", "root": str(source)}))
    return settings


@pytest.fixture
async def puller(settings: Settings) -> AsyncIterator[Puller]:
    p = Puller(settings)
    await asyncio.to_thread(p.start)
    yield p
    await asyncio.to_thread(p.close)


def request(model_id: str, path: str, **key: Any) -> PullRequest:
    return PullRequest(model_id=model_id, model_path=path, model_key=ModelKey.from_mapping(key))


# --- file storage -------------------------------------------------------------------------


async def test_single_object(puller: Puller, settings: Settings) -> None:
    with capture_logs() as logs:
        local = await puller.pull(
            PullRequest(
                model_id="single__isvc-1",
                model_path="models/single.bin",
                model_key=ModelKey.from_mapping({"model_type": {"name": "SKLearn:1"}}),
                model_type="mt:other",
            )
        )
    target = settings.root_model_dir / "single__isvc-1"
    assert local.path == target / "single.bin"
    assert local.path.is_file()
    assert local.path.read_bytes() == MODEL_FILES["models/single.bin"]
    assert local.disk_size_bytes == len(MODEL_FILES["models/single.bin"])
    assert local.model_type == "sklearn"
    assert local.schema_path is None
    assert sorted(p.name for p in target.iterdir()) == ["single.bin"]
    assert staging_leftovers(settings) == []
    pulled = [entry for entry in logs if entry["event"] == "model pulled"]
    assert len(pulled) == 1
    assert pulled[0]["bytes"] == len(MODEL_FILES["models/single.bin"])
    assert pulled[0]["files"] == 1
    assert {"seconds", "mb_per_s"} <= set(pulled[0])


async def test_prefix_with_schema(puller: Puller, settings: Settings) -> None:
    local = await puller.pull(request("prefix__isvc-2", "models/sk/", schema_path="schemas/s.json"))
    target = settings.root_model_dir / "prefix__isvc-2"
    assert local.path == target / "sk"
    assert tree(local.path) == {
        rel.removeprefix("models/sk/"): data
        for rel, data in MODEL_FILES.items()
        if rel.startswith("models/sk/")
    }
    assert local.schema_path == target / "_schema.json"
    assert local.schema_path.read_bytes() == MODEL_FILES["schemas/s.json"]
    assert local.disk_size_bytes == sum(len(d) for r, d in MODEL_FILES.items() if r.startswith("models/sk/"))
    assert sorted(p.name for p in target.iterdir()) == ["_schema.json", "sk"]


@pytest.mark.parametrize("path", ["", "/"])
async def test_an_empty_path_is_the_whole_store(puller: Puller, settings: Settings, path: str) -> None:
    local = await puller.pull(request("all__isvc-3", path))
    assert local.path == settings.root_model_dir / "all__isvc-3" / "_model"
    assert tree(local.path) == MODEL_FILES


async def test_a_new_pull_replaces_the_old_directory(
    puller: Puller, settings: Settings, source: Path
) -> None:
    await puller.pull(request("again__isvc-4", "models/sk"))
    (source / "models" / "sk" / "model.joblib").write_bytes(b"v2")
    (source / "models" / "sk" / "empty.txt").unlink()
    local = await puller.pull(request("again__isvc-4", "models/sk"))
    assert tree(local.path) == {"model.joblib": b"v2", "config/settings.json": b'{"k": "v"}'}
    assert staging_leftovers(settings) == []


async def test_two_models_at_once(puller: Puller, settings: Settings) -> None:
    a, b = await asyncio.gather(
        puller.pull(request("a__isvc-5", "models/sk")), puller.pull(request("b__isvc-6", "models/single.bin"))
    )
    assert a.path.is_dir()
    assert b.path.read_bytes() == MODEL_FILES["models/single.bin"]


async def test_failures_leave_nothing(puller: Puller, settings: Settings) -> None:
    with pytest.raises(InvalidModelId):
        await puller.pull(request("../escape", "models/sk"))
    with pytest.raises(StorageNotFound):
        await puller.pull(request("missing__isvc-7", "models/nope"))
    with pytest.raises(StorageNotFound, match="folder"):
        await puller.pull(request("schema__isvc-8", "models/sk", schema_path="models"))
    with pytest.raises(StorageConfigError, match="nope"):
        await puller.pull(request("key__isvc-9", "models/sk", storage_key="nope"))
    with pytest.raises(UnsafePath):
        await puller.pull(request("dots__isvc-10", "models/.."))
    assert sorted(p.name for p in settings.root_model_dir.iterdir()) == ["_tmp"]
    assert staging_leftovers(settings) == []


def test_local_model_name() -> None:
    assert local_model_name("a/b/model.pt") == "model.pt"
    assert local_model_name("a/b/") == "b"
    assert local_model_name("") == "_model"
    assert local_model_name("/") == "_model"
    with pytest.raises(UnsafePath):
        local_model_name("a/..")


# --- pvc: linked in place ----------------------------------------------------------------


async def test_pvc_models_are_linked_not_copied(puller: Puller, settings: Settings) -> None:
    claim = settings.pvc_mounts_dir / "claim"
    write_tree(claim, {"m/a.bin": b"a" * 100, "m/sub/b.bin": b"b" * 50, "schema.json": b"{}"})
    local = await puller.pull(
        request(
            "pvc__isvc-11", "m", storage_params={"type": "pvc", "name": "claim"}, schema_path="schema.json"
        )
    )
    target = settings.root_model_dir / "pvc__isvc-11"
    assert local.path == target / "m"
    assert local.path.is_symlink()
    assert Path(os.readlink(local.path)) == (claim / "m").resolve()
    assert local.disk_size_bytes == 150
    assert local.schema_path is not None
    assert local.schema_path.read_bytes() == b"{}"

    await puller.remove("pvc__isvc-11")
    assert not target.exists()
    assert tree(claim) == {"m/a.bin": b"a" * 100, "m/sub/b.bin": b"b" * 50, "schema.json": b"{}"}

    with pytest.raises(StorageNotFound):
        await puller.pull(request("pvc__isvc-12", "absent", storage_params={"type": "pvc", "name": "claim"}))
    assert not (settings.root_model_dir / "pvc__isvc-12").exists()
    assert staging_leftovers(settings) == []


# --- s3 on moto --------------------------------------------------------------------------


@pytest.mark.integration
async def test_s3_models_through_the_storage_config(
    moto_s3: MotoS3Server, bucket: str, puller: Puller, settings: Settings
) -> None:
    (settings.storage_config_dir / "my-s3").write_text(
        json.dumps(
            {
                "type": "s3",
                "endpoint_url": moto_s3.endpoint_url,
                "access_key_id": "key-id",
                "secret_access_key": "secret",
                "default_bucket": "not-this-one",
            }
        )
    )
    files = {"weights.bin": os.urandom(5 * settings.pull_part_bytes + 3), "cfg/a.json": b"{}", "empty": b""}
    for rel, data in files.items():
        moto_s3.put_object(bucket, f"s3models/mnist/{rel}", data)
    moto_s3.put_object(bucket, "s3models/mnist/", b"")
    moto_s3.put_object(bucket, "s3schemas/mnist.json", b'{"schema": 1}')

    local = await puller.pull(
        request(
            "mnist__isvc-13",
            "s3models/mnist",
            storage_key="my-s3",
            storage_params={"bucket": bucket},
            schema_path="s3schemas/mnist.json",
        )
    )
    assert tree(local.path) == files
    assert local.disk_size_bytes == sum(len(d) for d in files.values())
    assert local.schema_path is not None
    assert local.schema_path.read_bytes() == b'{"schema": 1}'

    single = await puller.pull(
        request("one__isvc-14", "s3models/mnist/weights.bin", storage_key="my-s3", bucket=bucket)
    )
    assert single.path.read_bytes() == files["weights.bin"]
    size = await puller.predict_size(
        request("one__isvc-14", "s3models/mnist", storage_key="my-s3", bucket=bucket)
    )
    # the first listing also builds the boto3 client: it may miss the budget
    assert size in (None, sum(len(d) for d in files.values()))
    assert staging_leftovers(settings) == []


# --- cancellation ------------------------------------------------------------------------


class SlowFileStorage(FileStorage):
    """A file store whose reads take a while, counting the reads in progress."""

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        super().__init__(config, settings)
        self.active = 0
        self.bytes_read = 0
        self.lock = threading.Lock()

    def open_range(self, blob: Blob, start: int, end: int) -> SlowRange:
        inner = super().open_range(blob, start, end)
        with self.lock:
            self.active += 1
        return SlowRange(self, inner)  # type: ignore[arg-type]


class SlowRange:
    def __init__(self, store: SlowFileStorage, inner: FileRange) -> None:
        self.store = store
        self.inner = inner

    def readinto(self, buffer: memoryview) -> int:
        time.sleep(0.02)
        count = self.inner.readinto(buffer[:8192])
        with self.store.lock:
            self.store.bytes_read += count
        return count

    def close(self) -> None:
        self.inner.close()
        with self.store.lock:
            self.store.active -= 1


class OneBackendRegistry(StorageRegistry):
    """Hands out one given backend for every config (to slow a real one down)."""

    def __init__(self, backend: Storage) -> None:
        super().__init__()
        self.backend = backend

    def get(self, config: StorageConfig, settings: Settings) -> Storage:
        return self.backend


@pytest.fixture
def slow_store(settings: Settings, source: Path) -> Iterator[SlowFileStorage]:
    store = SlowFileStorage(StorageConfig(type="file", fields={"root": str(source)}), settings)
    yield store
    store.close()


async def test_cancel_mid_pull_leaves_nothing(settings: Settings, slow_store: SlowFileStorage) -> None:
    puller = Puller(settings, registry=OneBackendRegistry(slow_store))
    await asyncio.to_thread(puller.start)
    try:
        task = asyncio.create_task(puller.pull(request("slow__isvc-15", "models/sk")))
        deadline = time.monotonic() + 10
        while slow_store.bytes_read == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert slow_store.bytes_read > 0, "the pull never started reading"
        assert staging_leftovers(settings) != []
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # by the time the cancellation is seen, every worker has stopped
        assert slow_store.active == 0
        read_at_cancel = slow_store.bytes_read
        assert read_at_cancel < len(MODEL_FILES["models/sk/model.joblib"])
        await asyncio.sleep(0.1)
        assert slow_store.bytes_read == read_at_cancel
        assert not (settings.root_model_dir / "slow__isvc-15").exists()
        assert staging_leftovers(settings) == []
    finally:
        await asyncio.to_thread(puller.close)


class StalledListing(FileStorage):
    """A file store whose listing hangs until released (a vendor SDK stuck in a read)."""

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        super().__init__(config, settings)
        self.listing = threading.Event()
        self.release = threading.Event()
        self.listed = threading.Event()

    def plan(self, path: str) -> Plan:
        self.listing.set()
        self.release.wait(10)
        try:
            return super().plan(path)
        finally:
            self.listed.set()


async def test_a_cancel_during_a_stalled_listing_returns_at_once_and_writes_nothing(
    settings: Settings, source: Path
) -> None:
    store = StalledListing(StorageConfig(type="file", fields={"root": str(source)}), settings)
    puller = Puller(settings, registry=OneBackendRegistry(store))
    await asyncio.to_thread(puller.start)
    try:
        task = asyncio.create_task(puller.pull(request("stalled__isvc-30", "models/sk")))
        assert await asyncio.to_thread(store.listing.wait, 10), "the listing never started"
        task.cancel()
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        assert time.monotonic() - started < 2.0, "the cancel waited for the listing"
        assert staging_leftovers(settings) == []
        # the listing ends later: the abandoned thread writes nothing
        store.release.set()
        assert await asyncio.to_thread(store.listed.wait, 10)
        await asyncio.sleep(0.2)
        assert not (settings.root_model_dir / "stalled__isvc-30").exists()
        assert staging_leftovers(settings) == []
    finally:
        store.release.set()
        await asyncio.to_thread(puller.close)


# --- sizes, removal, purge -----------------------------------------------------------------


class SlowListing(FileStorage):
    def plan(self, path: str) -> Plan:
        time.sleep(1.5)
        return super().plan(path)


async def test_predict_size(puller: Puller, settings: Settings, source: Path) -> None:
    assert await puller.predict_size(request("p__isvc-16", "anything", disk_size_bytes=1234)) == 1234
    expected = sum(len(d) for r, d in MODEL_FILES.items() if r.startswith("models/sk/"))
    assert await puller.predict_size(request("p__isvc-16", "models/sk")) == expected
    assert await puller.predict_size(request("p__isvc-16", "models/absent")) is None

    slow = SlowListing(StorageConfig(type="file", fields={"root": str(source)}), settings)
    slow_puller = Puller(settings, registry=OneBackendRegistry(slow))
    try:
        started = time.monotonic()
        assert await slow_puller.predict_size(request("p__isvc-16", "models/sk")) is None
        assert time.monotonic() - started < 1.0
    finally:
        slow_puller.close()


async def test_remove_and_purge(puller: Puller, settings: Settings, tmp_path: Path) -> None:
    await puller.pull(request("r1__isvc-17", "models/sk"))
    await puller.pull(request("r2__isvc-18", "models/single.bin"))
    await puller.remove("r1__isvc-17")
    assert not (settings.root_model_dir / "r1__isvc-17").exists()
    await puller.remove("r1__isvc-17")  # absent: fine
    assert staging_leftovers(settings) == []

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    (settings.root_model_dir / "linked__isvc-19").symlink_to(outside)
    (settings.root_model_dir / "_mlserver_models" / "x").mkdir(parents=True)
    (settings.root_model_dir / "_tmp" / "half-done").mkdir()

    removed = await asyncio.to_thread(puller.purge)

    assert sorted(removed) == ["linked__isvc-19", "r2__isvc-18"]
    assert sorted(p.name for p in settings.root_model_dir.iterdir()) == ["_mlserver_models", "_tmp"]
    assert staging_leftovers(settings) == []
    assert (outside / "keep").exists()

    with pytest.raises(InvalidModelId):
        puller.model_dir("../x")
    assert puller.model_dir("ok__isvc-20") == settings.root_model_dir / "ok__isvc-20"


async def test_start_sweeps_leftovers(settings: Settings) -> None:
    leftover = settings.root_model_dir / "_tmp" / "old.pull"
    leftover.mkdir(parents=True)
    (leftover / "partial").write_bytes(b"x")
    p = Puller(settings)
    p.start()
    p.close()
    assert staging_leftovers(settings) == []


async def test_pull_into_a_destination(puller: Puller, tmp_path: Path) -> None:
    dest = tmp_path / "elsewhere" / "dest"
    result = await puller.pull_into(ModelKey(), "models/sk", dest)
    assert result["path"] == str(dest / "sk")
    assert tree(dest / "sk")["model.joblib"] == MODEL_FILES["models/sk/model.joblib"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest"]
    with pytest.raises(Exception, match="not an empty folder"):
        await puller.pull_into(ModelKey(), "models/sk", dest)


# --- archives ------------------------------------------------------------------------------

ARCHIVED = {
    "model-settings.json": b'{"implementation": "mlserver_sklearn.SKLearnModel"}',
    "model.joblib": os.urandom(100_000),
    "sub/notes.txt": b"notes",
}


def make_tar(path: Path, files: dict[str, bytes], *, prefix: str = "", mode: str = "w:gz") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as archive:  # type: ignore[call-overload]
        for rel, data in files.items():
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, files: dict[str, bytes], *, prefix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for rel, data in files.items():
            archive.writestr(prefix + rel, data)
    return path


async def add_entry(puller: Puller, settings: Settings, name: str, entry: dict[str, Any]) -> None:
    """Write a storage-config entry and wait (bounded) until the running puller sees it."""
    (settings.storage_config_dir / name).write_text(json.dumps(entry))
    deadline = time.monotonic() + 10
    while puller.configs.lookup(name) != entry and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert puller.configs.lookup(name) == entry, "the storage config change was not seen"


def model_dir_entries(settings: Settings, model_id: str) -> list[str]:
    return sorted(p.name for p in (settings.root_model_dir / model_id).iterdir())


async def test_a_tar_gz_is_unpacked_in_place(puller: Puller, settings: Settings, source: Path) -> None:
    make_tar(source / "archives" / "mnist.tar.gz", ARCHIVED)
    local = await puller.pull(request("tgz__isvc-21", "archives/mnist.tar.gz", schema_path="schemas/s.json"))
    target = settings.root_model_dir / "tgz__isvc-21"
    assert local.path == target / "mnist"
    assert tree(local.path) == ARCHIVED
    assert local.disk_size_bytes == sum(len(d) for d in ARCHIVED.values())
    assert model_dir_entries(settings, "tgz__isvc-21") == ["_schema.json", "mnist"]
    assert staging_leftovers(settings) == []


@pytest.mark.parametrize(
    ("name", "mode"), [("mnist.tgz", "w:gz"), ("mnist.tar", "w"), ("MNIST.TAR.GZ", "w:gz")]
)
async def test_one_top_folder_named_like_the_archive_is_the_model(
    puller: Puller, settings: Settings, source: Path, name: str, mode: str
) -> None:
    stem = name.split(".", maxsplit=1)[0]
    make_tar(source / "archives" / name, ARCHIVED, prefix=f"{stem}/", mode=mode)
    local = await puller.pull(request("top__isvc-22", f"archives/{name}"))
    assert local.path == settings.root_model_dir / "top__isvc-22" / stem
    assert tree(local.path) == ARCHIVED  # not mnist/mnist/...
    assert model_dir_entries(settings, "top__isvc-22") == [stem]


async def test_a_top_folder_of_another_name_is_kept(puller: Puller, settings: Settings, source: Path) -> None:
    make_zip(source / "archives" / "model.zip", ARCHIVED, prefix="1/")
    local = await puller.pull(request("zip__isvc-23", "archives/model.zip"))
    assert local.path == settings.root_model_dir / "zip__isvc-23" / "model"
    assert tree(local.path) == {f"1/{rel}": data for rel, data in ARCHIVED.items()}


async def test_unpack_false_keeps_the_archive(puller: Puller, settings: Settings, source: Path) -> None:
    archive = make_tar(source / "archives" / "keep.tar.gz", ARCHIVED)
    for value in ("false", "False"):
        local = await puller.pull(
            request("keep__isvc-24", "archives/keep.tar.gz", storage_params={"unpack": value})
        )
        assert local.path == settings.root_model_dir / "keep__isvc-24" / "keep.tar.gz"
        assert local.path.read_bytes() == archive.read_bytes()
        assert local.disk_size_bytes == archive.stat().st_size

    await add_entry(puller, settings, "packed", {"type": "file", "root": str(source), "unpack": False})
    local = await puller.pull(request("keep__isvc-25", "archives/keep.tar.gz", storage_key="packed"))
    assert local.path.is_file()


async def test_an_archive_over_the_cap_leaves_nothing(
    tmp_path: Path, settings: Settings, source: Path
) -> None:
    make_tar(source / "archives" / "bomb.tar.gz", {"zeros": bytes(200_000)})
    capped = Puller(replace(settings, archive_max_bytes=100_000))
    await asyncio.to_thread(capped.start)
    try:
        with pytest.raises(ArchiveTooLarge, match="ARCHIVE_MAX_BYTES"):
            await capped.pull(request("bomb__isvc-26", "archives/bomb.tar.gz"))
    finally:
        await asyncio.to_thread(capped.close)
    assert not (settings.root_model_dir / "bomb__isvc-26").exists()
    assert staging_leftovers(settings) == []


async def test_an_unsafe_archive_leaves_nothing(puller: Puller, settings: Settings, source: Path) -> None:
    make_tar(source / "archives" / "evil.tar.gz", {"ok.txt": b"ok", "../../escaped.txt": b"x"})
    with pytest.raises(UnsafePath):
        await puller.pull(request("evil__isvc-27", "archives/evil.tar.gz"))
    assert not (settings.root_model_dir / "evil__isvc-27").exists()
    assert not list(settings.root_model_dir.parent.rglob("escaped.txt"))
    assert staging_leftovers(settings) == []


async def test_a_link_to_the_top_folder_is_refused_after_hoisting(
    puller: Puller, settings: Settings, source: Path
) -> None:
    path = source / "archives" / "m.tar"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        folder = tarfile.TarInfo("m")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        up = tarfile.TarInfo("m/up")
        up.type = tarfile.SYMTYPE
        up.linkname = ".."
        archive.addfile(up)
    with pytest.raises(UnsafePath, match="link 'up' leads outside"):
        await puller.pull(request("up__isvc-28", "archives/m.tar"))
    assert not (settings.root_model_dir / "up__isvc-28").exists()
    assert staging_leftovers(settings) == []


@pytest.mark.integration
async def test_a_zip_on_s3_is_unpacked(
    moto_s3: MotoS3Server, bucket: str, puller: Puller, settings: Settings, tmp_path: Path
) -> None:
    archive = make_zip(tmp_path / "iris.zip", ARCHIVED)
    moto_s3.put_object(bucket, "zips/iris.zip", archive.read_bytes())
    await add_entry(
        puller,
        settings,
        "s3",
        {
            "type": "s3",
            "endpoint_url": moto_s3.endpoint_url,
            "access_key_id": "key-id",
            "secret_access_key": "secret",
            "bucket": bucket,
        },
    )
    local = await puller.pull(request("iris__isvc-29", "zips/iris.zip", storage_key="s3"))
    assert local.path == settings.root_model_dir / "iris__isvc-29" / "iris"
    assert tree(local.path) == ARCHIVED
    assert local.disk_size_bytes == sum(len(d) for d in ARCHIVED.values())


def test_archive_model_names_and_the_unpack_switch() -> None:
    assert archive_model_name("mnist.tar.gz") == "mnist"
    assert archive_model_name("mnist.TGZ") == "mnist"
    assert archive_model_name("v1.2.tar") == "v1.2"
    assert archive_model_name("m.zip") == "m"
    assert archive_model_name(".zip") == "_model"
    assert archive_model_name("_schema.json.zip") == "_model"
    assert unpack_enabled(StorageConfig(type="s3"))
    assert unpack_enabled(StorageConfig(type="s3", fields={"unpack": "true"}))
    for off in (False, "false", "FALSE", "0", "no", "off"):
        assert not unpack_enabled(StorageConfig(type="s3", fields={"unpack": off}))
