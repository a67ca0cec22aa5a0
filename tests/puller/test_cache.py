"""The content cache, through the Puller, against S3 on moto: reloads and second ids
served from hard links with no byte read from the store, changed objects fetched
afresh, LRU eviction under a cap that never touches a linked blob, a restart that
finds the cache, half-written entries swept, read-only files."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import stat
import tarfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from adapter.errors import StorageUnavailable
from adapter.settings import Settings
from puller.cache import CACHE_DIR_NAME, ContentCache, cache_key, clone_or_copy, link_or_copy
from puller.config import StorageConfig
from puller.metrics import PullMetrics
from puller.model_key import ModelKey
from puller.pull import Puller
from puller.request import PullRequest
from puller.storage.base import Blob, ByteStream, Plan, Storage
from puller.storage.registry import StorageRegistry
from tests.puller.conftest import make_settings
from tests.servers.s3 import MotoS3Server

pytestmark = pytest.mark.integration

CAP = 10 * 1024 * 1024


class CountingStorage(Storage):
    """Wraps a real backend and counts what reaches the store: listings and byte
    ranges opened. Hides versions and fails reads of one blob when its registry says
    so."""

    def __init__(self, inner: Storage, owner: CountingRegistry) -> None:
        super().__init__(inner.config, inner.settings)
        self.inner = inner
        self.owner = owner
        self.lock = threading.Lock()
        self.plans = 0
        self.ranges: list[str] = []

    def plan(self, path: str) -> Plan:
        with self.lock:
            self.plans += 1
        plan = self.inner.plan(path)
        if self.owner.versions:
            return plan
        return replace(plan, blobs=tuple(replace(b, version=None) for b in plan.blobs))

    def open_range(self, blob: Blob, start: int, end: int) -> ByteStream:
        with self.lock:
            self.ranges.append(blob.name)
        if blob.name == self.owner.fail_blob:
            raise StorageUnavailable(f"refusing to read '{blob.name}'")
        return self.inner.open_range(blob, start, end)

    def identity(self) -> str:
        return self.inner.identity()

    def read_count(self) -> int:
        with self.lock:
            return len(self.ranges)


class CountingRegistry(StorageRegistry):
    """A registry handing out one :class:`CountingStorage` per real backend.
    ``versions = False`` hides the blobs' versions; ``fail_blob`` names a blob whose
    reads fail."""

    def __init__(self) -> None:
        super().__init__()
        self.wrapped: dict[int, CountingStorage] = {}
        self.versions = True
        self.fail_blob: str | None = None

    def get(self, config: StorageConfig, settings: Settings) -> Storage:
        inner = super().get(config, settings)
        return self.wrapped.setdefault(id(inner), CountingStorage(inner, self))

    @property
    def store(self) -> CountingStorage:
        (only,) = self.wrapped.values()
        return only


MODEL = {
    "weights.bin": os.urandom(300_000),
    "config/settings.json": b'{"name": "m"}',
    "empty.txt": b"",
}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cache_files(settings: Settings) -> list[Path]:
    blobs = settings.root_model_dir / CACHE_DIR_NAME / "blobs"
    return sorted(p for p in blobs.rglob("*") if p.is_file() and p.suffix != ".json")


@pytest.fixture
def settings(tmp_path: Path, moto_s3: MotoS3Server, bucket: str) -> Settings:
    settings = make_settings(tmp_path, cache_max_bytes=CAP)
    settings.storage_config_dir.mkdir(parents=True)
    (settings.storage_config_dir / "default").write_text(
        json.dumps(
            {
                "type": "s3",
                "endpoint_url": moto_s3.endpoint_url,
                "access_key_id": "key-id",
                "secret_access_key": "secret",
                "bucket": bucket,
            }
        )
    )
    client = moto_s3.client()  # one client: building one per object is slow
    for rel, data in MODEL.items():
        client.put_object(Bucket=bucket, Key=f"models/m/{rel}", Body=data)
    client.put_object(Bucket=bucket, Key="schemas/m.json", Body=b'{"inputs": []}')
    return settings


@pytest.fixture
def registry() -> Iterator[CountingRegistry]:
    reg = CountingRegistry()
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture
def metrics() -> PullMetrics:
    return PullMetrics()


@pytest.fixture
async def puller(
    settings: Settings, registry: CountingRegistry, metrics: PullMetrics
) -> AsyncIterator[Puller]:
    p = Puller(settings, registry=registry, metrics=metrics)
    await asyncio.to_thread(p.start)
    yield p
    await asyncio.to_thread(p.close)


def request(model_id: str, path: str = "models/m", **key: Any) -> PullRequest:
    return PullRequest(model_id=model_id, model_path=path, model_key=ModelKey.from_mapping(key))


async def test_a_reload_after_unload_reads_nothing_from_the_store(
    puller: Puller, registry: CountingRegistry, metrics: PullMetrics, settings: Settings
) -> None:
    first = await puller.pull(request("m__isvc-1", schema_path="schemas/m.json"))
    store = registry.store
    reads = store.read_count()
    assert reads >= 4  # every blob, the large one in several ranges
    plans = store.plans
    await puller.remove("m__isvc-1")

    with capture_logs() as logs:
        again = await puller.pull(request("m__isvc-1", schema_path="schemas/m.json"))

    assert store.read_count() == reads, "a cached blob was read from the store"
    assert store.plans == plans + 2, "the listing (model and schema) must still go to the store"
    assert again.path == first.path
    assert tree(again.path) == MODEL
    assert again.schema_path is not None
    assert again.schema_path.read_bytes() == b'{"inputs": []}'
    assert again.disk_size_bytes == sum(len(d) for d in MODEL.values())
    # hard links into the cache, read-only
    weights = again.path / "weights.bin"
    assert weights.stat().st_nlink == 2
    assert stat.S_IMODE(weights.stat().st_mode) == 0o444
    assert weights.stat().st_ino in {p.stat().st_ino for p in cache_files(settings)}
    pulled = [e for e in logs if e["event"] == "model pulled"]
    assert len(pulled) == 1
    assert pulled[0]["cache_hits"] == 4
    assert pulled[0]["bytes_from_cache"] == sum(len(d) for d in MODEL.values()) + len(b'{"inputs": []}')
    assert pulled[0]["bytes"] == 0
    assert metrics.value("modelmesh_puller_cache_hits_total") == 4


async def test_the_same_model_under_a_second_id_shares_the_bytes(
    puller: Puller, registry: CountingRegistry, settings: Settings
) -> None:
    a = await puller.pull(request("a__isvc-2"))
    reads = registry.store.read_count()
    b = await puller.pull(request("b__isvc-3"))
    assert registry.store.read_count() == reads
    assert tree(a.path) == tree(b.path) == MODEL
    assert (a.path / "weights.bin").stat().st_ino == (b.path / "weights.bin").stat().st_ino
    assert (a.path / "weights.bin").stat().st_nlink == 3  # the cache and two models
    # removing one model leaves the other whole
    await puller.remove("a__isvc-2")
    assert tree(b.path) == MODEL


async def test_a_changed_object_is_fetched_afresh(
    puller: Puller, registry: CountingRegistry, moto_s3: MotoS3Server, bucket: str
) -> None:
    await puller.pull(request("c__isvc-4"))
    store = registry.store
    store.ranges.clear()
    moto_s3.put_object(bucket, "models/m/config/settings.json", b'{"name": "changed"}')

    local = await puller.pull(request("c__isvc-4"))

    assert store.ranges == ["models/m/config/settings.json"]
    assert tree(local.path) == {**MODEL, "config/settings.json": b'{"name": "changed"}'}
    assert puller.cache is not None
    assert len(puller.cache) == 4  # both versions of settings.json


async def test_blobs_without_a_version_are_not_cached(puller: Puller, registry: CountingRegistry) -> None:
    await puller.pull(request("v__isvc-5"))
    store = registry.store
    registry.versions = False
    store.ranges.clear()
    await puller.remove("v__isvc-5")
    local = await puller.pull(request("v__isvc-5"))
    # every blob with bytes is read again (an empty one needs no read)
    assert sorted(set(store.ranges)) == ["models/m/config/settings.json", "models/m/weights.bin"]
    assert tree(local.path) == MODEL
    assert puller.cache is not None
    assert len(puller.cache) == 3  # only the versioned pull's entries


async def test_a_failed_fetch_adds_nothing(
    puller: Puller, registry: CountingRegistry, settings: Settings
) -> None:
    registry.fail_blob = "models/m/weights.bin"
    with pytest.raises(StorageUnavailable):
        await puller.pull(request("f__isvc-6"))
    assert puller.cache is not None
    assert len(puller.cache) == 0
    assert cache_files(settings) == []
    assert not (settings.root_model_dir / "f__isvc-6").exists()


async def test_eviction_is_lru_and_never_removes_a_linked_blob(
    moto_s3: MotoS3Server, bucket: str, settings: Settings, registry: CountingRegistry
) -> None:
    size = 100_000
    client = moto_s3.client()
    for name in "abcde":
        client.put_object(Bucket=bucket, Key=f"blobs/{name}.bin", Body=os.urandom(size))
    small = replace(settings, cache_max_bytes=350_000)
    puller = Puller(small, registry=registry, metrics=PullMetrics())
    await asyncio.to_thread(puller.start)
    try:
        cache = puller.cache
        assert cache is not None

        def cached(name: str) -> bool:
            blob = next(b for b in registry.store.inner.plan(f"blobs/{name}.bin").blobs)
            return cache_key(registry.store.identity(), blob) in cache

        for name in "abc":
            await puller.pull(request(f"{name}__isvc-7", f"blobs/{name}.bin"))
        for name in "abc":
            await puller.remove(f"{name}__isvc-7")
        await puller.pull(request("a__isvc-7", "blobs/a.bin"))  # a: used again, most recent
        await puller.pull(request("d__isvc-7", "blobs/d.bin"))  # 400 kB > cap: evict b (oldest unused)

        assert [cached(n) for n in "abcd"] == [True, False, True, True]
        assert cache.total_bytes == 300_000

        # everything in use: over the cap, nothing linked is removed
        await puller.pull(request("c__isvc-7", "blobs/c.bin"))
        await puller.pull(request("e__isvc-7", "blobs/e.bin"))
        assert [cached(n) for n in "acde"] == [True, True, True, True]
        assert cache.total_bytes == 400_000
        for name in "acde":
            path = small.root_model_dir / f"{name}__isvc-7" / f"{name}.bin"
            assert path.stat().st_size == size

        # once unused, the next pull's eviction brings it under the cap again
        for name in "acd":
            await puller.remove(f"{name}__isvc-7")
        await puller.pull(request("b__isvc-7", "blobs/b.bin"))
        assert cache.total_bytes <= 350_000
        assert cached("b")
        assert cached("e")
        assert not cached("a")  # least recently used of the unused ones
    finally:
        await asyncio.to_thread(puller.close)


async def test_a_blob_larger_than_the_cap_is_not_cached(
    moto_s3: MotoS3Server, bucket: str, settings: Settings, registry: CountingRegistry
) -> None:
    tiny = replace(settings, cache_max_bytes=1000)
    puller = Puller(tiny, registry=registry, metrics=PullMetrics())
    await asyncio.to_thread(puller.start)
    try:
        local = await puller.pull(request("big__isvc-8"))
        assert tree(local.path) == MODEL
        assert puller.cache is not None
        assert len(puller.cache) == 2  # the small and the empty file
        assert stat.S_IMODE((local.path / "weights.bin").stat().st_mode) != 0o444
    finally:
        await asyncio.to_thread(puller.close)


async def test_a_restart_finds_the_cache(settings: Settings, registry: CountingRegistry) -> None:
    first = Puller(settings, registry=registry, metrics=PullMetrics())
    await asyncio.to_thread(first.start)
    try:
        await first.pull(request("r__isvc-9"))
    finally:
        await asyncio.to_thread(first.close)
    reads = registry.store.read_count()

    metrics = PullMetrics()
    second = Puller(settings, registry=registry, metrics=metrics)
    await asyncio.to_thread(second.start)
    try:
        # the adapter purges every model before its first READY; the cache stays
        assert await asyncio.to_thread(second.purge) == ["r__isvc-9"]
        assert (settings.root_model_dir / CACHE_DIR_NAME).is_dir()
        assert second.cache is not None
        assert len(second.cache) == 3
        assert metrics.value("modelmesh_puller_cache_entries") == 3
        local = await second.pull(request("r__isvc-10"))
        assert registry.store.read_count() == reads
        assert tree(local.path) == MODEL
    finally:
        await asyncio.to_thread(second.close)


async def test_half_written_entries_are_swept_at_start(
    settings: Settings, registry: CountingRegistry, puller: Puller
) -> None:
    local = await puller.pull(request("h__isvc-11"))
    await asyncio.to_thread(puller.close)
    cache_dir = settings.root_model_dir / CACHE_DIR_NAME
    good = cache_files(settings)
    assert len(good) == 3
    # a copy interrupted in tmp/, a blob without metadata, metadata without a blob,
    # metadata that does not describe its blob, a stray file
    (cache_dir / "tmp" / "abc.123").write_bytes(b"half")
    shard = cache_dir / "blobs" / "ff"
    shard.mkdir(exist_ok=True)
    (shard / ("f" * 64)).write_bytes(b"no metadata")
    (shard / ("f" * 63 + "e.json")).write_text("{}")
    victim = good[0]
    meta = victim.with_name(victim.name + ".json")
    description = json.loads(meta.read_text())
    meta.write_text(json.dumps({**description, "size": description["size"] + 1}))
    (cache_dir / "blobs" / "stray").write_bytes(b"?")

    again = Puller(settings, registry=registry, metrics=PullMetrics())
    await asyncio.to_thread(again.start)
    try:
        assert list((cache_dir / "tmp").iterdir()) == []
        assert not (shard / ("f" * 64)).exists()
        assert not (shard / ("f" * 63 + "e.json")).exists()
        assert not (cache_dir / "blobs" / "stray").exists()
        assert not victim.exists()
        assert not meta.exists()
        assert again.cache is not None
        assert len(again.cache) == 2
        assert cache_files(settings) == good[1:]
        # the model placed before is untouched
        assert tree(local.path) == MODEL
    finally:
        await asyncio.to_thread(again.close)


async def test_cached_files_are_read_only(puller: Puller, settings: Settings) -> None:
    local = await puller.pull(request("ro__isvc-12"))
    for path in cache_files(settings):
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
    for path in local.path.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o444


async def test_without_hard_links_the_cache_copies(
    puller: Puller, registry: CountingRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    await puller.pull(request("x__isvc-13"))
    reads = registry.store.read_count()
    await puller.remove("x__isvc-13")

    def no_links(src: Any, dst: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr("puller.cache.os.link", no_links)
    local = await puller.pull(request("x__isvc-13"))
    assert registry.store.read_count() == reads
    assert tree(local.path) == MODEL
    weights = local.path / "weights.bin"
    assert weights.stat().st_nlink == 1
    assert stat.S_IMODE(weights.stat().st_mode) == 0o444


async def test_concurrent_pulls_of_one_model(
    puller: Puller, registry: CountingRegistry, settings: Settings
) -> None:
    models = await asyncio.gather(*(puller.pull(request(f"p{i}__isvc-14")) for i in range(4)))
    for model in models:
        assert tree(model.path) == MODEL
    assert puller.cache is not None
    assert len(puller.cache) == 3
    assert list((settings.root_model_dir / CACHE_DIR_NAME / "tmp").iterdir()) == []
    reads = registry.store.read_count()
    local = await puller.pull(request("p9__isvc-14"))
    assert registry.store.read_count() == reads
    assert tree(local.path) == MODEL


async def test_the_cache_is_off_at_zero(settings: Settings, registry: CountingRegistry) -> None:
    off = replace(settings, cache_max_bytes=0)
    puller = Puller(off, registry=registry, metrics=PullMetrics())
    await asyncio.to_thread(puller.start)
    try:
        assert puller.cache is None
        await puller.pull(request("o__isvc-15"))
        await puller.remove("o__isvc-15")
        reads = registry.store.read_count()
        local = await puller.pull(request("o__isvc-15"))
        assert registry.store.read_count() > reads
        assert tree(local.path) == MODEL
        assert not (off.root_model_dir / CACHE_DIR_NAME).exists()
    finally:
        await asyncio.to_thread(puller.close)


async def test_an_archive_is_cached_as_the_archive(
    puller: Puller, registry: CountingRegistry, moto_s3: MotoS3Server, bucket: str, settings: Settings
) -> None:
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:gz") as archive:
        for rel, data in MODEL.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    moto_s3.put_object(bucket, "archives/m.tar.gz", packed.getvalue())

    first = await puller.pull(request("t__isvc-16", "archives/m.tar.gz"))
    reads = registry.store.read_count()
    await puller.remove("t__isvc-16")
    again = await puller.pull(request("t__isvc-16", "archives/m.tar.gz"))

    assert registry.store.read_count() == reads
    assert again.path == first.path == settings.root_model_dir / "t__isvc-16" / "m"
    assert tree(again.path) == MODEL
    assert again.disk_size_bytes == sum(len(d) for d in MODEL.values())
    # the cache holds the archive; the unpacked tree is the model's own
    assert [p.stat().st_size for p in cache_files(settings)] == [len(packed.getvalue())]
    weights = again.path / "weights.bin"
    assert weights.stat().st_nlink == 1
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644


# --- the helpers, on their own ------------------------------------------------------


def test_cache_keys() -> None:
    blob = Blob(name="a/b", relpath="b", size=3, version='"etag"')
    assert cache_key("s3:x/bkt", blob) == cache_key("s3:x/bkt", replace(blob, relpath="other"))
    assert cache_key("s3:x/bkt", blob) != cache_key("s3:x/other", blob)
    assert cache_key("s3:x/bkt", blob) != cache_key("s3:x/bkt", replace(blob, version='"new"'))
    assert cache_key("s3:x/bkt", blob) != cache_key("s3:x/bkt", replace(blob, name="a/c"))
    assert cache_key("s3:x/bkt", replace(blob, version=None)) is None
    # a lone surrogate (a JSON listing can spell one) is a name like any other
    odd = cache_key("gcs:bkt", replace(blob, name="a/\ud800"))
    assert odd is not None
    assert odd != cache_key("gcs:bkt", replace(blob, name="a/\udc00"))


def test_link_or_copy_and_clone(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(b"bytes" * 1000)
    assert link_or_copy(source, tmp_path / "linked") is True
    assert (tmp_path / "linked").stat().st_ino == source.stat().st_ino
    clone_or_copy(source, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    assert (tmp_path / "copy").stat().st_ino != source.stat().st_ino
    with pytest.raises(FileExistsError):
        clone_or_copy(source, tmp_path / "copy")
    with pytest.raises(FileNotFoundError):
        link_or_copy(tmp_path / "absent", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_a_cache_needs_a_cap(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        ContentCache(tmp_path, 0)
