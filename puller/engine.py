"""The pull engine: fetch every blob of a :class:`Plan` into a local directory.

Written once for every backend. Many blobs are fetched at once and a blob larger than
``PULL_PART_BYTES`` is split into ranges fetched in parallel, all on one thread pool of
``PULL_WORKERS`` threads. Each destination file is created and sized first
(``ftruncate``); each worker reads with ``ByteStream.readinto`` into its own reused
buffer and writes with ``os.pwrite`` at the range's offset, so no ``bytes`` object is
made per chunk.

Checks: every range must deliver exactly its byte count (a short read is transient and
retried; one that persists is an :class:`IntegrityError`), and every file must end at
the size the store announced. Transient errors (:class:`StorageUnavailable`) are
retried per range with exponential backoff and jitter, resuming where the range
stopped. ``ENOSPC`` becomes :class:`DiskFull`.

Checksums: a :data:`VerifierFactory` may give a :class:`BlobVerifier` per blob; it is
fed every chunk in order while streaming (no second pass over the data) and checked at
the end. In-order feeding needs the whole blob in one range, so blobs with a verifier
are verified only when they fit in one part; larger ones are checked by size only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from adapter.errors import DiskFull, IntegrityError, SidecarError, StorageError, StorageUnavailable
from adapter.settings import Settings
from puller.placement import safe_join
from puller.storage.base import Blob, Plan, Storage

#: bytes per worker buffer: big enough to amortise the syscalls, small enough to stay
#: in cache
BUFFER_BYTES = 128 * 1024

_BACKOFF_BASE_SECONDS = 0.2
_BACKOFF_CAP_SECONDS = 5.0
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class FetchCancelled(SidecarError):
    """Raised by :meth:`PullEngine.fetch` when its cancel event was set. The caller
    that set the event (the :class:`~puller.pull.Puller` on ``asyncio`` cancellation)
    translates it back into its own cancellation."""


class ShortRead(StorageUnavailable):
    """A stream ended before its range did. Retried as transient; when every attempt
    ends short the engine raises :class:`IntegrityError` instead."""


class BlobVerifier(Protocol):
    """Checks one blob's bytes while they stream by."""

    def update(self, chunk: memoryview) -> None:
        """Feed the next chunk (chunks arrive in order, from offset 0 to the end)."""

    def verify(self) -> None:
        """Raise :class:`IntegrityError` when the bytes fed do not match."""


#: gives the verifier of a blob, or None when there is nothing to check
VerifierFactory = Callable[[Blob], BlobVerifier | None]


class HashlibVerifier:
    """Compares a ``hashlib`` digest with the hex digest the store announced."""

    def __init__(self, blob: Blob, algorithm: str, expected_hex: str) -> None:
        self._name = blob.name
        self._algorithm = algorithm
        self._expected = expected_hex.lower()
        self._hash = hashlib.new(algorithm)

    def update(self, chunk: memoryview) -> None:
        self._hash.update(chunk)

    def verify(self) -> None:
        actual = self._hash.hexdigest()
        if actual != self._expected:
            raise IntegrityError(
                f"blob '{self._name}': {self._algorithm} is {actual}, the store announced {self._expected}"
            )


def checksum_verifier(blob: Blob) -> BlobVerifier | None:
    """A :data:`VerifierFactory` checking the first ``hashlib`` algorithm found in
    ``blob.checksums`` (sha256 preferred, then sha1, md5); None when there is none."""
    for algorithm in ("sha256", "sha512", "sha1", "md5"):
        expected = blob.checksums.get(algorithm)
        if expected:
            return HashlibVerifier(blob, algorithm, expected)
    return None


@dataclass(frozen=True)
class FetchStats:
    """What one fetch moved: bytes written, files created, wall-clock seconds."""

    bytes: int
    files: int
    seconds: float

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _BlobState:
    """One destination file and what its ranges have delivered so far."""

    blob: Blob
    path: Path
    verifier: BlobVerifier | None
    remaining_ranges: int
    written: int = 0


@dataclass(frozen=True)
class _Range:
    state: _BlobState
    start: int
    end: int


