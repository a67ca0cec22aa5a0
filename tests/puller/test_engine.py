"""The pull engine over an in-memory store that can misbehave on purpose."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from adapter.errors import (
    DiskFull,
    IntegrityError,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
    UnsafePath,
)
from adapter.settings import Settings
from puller import checksums, file_writes
from puller.checksums import crc_hex
from puller.config import StorageConfig
from puller.engine import FetchCancelled, FetchStats, PullEngine, blob_label
from puller.storage.base import Blob, Plan, Storage
from puller.storage.s3 import S3Storage
from tests.puller.conftest import make_settings
from tests.servers.s3 import MotoS3Server


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
        delay: float = 0.0,
        flip_at: int | None = None,
    ) -> None:
        self.store = store
        self.data = data
        self.pos = start
        self.end = end
        self.stop_at = stop_at
        self.fail_at = fail_at
        self.delay = delay
        self.flip_at = flip_at

    def readinto(self, buffer: memoryview) -> int:
        if self.store.chunk_delay or self.delay:
            time.sleep(self.store.chunk_delay + self.delay)
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
        if self.flip_at is not None and self.pos <= self.flip_at < self.pos + count:
            buffer[self.flip_at - self.pos] ^= 0x01  # one bit flipped in transit
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
    half the range), ``"short"`` (ends early, cleanly), ``"missing"`` (not found).
    ``corrupt[name] = [offset, ...]``: the next streams that cover an offset deliver
    that byte with a bit flipped (one entry used up per stream); ``range_delay`` slows
    every chunk of the streams opened at ``(name, start)``; ``checksums[name]`` is
    announced in the plan."""

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
        self.corrupt: dict[str, list[int]] = {}
        self.range_delay: dict[tuple[str, int], float] = {}
        self.checksums: dict[str, dict[str, str]] = {}

    def plan(self, path: str) -> Plan:
        blobs = tuple(
            Blob(
                name=name,
                relpath=name,
                size=self.announced.get(name, len(data)),
                checksums=self.checksums.get(name, {}),
            )
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
        flip_at = None
        with self.lock:
            self.open_streams += 1
            pending = self.corrupt.get(blob.name, [])
            for offset in pending:
                if start <= offset < end:
                    pending.remove(offset)
                    flip_at = offset
                    break
        delay = self.range_delay.get((blob.name, start), 0.0)
        return MemoryStream(self, data, start, end, stop_at, fail_at, delay, flip_at)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def engine_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, pull_part_bytes=256 * 1024, pull_workers=4, pull_retries=3)


@pytest.fixture
def engine(engine_settings: Settings) -> Iterator[PullEngine]:
    # every blob reserved, however small, so the reservation tests can use small ones
    eng = PullEngine(engine_settings, buffer_bytes=64 * 1024, reserve_min_bytes=0)
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
        # something else appends to the file while it is being fetched: after its
        # bytes were written, when the stream is closed
        stream = real_open_range(blob, start, end)
        close = stream.close

        def close_and_grow() -> None:
            close()
            with (tmp_path / "out" / "m.bin").open("ab") as handle:
                handle.write(b"extra")

        stream.close = close_and_grow  # type: ignore[method-assign]
        return stream

    monkeypatch.setattr(store, "open_range", open_and_grow)
    with pytest.raises(IntegrityError, match="5005 bytes"):
        fetch(engine, store, tmp_path / "out")


