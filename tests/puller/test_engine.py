"""The pull engine over an in-memory store that can misbehave on purpose."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter.errors import (
    DiskFull,
    IntegrityError,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
    UnsafePath,
)
from adapter.settings import Settings
from puller.config import StorageConfig
from puller.engine import FetchCancelled, FetchStats, PullEngine, checksum_verifier
from puller.storage.base import Blob, Plan, Storage
from tests.puller.conftest import make_settings


class MemoryStream:
    """Serves ``data[start:end]``; can stop early or fail after some bytes."""

    def __init__(
        self,
        store: MemoryStorage,
        data: bytes,
        start: int,
        end: int,
        stop_at: int | None,
        fail_at: int | None,
    ) -> None:
        self.store = store
        self.data = data
        self.pos = start
        self.end = end
        self.stop_at = stop_at
        self.fail_at = fail_at

    def readinto(self, buffer: memoryview) -> int:
        if self.store.chunk_delay:
            time.sleep(self.store.chunk_delay)
        limit = min(self.end, len(self.data))
        if self.stop_at is not None:
            limit = min(limit, self.stop_at)
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise StorageUnavailable("connection reset (injected)")
        if self.fail_at is not None:
            limit = min(limit, self.fail_at)
        count = min(len(buffer), limit - self.pos)
        if count <= 0:
            return 0
        buffer[:count] = self.data[self.pos : self.pos + count]
        self.pos += count
        with self.store.lock:
            self.store.bytes_served += count
        return count

    def close(self) -> None:
        with self.store.lock:
            self.store.open_streams -= 1


class MemoryStorage(Storage):
    """Objects held in memory. ``faults[(name, start)]`` lists what the successive
    attempts at a range do: ``"unavailable"`` (fails on open), ``"reset"`` (fails after
    half the range), ``"short"`` (ends early, cleanly), ``"missing"`` (not found)."""

    def __init__(self, settings: Settings, objects: dict[str, bytes]) -> None:
        super().__init__(StorageConfig(type="memory"), settings)
        self.objects = objects
        self.faults: dict[tuple[str, int], list[str]] = {}
        self.opened: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()
        self.open_streams = 0
        self.bytes_served = 0
        self.chunk_delay = 0.0
        self.announced: dict[str, int] = {}

    def plan(self, path: str) -> Plan:
        blobs = tuple(
            Blob(name=name, relpath=name, size=self.announced.get(name, len(data)))
            for name, data in sorted(self.objects.items())
        )
        return Plan(blobs=blobs, single_object=False)

    def open_range(self, blob: Blob, start: int, end: int) -> MemoryStream:
        with self.lock:
            self.opened.append((blob.name, start, end))
            queue = self.faults.get((blob.name, start), [])
            fault = queue.pop(0) if queue else None
        if fault == "unavailable":
            raise StorageUnavailable("503 slow down (injected)")
        if fault == "missing":
            raise StorageNotFound(f"{blob.name} vanished (injected)")
        data = self.objects[blob.name]
        stop_at = start + (end - start) // 2 if fault == "short" else None
        fail_at = start + (end - start) // 2 if fault == "reset" else None
        with self.lock:
            self.open_streams += 1
        return MemoryStream(self, data, start, end, stop_at, fail_at)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def engine_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, pull_part_bytes=256 * 1024, pull_workers=4, pull_retries=3)


@pytest.fixture
def engine(engine_settings: Settings) -> Iterator[PullEngine]:
    eng = PullEngine(engine_settings, buffer_bytes=64 * 1024)
    yield eng
    eng.close()


def fetch(engine: PullEngine, store: MemoryStorage, dest: Path, plan: Plan | None = None) -> FetchStats:
    return engine.fetch(store, plan or store.plan(""), dest, threading.Event())


def test_many_files_and_ranges_with_transient_failures(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path
) -> None:
    part = engine_settings.pull_part_bytes
    big = os.urandom(5 * part + 12345)
    objects = {
        "weights.bin": big,
        "config.json": b'{"a": 1}',
        "nested/deeper/vocab.txt": os.urandom(70_000),
        "empty.txt": b"",
    }
    store = MemoryStorage(engine_settings, objects)
    store.faults[("weights.bin", part)] = ["unavailable"]
    store.faults[("weights.bin", 3 * part)] = ["reset"]
    store.faults[("weights.bin", 5 * part)] = ["short"]
    store.faults[("weights.bin", 2 * part)] = ["unavailable", "unavailable"]
    store.faults[("config.json", 0)] = ["reset"]
    dest = tmp_path / "out"

    stats = fetch(engine, store, dest)

    for name, data in objects.items():
        assert sha256((dest / name).read_bytes()) == sha256(data), name
    assert stats.bytes == sum(len(d) for d in objects.values())
    assert stats.files == 4
    starts = Counter((name, start) for name, start, _ in store.opened)
    # the large file was split into parts, each part asked once unless it failed
    assert {s for (n, s) in starts if n == "weights.bin"} >= {i * part for i in range(6)}
    assert starts[("weights.bin", 0)] == 1
    assert starts[("weights.bin", part)] == 2
    assert starts[("weights.bin", 2 * part)] == 3
    # a short read is retried from where the stream ended
    assert ("weights.bin", 5 * part + 12345 // 2) in starts
    # after a reset the retry resumes where the bytes stopped, it does not restart
    resumed = [(s, e) for n, s, e in store.opened if n == "weights.bin" and 3 * part < s < 4 * part]
    assert resumed == [(3 * part + part // 2, 4 * part)]
    assert ("empty.txt", 0) not in starts, "an empty file needs no read"
    assert (dest / "empty.txt").stat().st_size == 0
    assert store.open_streams == 0


def test_a_single_file_in_one_range(engine: PullEngine, engine_settings: Settings, tmp_path: Path) -> None:
    data = os.urandom(1000)
    store = MemoryStorage(engine_settings, {"m.bin": data})
    fetch(engine, store, tmp_path / "out")
    assert (tmp_path / "out" / "m.bin").read_bytes() == data
    assert store.opened == [("m.bin", 0, 1000)]


def test_retries_are_bounded(engine: PullEngine, engine_settings: Settings, tmp_path: Path) -> None:
    store = MemoryStorage(engine_settings, {"m.bin": b"x" * 100})
    store.faults[("m.bin", 0)] = ["unavailable"] * 10
    with pytest.raises(StorageUnavailable):
        fetch(engine, store, tmp_path / "out")
    assert len(store.opened) == engine_settings.pull_retries


def test_a_persistent_short_read_is_an_integrity_error(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path
) -> None:
    store = MemoryStorage(engine_settings, {"m.bin": b"x" * 100})
    store.announced["m.bin"] = 150  # the store announces more than it has
    with pytest.raises(IntegrityError, match="shorter than the 150 bytes"):
        fetch(engine, store, tmp_path / "out")
    assert len(store.opened) == engine_settings.pull_retries


def test_a_fatal_error_is_not_retried(engine: PullEngine, engine_settings: Settings, tmp_path: Path) -> None:
    store = MemoryStorage(engine_settings, {"a.bin": b"a" * 10, "b.bin": b"b" * 10})
    store.faults[("b.bin", 0)] = ["missing"]
    with pytest.raises(StorageNotFound):
        fetch(engine, store, tmp_path / "out")
    assert [o for o in store.opened if o[0] == "b.bin"] == [("b.bin", 0, 10)]


def test_a_file_that_ends_up_with_the_wrong_size_is_refused(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(5000)
    store = MemoryStorage(engine_settings, {"m.bin": data})
    real_open_range = store.open_range

    def open_and_grow(blob: Blob, start: int, end: int) -> MemoryStream:
        # something else appends to the file while it is being fetched
        with (tmp_path / "out" / "m.bin").open("ab") as handle:
            handle.write(b"extra")
        return real_open_range(blob, start, end)

    monkeypatch.setattr(store, "open_range", open_and_grow)
    with pytest.raises(IntegrityError, match="5005 bytes"):
        fetch(engine, store, tmp_path / "out")


def test_checksums_are_verified_while_streaming(engine_settings: Settings, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    engine = PullEngine(engine_settings, verifier_for=checksum_verifier)
    try:
        store = MemoryStorage(engine_settings, {"m.bin": data})
        good = Plan(
            blobs=(Blob("m.bin", "m.bin", len(data), checksums={"sha256": sha256(data)}),),
            single_object=False,
        )
        engine.fetch(store, good, tmp_path / "ok", threading.Event())
        assert (tmp_path / "ok" / "m.bin").read_bytes() == data
        # a retried range still feeds the hash in order
        store.faults[("m.bin", 0)] = ["reset"]
        engine.fetch(store, good, tmp_path / "ok2", threading.Event())
        bad = Plan(
            blobs=(Blob("m.bin", "m.bin", len(data), checksums={"sha256": "0" * 64}),), single_object=False
        )
        with pytest.raises(IntegrityError, match="sha256"):
            engine.fetch(store, bad, tmp_path / "bad", threading.Event())
    finally:
        engine.close()


def test_unsafe_names_are_refused_before_anything_is_written(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path
) -> None:
    store = MemoryStorage(engine_settings, {"ok.txt": b"ok", "../evil.txt": b"evil"})
    with pytest.raises(UnsafePath, match="evil"):
        fetch(engine, store, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert store.opened == []


def test_a_name_that_is_both_file_and_folder_is_refused(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path
) -> None:
    store = MemoryStorage(engine_settings, {"a": b"1", "a/b": b"2"})
    with pytest.raises(StorageError, match="both a file and a folder"):
        fetch(engine, store, tmp_path / "out")
    dup = Plan(blobs=(Blob("x", "same", 1), Blob("y", "./same", 1)), single_object=False)
    with pytest.raises(StorageError, match="same file"):
        fetch(engine, store, tmp_path / "out2", dup)


def test_cancel_stops_the_fetch_promptly(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path
) -> None:
    part = engine_settings.pull_part_bytes
    store = MemoryStorage(engine_settings, {f"f{i}.bin": os.urandom(4 * part) for i in range(4)})
    store.chunk_delay = 0.02  # 64 KiB every 20 ms per worker: the whole fetch would take ~1.3 s
    cancel = threading.Event()
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(engine.fetch(store, store.plan(""), tmp_path / "out", cancel))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 10
    while store.bytes_served == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    cancelled_at = time.monotonic()
    cancel.set()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert time.monotonic() - cancelled_at < 0.5
    assert len(outcome) == 1
    assert isinstance(outcome[0], FetchCancelled)
    assert store.open_streams == 0, "every stream is closed when fetch returns"
    assert store.bytes_served < 16 * part


def test_a_cancel_while_backing_off_stops_the_wait(engine_settings: Settings, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, pull_retries=10)
    engine = PullEngine(settings)
    try:
        store = MemoryStorage(engine_settings, {"m.bin": b"x" * 10})
        store.faults[("m.bin", 0)] = ["unavailable"] * 20
        cancel = threading.Event()
        cancelled_at: list[float] = []

        def cancel_now() -> None:
            cancelled_at.append(time.monotonic())
            cancel.set()

        # by 0.7 s the range is in its third or fourth backoff (0.4-0.8 s long)
        timer = threading.Timer(0.7, cancel_now)
        timer.start()
        with pytest.raises(FetchCancelled):
            engine.fetch(store, store.plan(""), tmp_path / "out", cancel)
        assert time.monotonic() - cancelled_at[0] < 0.2
        assert 2 <= len(store.opened) <= 4
        timer.join()
    finally:
        engine.close()


def test_no_space_left_is_disk_full(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a real ENOSPC needs a tiny filesystem (a mount, i.e. privileges): the write is
    # made to fail the way the kernel would fail it
    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    store = MemoryStorage(engine_settings, {"m.bin": b"x" * 1000})
    with pytest.raises(DiskFull, match="no space"):
        fetch(engine, store, tmp_path / "out")
    assert len(store.opened) == 1, "a full disk is not retried"


def test_two_fetches_share_the_pool(engine: PullEngine, engine_settings: Settings, tmp_path: Path) -> None:
    a = MemoryStorage(engine_settings, {"a.bin": os.urandom(600_000)})
    b = MemoryStorage(engine_settings, {"b.bin": os.urandom(600_000)})
    results: dict[str, object] = {}

    def run(name: str, store: MemoryStorage) -> None:
        results[name] = fetch(engine, store, tmp_path / name)

    threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert (tmp_path / "a" / "a.bin").read_bytes() == a.objects["a.bin"]
    assert (tmp_path / "b" / "b.bin").read_bytes() == b.objects["b.bin"]


def test_close_stops_a_running_fetch(engine_settings: Settings, tmp_path: Path) -> None:
    part = engine_settings.pull_part_bytes
    engine = PullEngine(engine_settings)
    store = MemoryStorage(engine_settings, {f"f{i}.bin": os.urandom(4 * part) for i in range(4)})
    store.chunk_delay = 0.02
    outcome: list[BaseException | FetchStats] = []

    def run() -> None:
        try:
            outcome.append(engine.fetch(store, store.plan(""), tmp_path / "out", threading.Event()))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 10
    while store.bytes_served == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    engine.close()
    worker.join(timeout=10)
    assert not worker.is_alive(), "a fetch must not outlive its engine"
    assert len(outcome) == 1
    assert isinstance(outcome[0], FetchCancelled)
    with pytest.raises(FetchCancelled):
        engine.fetch(store, store.plan(""), tmp_path / "after", threading.Event())