class _Job:
    """One call of :meth:`PullEngine.fetch`: its cancel event and its failure flag."""

    def __init__(self, storage: Storage, cancel: threading.Event, closing: threading.Event) -> None:
        self.storage = storage
        self.cancel = cancel
        self.closing = closing
        self.failed = threading.Event()
        self.lock = threading.Lock()

    def check(self) -> None:
        """Stop this worker when the fetch was cancelled, the engine is closing, or
        another range failed."""
        if self.cancel.is_set():
            raise FetchCancelled("the pull was cancelled")
        if self.closing.is_set():
            raise FetchCancelled("the pull engine is shutting down")
        if self.failed.is_set():
            raise _Abandoned

    def pause(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early when the fetch stops."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.cancel.wait(min(left, 0.05)):
                break
            if self.failed.is_set() or self.closing.is_set():
                break
        self.check()


class _Abandoned(Exception):
    """A range gave up because another range of the same fetch failed first."""


class PullEngine:
    """Fetches plans over one shared pool of ``settings.pull_workers`` threads.

    Thread-safe: several fetches (different models) may run at once and share the pool.
    Call :meth:`close` when done.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        verifier_for: VerifierFactory | None = None,
        buffer_bytes: int = BUFFER_BYTES,
    ) -> None:
        self.part_bytes = settings.pull_part_bytes
        self.attempts = settings.pull_retries
        self.workers = settings.pull_workers
        self.buffer_bytes = buffer_bytes
        self.verifier_for = verifier_for
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="pull")
        self._local = threading.local()
        self._closing = threading.Event()

    def close(self) -> None:
        """Stop the worker threads. A fetch still running ends soon with
        :class:`FetchCancelled` (its queued ranges stop at once, not cancelled in the
        queue: that would leave the fetch waiting for them forever)."""
        self._closing.set()
        self._pool.shutdown(wait=True)

    # --- the fetch --------------------------------------------------------------------

    def fetch(self, storage: Storage, plan: Plan, dest: Path, cancel: threading.Event) -> FetchStats:
        """Write every blob of ``plan`` to ``dest/<blob.relpath>``; blocking.

        ``dest`` is a directory (created when missing). Guarantees on return: every file
        exists with exactly ``blob.size`` bytes, each delivered in full by the store
        (and matching its checksum when a verifier was given). Raises
        :class:`UnsafePath` before writing anything when a relpath is unsafe,
        :class:`StorageError` when two blobs would land on the same path or a file and a
        folder share a name, the backend's error when a read fails for good (after
        ``pull_retries`` attempts for transient ones), :class:`IntegrityError`,
        :class:`DiskFull`, or :class:`FetchCancelled` soon after ``cancel`` is set
        (checked between chunks and while backing off). On any error, every worker of
        this fetch has stopped before it returns; files already written stay (the
        caller removes its staging directory).
        """
        started = time.monotonic()
        targets = self._targets(plan, dest)
        job = _Job(storage, cancel, self._closing)
        job.check()
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _local_error(exc, dest) from exc
        states = self._create_files(plan, targets)
        ranges = [r for state in states for r in self._split(state)]
        futures: list[Future[None]] = []
        try:
            for part in ranges:
                futures.append(self._pool.submit(self._fetch_range, job, part))
        except RuntimeError:  # the pool was shut down meanwhile
            job.failed.set()
            wait(futures)
            raise FetchCancelled("the pull engine is shutting down") from None
        try:
            self._wait(futures, job)
        finally:
            job.failed.set()
            wait(futures)
        return FetchStats(
            bytes=sum(s.written for s in states), files=len(states), seconds=time.monotonic() - started
        )

    @staticmethod
    def _targets(plan: Plan, dest: Path) -> list[Path]:
        """Every blob's destination, all checked before anything is written."""
        targets = [safe_join(dest, blob.relpath) for blob in plan.blobs]
        files: set[PurePosixPath] = set()
        for blob, target in zip(plan.blobs, targets, strict=True):
            rel = PurePosixPath(target.relative_to(dest).as_posix())
            if rel in files:
                raise StorageError(f"two objects land on the same file '{rel}' (from '{blob.name}')")
            files.add(rel)
        for rel in files:
            for parent in rel.parents:
                if parent in files:
                    raise StorageError(f"'{parent}' is both a file and a folder in this model")
        return targets

    def _create_files(self, plan: Plan, targets: list[Path]) -> list[_BlobState]:
        states: list[_BlobState] = []
        for blob, target in zip(plan.blobs, targets, strict=True):
            if blob.size < 0:
                raise StorageError(f"blob '{blob.name}' has a negative size")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(
                    target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
                )
                try:
                    os.ftruncate(fd, blob.size)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise _local_error(exc, target) from exc
            verifier = self.verifier_for(blob) if self.verifier_for is not None else None
            if verifier is not None and blob.size > self.part_bytes:
                verifier = None  # ranges arrive out of order: checked by size only
            parts = max(1, -(-blob.size // self.part_bytes))
            states.append(_BlobState(blob, target, verifier, remaining_ranges=parts))
        return states

    def _split(self, state: _BlobState) -> list[_Range]:
        size = state.blob.size
        if size == 0:
            return [_Range(state, 0, 0)]
        return [
            _Range(state, start, min(start + self.part_bytes, size))
            for start in range(0, size, self.part_bytes)
        ]

    @staticmethod
    def _wait(futures: list[Future[None]], job: _Job) -> None:
        """Wait for every range; raise the first real error (a cancel wins)."""
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [f.exception() for f in done if f.exception() is not None]
        if not errors:
            return
        job.failed.set()
        wait(futures)
        errors = [f.exception() for f in futures if f.exception() is not None]
        for exc in errors:
            if isinstance(exc, FetchCancelled):
                raise exc
        for exc in errors:
            if exc is not None and not isinstance(exc, _Abandoned):
                raise exc
        raise StorageError("the fetch stopped without an error")  # pragma: no cover - unreachable

    # --- one range, in a worker thread ------------------------------------------------

    def _buffer(self) -> memoryview:
        view: memoryview | None = getattr(self._local, "buffer", None)
        if view is None or len(view) != self.buffer_bytes:
            view = memoryview(bytearray(self.buffer_bytes))
            self._local.buffer = view
        return view

    def _fetch_range(self, job: _Job, part: _Range) -> None:
        state = part.state
        cursor = _Cursor(part.start)
        for attempt in range(self.attempts):
            job.check()
            try:
                self._copy(job, part, cursor)
                break
            except StorageUnavailable as exc:
                if attempt + 1 < self.attempts:
                    job.pause(_backoff(attempt))
                    continue
                if isinstance(exc, ShortRead):
                    raise IntegrityError(
                        f"blob '{state.blob.name}' is shorter than the {state.blob.size} bytes announced: "
                        f"bytes {cursor.pos}..{part.end} never arrived in {self.attempts} attempts"
                    ) from exc
                raise
        with job.lock:
            state.written += cursor.pos - part.start
            state.remaining_ranges -= 1
            last = state.remaining_ranges == 0
        if last:
            self._finish(state)

    def _copy(self, job: _Job, part: _Range, cursor: _Cursor) -> None:
        """Copy ``[cursor.pos, part.end)`` of the blob into its file, advancing
        ``cursor.pos`` past every chunk written, so a retry resumes where this attempt
        stopped (and a verifier keeps seeing the bytes in order)."""
        if cursor.pos >= part.end:
            return
        state = part.state
        view = self._buffer()
        stream = job.storage.open_range(state.blob, cursor.pos, part.end)
        try:
            fd = os.open(state.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            stream.close()
            raise _local_error(exc, state.path) from exc
        try:
            while cursor.pos < part.end:
                job.check()
                want = part.end - cursor.pos
                count = stream.readinto(view[:want] if want < len(view) else view)
                if not count:
                    raise ShortRead(
                        f"blob '{state.blob.name}': the stream ended at byte {cursor.pos}, "
                        f"expected bytes up to {part.end}"
                    )
                data = view[:count]
                _pwrite_all(fd, data, cursor.pos, state.path)
                if state.verifier is not None:
                    state.verifier.update(data)
                cursor.pos += count
        finally:
            os.close(fd)
            stream.close()

    def _finish(self, state: _BlobState) -> None:
        """The last range of a blob is in: check the file's size and checksum."""
        try:
            size = state.path.lstat().st_size
        except OSError as exc:
            raise _local_error(exc, state.path) from exc
        if size != state.blob.size or state.written != state.blob.size:
            raise IntegrityError(
                f"file for blob '{state.blob.name}' has {size} bytes ({state.written} received), "
                f"the store announced {state.blob.size}"
            )
        if state.verifier is not None:
            state.verifier.verify()


class _Cursor:
    """The next byte a range still needs."""

    __slots__ = ("pos",)

    def __init__(self, pos: int) -> None:
        self.pos = pos


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    done = 0
    try:
        while done < len(data):
            written = os.pwrite(fd, data[done:] if done else data, offset + done)
            if written <= 0:
                raise DiskFull(f"could not write to {path}")
            done += written
    except OSError as exc:
        raise _local_error(exc, path) from exc


def _local_error(exc: OSError, path: Path) -> SidecarError:
    if exc.errno in _DISK_FULL_ERRNOS:
        return DiskFull(f"no space left on the device while writing {path}")
    return StorageError(f"cannot write {path}: {exc.strerror or exc}")


def _backoff(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential, capped, with half
    of it random (so parallel ranges that failed together do not retry together)."""
    delay = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2.0**attempt)
    jitter: float = random.uniform(0, delay / 2)  # noqa: S311 - jitter, not crypto
    return delay / 2 + jitter