def test_checksums_are_verified_while_streaming(engine_settings: Settings, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    engine = PullEngine(engine_settings)
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


# --- checksums while streaming ----------------------------------------------------------


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def crc32c_hex(data: bytes) -> str:
    google_crc32c = pytest.importorskip("google_crc32c")
    return crc_hex(google_crc32c.value(data))


class ProgressCounter:
    """A thread-safe progress callback, as the engine's contract asks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total = 0
        self.calls = 0
        self.threads: set[str] = set()

    def __call__(self, count: int) -> None:
        with self.lock:
            self.total += count
            self.calls += 1
            self.threads.add(threading.current_thread().name)


def opened_ranges(store: MemoryStorage, name: str) -> Counter[tuple[int, int]]:
    return Counter((start, end) for n, start, end in store.opened if n == name)


@pytest.mark.parametrize("algorithm", ["crc32c", "crc32"])
def test_a_crc_is_verified_across_parallel_ranges(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path, algorithm: str
) -> None:
    part = engine_settings.pull_part_bytes
    data = os.urandom(6 * part + 4321)
    announced = crc32c_hex(data) if algorithm == "crc32c" else crc_hex(zlib.crc32(data))
    store = MemoryStorage(engine_settings, {"w.bin": data})
    store.checksums["w.bin"] = {algorithm: announced, "md5": md5(data)}
    store.faults[("w.bin", 2 * part)] = ["reset"]  # a resumed range keeps its CRC right
    store.range_delay[("w.bin", 0)] = 0.01  # the first range arrives last
    fetch(engine, store, tmp_path / "ok")
    assert (tmp_path / "ok" / "w.bin").read_bytes() == data
    assert len(opened_ranges(store, "w.bin")) >= 7, "a CRC keeps the ranges parallel"

    # one flipped bit in the middle of one range, on every serve: fetched twice, refused
    store.opened.clear()
    store.corrupt["w.bin"] = [3 * part + 100, 3 * part + 100]
    with pytest.raises(IntegrityError, match=rf"blob 'w.bin': {algorithm} is [0-9a-f]{{8}}.*fetched twice"):
        fetch(engine, store, tmp_path / "bad")
    assert opened_ranges(store, "w.bin")[(0, part)] == 2, "the whole blob was fetched again, once"


def test_a_corruption_that_goes_away_is_healed_by_the_second_fetch(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path
) -> None:
    part = engine_settings.pull_part_bytes
    data = os.urandom(3 * part)
    store = MemoryStorage(engine_settings, {"w.bin": data, "other.bin": b"fine"})
    store.checksums["w.bin"] = {"crc32c": crc32c_hex(data)}
    store.corrupt["w.bin"] = [part + 5]  # only the first serve is bad
    progress = ProgressCounter()
    with capture_logs() as logs:
        stats = engine.fetch(store, store.plan(""), tmp_path / "out", threading.Event(), progress=progress)
    assert (tmp_path / "out" / "w.bin").read_bytes() == data
    assert stats.bytes == len(data) + 4
    assert progress.total == 2 * len(data) + 4, "a re-fetched blob counts again"
    assert opened_ranges(store, "other.bin")[(0, 4)] == 1
    assert [e["blob"] for e in logs if e["event"] == "checksum mismatch, fetching the blob again"] == [
        "w.bin"
    ]


def test_a_digest_on_a_small_blob_streams_in_one_range(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = engine_settings.pull_part_bytes
    data = os.urandom(3 * part + 99)  # several parts, under the single-stream threshold
    store = MemoryStorage(engine_settings, {"m.bin": data})
    store.checksums["m.bin"] = {"md5": md5(data)}
    store.faults[("m.bin", 0)] = ["reset"]  # the resumed stream still hashes in order
    reads_back = count_reads_back(monkeypatch)
    fetch(engine, store, tmp_path / "out")
    assert (tmp_path / "out" / "m.bin").read_bytes() == data
    assert [(s, e) for n, s, e in store.opened] == [(0, len(data)), (len(data) // 2, len(data))]
    assert reads_back == [], "a single stream is never read back"


def count_reads_back(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the byte count of every read-back the engine makes (os.preadv)."""
    reads: list[int] = []
    real_preadv = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = real_preadv(fd, buffers, offset)
        reads.append(got)
        return got

    monkeypatch.setattr(os, "preadv", preadv)
    return reads


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_a_digest_on_a_large_blob_follows_the_frontier(
    engine_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    part = engine_settings.pull_part_bytes
    data = os.urandom(8 * part + 777)
    engine = PullEngine(engine_settings, buffer_bytes=64 * 1024, single_stream_hash_bytes=part)
    try:
        store = MemoryStorage(engine_settings, {"big.bin": data})
        store.checksums["big.bin"] = {algorithm: hashlib.new(algorithm, data).hexdigest()}
        store.range_delay[("big.bin", 0)] = 0.01  # the first range lags: the rest runs ahead
        store.faults[("big.bin", 5 * part)] = ["reset"]
        reads_back = count_reads_back(monkeypatch)
        fetch(engine, store, tmp_path / "ok")
        assert (tmp_path / "ok" / "big.bin").read_bytes() == data
        assert len(opened_ranges(store, "big.bin")) >= 9, "the ranges stay parallel"
        assert 0 < sum(reads_back) < len(data), "bytes that ran ahead were read back, once at most"

        store.opened.clear()
        store.corrupt["big.bin"] = [7 * part + 3, 7 * part + 3]
        with pytest.raises(IntegrityError, match=rf"blob 'big.bin': {algorithm} is .*fetched twice"):
            fetch(engine, store, tmp_path / "bad")
        assert opened_ranges(store, "big.bin")[(0, part)] == 2
    finally:
        engine.close()


def test_ranges_that_arrive_in_order_are_hashed_from_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, pull_part_bytes=64 * 1024, pull_workers=1)
    data = os.urandom(10 * 64 * 1024 + 5)
    engine = PullEngine(settings, single_stream_hash_bytes=0)
    try:
        store = MemoryStorage(settings, {"big.bin": data})
        store.checksums["big.bin"] = {"sha256": sha256(data)}
        reads_back = count_reads_back(monkeypatch)
        fetch(engine, store, tmp_path / "out")
        assert len(opened_ranges(store, "big.bin")) == 11
        assert reads_back == []
    finally:
        engine.close()


def test_the_frontier_survives_many_blobs_and_workers(engine_settings: Settings, tmp_path: Path) -> None:
    part = engine_settings.pull_part_bytes
    engine = PullEngine(engine_settings, buffer_bytes=16 * 1024, single_stream_hash_bytes=0)
    try:
        rng = random.Random(3)
        objects = {f"b{i}.bin": rng.randbytes(rng.randrange(0, 5 * part)) for i in range(12)}
        store = MemoryStorage(engine_settings, objects)
        for name, data in objects.items():
            store.checksums[name] = {"md5": md5(data)}
            for start in range(0, len(data), part):
                store.range_delay[(name, start)] = rng.choice([0.0, 0.0, 0.002])
        for _ in range(3):
            dest = tmp_path / f"out{_}"
            fetch(engine, store, dest)
            for name, data in objects.items():
                assert (dest / name).read_bytes() == data
    finally:
        engine.close()


def test_empty_blobs_are_verified(engine: PullEngine, engine_settings: Settings, tmp_path: Path) -> None:
    store = MemoryStorage(engine_settings, {"e.txt": b"", "f.txt": b""})
    store.checksums["e.txt"] = {"md5": md5(b"")}
    store.checksums["f.txt"] = {"crc32": "00000000"}
    fetch(engine, store, tmp_path / "ok")
    store.checksums["e.txt"] = {"md5": md5(b"x")}
    with pytest.raises(IntegrityError, match=r"e\.txt"):
        fetch(engine, store, tmp_path / "bad")


def test_without_the_crc32c_extension(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = engine_settings.pull_part_bytes
    monkeypatch.setattr(checksums, "FAST_CRC32C", False)
    monkeypatch.setattr(checksums, "PURE_PYTHON_CRC32C_MAX_BYTES", 2 * part)
    small, large = os.urandom(2 * part), os.urandom(3 * part)
    store = MemoryStorage(engine_settings, {"small.bin": small, "large.bin": large})
    store.checksums["small.bin"] = {"crc32c": crc32c_hex(small)}
    store.checksums["large.bin"] = {"crc32c": "0" * 8}  # wrong, but too slow to check here
    with capture_logs() as logs:
        fetch(engine, store, tmp_path / "ok")
    assert (tmp_path / "ok" / "large.bin").read_bytes() == large
    skipped = [e for e in logs if e["event"].startswith("no announced checksum")]
    assert [e["blob"] for e in skipped] == ["large.bin"]
    assert skipped[0]["log_level"] == "debug"
    store.checksums["small.bin"] = {"crc32c": "0" * 8}  # checked in pure Python
    with pytest.raises(IntegrityError, match=r"small\.bin"):
        fetch(engine, store, tmp_path / "bad")


def test_checks_can_be_switched_off(engine_settings: Settings, tmp_path: Path) -> None:
    engine = PullEngine(engine_settings, verify_checksums=False)
    try:
        store = MemoryStorage(engine_settings, {"m.bin": b"data"})
        store.checksums["m.bin"] = {"sha256": "0" * 64}
        fetch(engine, store, tmp_path / "out")
        assert (tmp_path / "out" / "m.bin").read_bytes() == b"data"
    finally:
        engine.close()


def test_an_integrity_error_names_the_blob_not_its_url_query(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path
) -> None:
    url = "https://user:pw@store.example:8443/models/m.bin?sig=SECRET-SIG&se=2030#frag"
    store = MemoryStorage(engine_settings, {url: b"bytes"})
    plan = Plan(blobs=(Blob(url, "m.bin", 5, checksums={"md5": md5(b"other")}),), single_object=False)
    with pytest.raises(IntegrityError) as caught:
        fetch(engine, store, tmp_path / "out", plan)
    message = str(caught.value)
    assert "https://store.example:8443/models/m.bin" in message
    for secret in ("SECRET-SIG", "sig=", "pw", "frag"):
        assert secret not in message
    assert blob_label(Blob("a/b?c.bin", "x", 1)) == "a/b?c.bin", "a key with '?' is not a URL"


def test_progress_counts_every_byte_from_the_workers(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path
) -> None:
    part = engine_settings.pull_part_bytes
    objects = {"a.bin": os.urandom(4 * part + 1), "b.bin": os.urandom(100), "c.bin": b""}
    store = MemoryStorage(engine_settings, objects)
    progress = ProgressCounter()
    engine.fetch(store, store.plan(""), tmp_path / "out", threading.Event(), progress=progress)
    assert progress.total == sum(len(d) for d in objects.values())
    assert progress.calls >= (4 * part) // (64 * 1024)
    assert all(name.startswith("pull") for name in progress.threads)


def test_a_progress_callback_that_raises_fails_the_fetch(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path
) -> None:
    store = MemoryStorage(engine_settings, {"m.bin": b"x" * 10})

    def broken(count: int) -> None:
        raise StorageError("progress sink is broken")

    with pytest.raises(StorageError, match="progress sink"):
        engine.fetch(store, store.plan(""), tmp_path / "out", threading.Event(), progress=broken)


def test_a_cancel_stops_a_read_back(
    engine_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = engine_settings.pull_part_bytes
    data = os.urandom(8 * part)
    engine = PullEngine(engine_settings, buffer_bytes=4096, single_stream_hash_bytes=0)
    cancel = threading.Event()
    real_preadv = os.preadv

    def slow_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        cancel.set()  # cancelled during the first read-back
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", slow_preadv)
    try:
        store = MemoryStorage(engine_settings, {"big.bin": data})
        store.checksums["big.bin"] = {"md5": md5(data)}
        store.range_delay[("big.bin", 0)] = 0.005
        with pytest.raises(FetchCancelled):
            engine.fetch(store, store.plan(""), tmp_path / "out", cancel)
        assert store.open_streams == 0
    finally:
        engine.close()


# --- a real server ----------------------------------------------------------------------


@pytest.mark.integration
def test_checksums_over_s3_on_moto(moto_s3: MotoS3Server, bucket: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, pull_part_bytes=256 * 1024)
    data = os.urandom(5 * 256 * 1024 + 11)
    moto_s3.put_object(bucket, "models/w.bin", data)
    storage = S3Storage(
        StorageConfig(
            type="s3",
            fields={
                "endpoint_url": moto_s3.endpoint_url,
                "access_key_id": "k",
                "secret_access_key": "s",
                "region": "us-east-1",
                "bucket": bucket,
            },
        ),
        settings,
    )
    engine = PullEngine(settings, single_stream_hash_bytes=0)
    try:
        listed = storage.plan("models/w.bin").blobs[0]
        for announced in ({"md5": md5(data)}, {"crc32c": crc32c_hex(data)}, {"sha256": sha256(data)}):
            dest = tmp_path / f"ok-{next(iter(announced))}"
            plan = Plan(blobs=(replace(listed, relpath="w.bin", checksums=announced),), single_object=False)
            engine.fetch(storage, plan, dest, threading.Event())
            assert (dest / "w.bin").read_bytes() == data
        wrong = Plan(
            blobs=(replace(listed, relpath="w.bin", checksums={"md5": md5(data[::-1])}),), single_object=False
        )
        with pytest.raises(IntegrityError, match=r"models/w\.bin"):
            engine.fetch(storage, wrong, tmp_path / "bad", threading.Event())
    finally:
        engine.close()
        storage.close()


# --- the local side: allocation, splicing -------------------------------------------------


def test_a_disk_too_small_fails_before_the_range_is_asked_for(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_writes, "_fallocate", lambda fd, mode, offset, length: errno.ENOSPC)
    store = MemoryStorage(engine_settings, {"m.bin": b"x" * 1000})
    with pytest.raises(DiskFull, match="no space"):
        fetch(engine, store, tmp_path / "out")
    assert store.opened == []


def test_a_small_blob_is_written_without_a_reservation(
    engine_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans: list[tuple[int, int]] = []

    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        spans.append((offset, length))
        return 0

    monkeypatch.setattr(file_writes, "_fallocate", fallocate)
    small, big = os.urandom(4096), os.urandom(engine_settings.pull_part_bytes + 1)
    store = MemoryStorage(engine_settings, {"small.bin": small, "big.bin": big})
    engine = PullEngine(engine_settings, reserve_min_bytes=len(big))
    try:
        fetch(engine, store, tmp_path / "out")
    finally:
        engine.close()
    assert (tmp_path / "out" / "small.bin").read_bytes() == small
    assert (tmp_path / "out" / "big.bin").read_bytes() == big
    assert sorted(spans) == [(0, engine_settings.pull_part_bytes), (engine_settings.pull_part_bytes, 1)]


def test_blocks_are_reserved_a_part_ahead_and_again_before_a_refetch(
    engine: PullEngine, engine_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = engine_settings.pull_part_bytes
    spans: list[tuple[int, int]] = []
    lock = threading.Lock()

    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        with lock:
            spans.append((offset, length))
        return 0

    monkeypatch.setattr(file_writes, "_fallocate", fallocate)
    data = os.urandom(part + 5000)
    one_stream = os.urandom(2 * part + 7)
    store = MemoryStorage(engine_settings, {"w.bin": data, "e.bin": b"", "s.bin": one_stream})
    store.checksums["w.bin"] = {"crc32": crc_hex(zlib.crc32(data))}
    store.checksums["s.bin"] = {"md5": md5(one_stream)}  # fetched as one stream
    store.corrupt["w.bin"] = [part + 10]  # the first serve is bad: the blob is fetched again
    store.faults[("w.bin", 0)] = ["reset"]  # a resumed range reserves what it still needs
    fetch(engine, store, tmp_path / "out")
    assert (tmp_path / "out" / "w.bin").read_bytes() == data
    assert (tmp_path / "out" / "s.bin").read_bytes() == one_stream
    w_spans = {(0, part): 2, (part // 2, part - part // 2): 1, (part, 5000): 2}
    s_spans = {(0, part): 1, (part, part): 1, (2 * part, 7): 1}
    assert Counter(spans) == Counter(w_spans) + Counter(s_spans), "an empty file reserves nothing"
