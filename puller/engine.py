"""The pull engine: fetch every blob of a :class:`Plan` into a local directory.

Written once for every backend. Many blobs are fetched at once and a blob larger than
``PULL_PART_BYTES`` is split into ranges fetched in parallel, all on one thread pool of
``PULL_WORKERS`` threads. Each destination file is created and sized first
(``ftruncate``); a range reserves its blocks where the filesystem can
(:func:`puller.file_writes.reserve`: cheaper writes, and a full disk shows before the
bytes arrive) up to ``PULL_PART_BYTES`` ahead of what it writes (a blob fetched as one
stream too, so a file's blocks still say how far its pull has come); each worker reads
with ``ByteStream.readinto`` into its own reused buffer and writes with ``os.pwrite``
at the range's offset, so no ``bytes`` object is made per chunk.

Ranges are queued in plan order, every range of a blob before the next blob's.

Checks: every range must deliver exactly its byte count (a short read is transient and
retried; one that persists is an :class:`IntegrityError`), and every file must end at
the size the store announced. Transient errors (:class:`StorageUnavailable`) are
retried per range with exponential backoff and jitter, resuming where the range
stopped. ``ENOSPC`` becomes :class:`DiskFull`.

Checksums (``Blob.checksums``) are verified while the bytes stream, over the buffer in
hand; :func:`puller.checksums.choose_checksum` picks the cheapest announced one.

- A **CRC** (crc32c, crc32) is computed per range and the ranges' CRCs are combined in
  order when the last range is in. Parallel ranges stay free; nothing is read twice.
- A **digest** (md5, sha256...) needs the bytes in order. A blob of at most
  ``single_stream_hash_bytes`` (64 MiB by default) whose only checksum is a digest is
  fetched as one stream and hashed chunk by chunk: no re-reading at all. A larger one
  keeps its parallel ranges and is hashed along a *frontier*: the worker whose chunk
  starts exactly where the hash stands feeds it from its buffer; a chunk that lands
  ahead of the frontier is written and left, and when the frontier reaches bytes
  already written, the worker that moved it there reads them back (``preadv`` into its
  buffer) from the page cache the write just filled, until it catches up with a range
  still streaming, which then feeds its own chunks again. A digest's state cannot take
  bytes out of order, and holding early chunks in memory would cost up to workers x
  part size. The read-back runs during the download, never as a pass after it, touches
  memory rather than the disk, and costs a memcpy next to the digest itself (md5 runs
  at 0.8 GB/s on the CI machine kind). Handing a blob's ranges out in order, so that
  workers hash from the buffer in hand and read-back is rare, was measured and is
  slower there: 1.86-1.92 CPU s/GB against 1.75-1.79 for plan order (more threads
  hashing at once, more context switches; ``docs/performance.md``).

A blob whose checksum does not match is fetched again once, whole (its file emptied
first), after the rest of the fetch is done; a second mismatch is an
:class:`IntegrityError` naming the blob (a URL without its query or credentials). The
caller removes its staging directory on that error, as on any other, so nothing is
placed.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import structlog

from adapter.errors import DiskFull, IntegrityError, SidecarError, StorageError, StorageUnavailable
from adapter.settings import Settings
from puller.cancel import watching
from puller.checksums import FAST_CRC32C, Digest, ExpectedChecksum, choose_checksum, crc_hex
from puller.file_writes import pwrite_all, reserve
from puller.placement import safe_join
from puller.storage.base import Blob, ByteStream, Plan, Storage

log = structlog.get_logger(__name__)

#: bytes per worker buffer: big enough to amortise the syscalls, small enough to stay
#: in cache
BUFFER_BYTES = 128 * 1024

#: blobs smaller than this are written without reserving their blocks first
RESERVE_MIN_BYTES = 1024 * 1024

#: a model up to this size and this many parts, read from local files (or one part
#: from anywhere), is copied in the calling thread rather than on the pool
INLINE_MAX_BYTES = 1024 * 1024
INLINE_MAX_PARTS = 64

#: a blob verified by a digest (md5, sha256) up to this size is fetched as one stream
SINGLE_STREAM_HASH_BYTES = 64 * 1024 * 1024

#: called with the byte count of every chunk written (see :meth:`PullEngine.fetch`)
Progress = Callable[[int], None]

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


@dataclass(frozen=True)
class FetchStats:
    """What one fetch moved: bytes written, files created, wall-clock seconds."""

    bytes: int
    files: int
    seconds: float

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def blob_label(blob: Blob) -> str:
    """The blob's name for messages and logs: a URL loses its query, fragment and
    user info (signatures, SAS tokens); any other name is kept as it is."""
    name = blob.name
    if "://" not in name:
        return name
    try:
        parts = urlsplit(name)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
    except ValueError:
        return name.split("?", 1)[0].split("#", 1)[0].rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _Range:
    """Bytes ``[start, end)`` of a blob; ``pos`` is the next byte still needed (every
    byte before it is written), ``crc`` the CRC of ``[start, pos)``."""

    __slots__ = ("crc", "end", "pos", "start", "state")

    def __init__(self, state: _BlobState, start: int, end: int) -> None:
        self.state = state
        self.start = start
        self.end = end
        self.pos = start
        self.crc = 0


class _BlobState:
    """One destination file, its ranges, and where its verification stands.

    ``lock`` guards the counters and the digest frontier: ``hashed`` (bytes fed to the
    digest so far, always a prefix of what is written) and ``hashing`` (a worker is
    feeding it). Invariant while nobody is hashing: the byte at ``hashed`` is not
    written yet (or the blob is fully hashed), so the worker that writes it is the one
    that feeds it.
    """

    def __init__(self, blob: Blob, path: Path, expected: ExpectedChecksum | None, part_size: int) -> None:
        self.blob = blob
        self.path = path
        self.label = blob_label(blob)
        self.expected = expected
        self.part_size = max(1, part_size)
        self.lock = threading.Lock()
        self.ranges: list[_Range] = []
        self.remaining_ranges = 0
        self.written = 0
        self.digest: Digest | None = None
        self.hashed = 0
        self.hashing = False
        self.checked = False
        self.mismatch: str | None = None
        #: the file, open for writing, while the engine keeps it open (see ``close``)
        self.fd: int | None = None
        self.reset()

    def close(self) -> None:
        """Close the file if it was kept open."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def reset(self) -> None:
        """Forget every byte: fresh ranges, counters and digest (before a re-fetch)."""
        size = self.blob.size
        if size == 0:
            self.ranges = [_Range(self, 0, 0)]
        else:
            self.ranges = [
                _Range(self, start, min(start + self.part_size, size))
                for start in range(0, size, self.part_size)
            ]
        self.remaining_ranges = len(self.ranges)
        self.written = 0
        expected = self.expected
        self.digest = expected.new_digest() if expected is not None and not expected.combinable else None
        self.hashed = 0
        self.hashing = False
        self.checked = False
        self.mismatch = None

    def written_end(self) -> int:
        """The end of the written bytes that start at ``hashed`` (``hashed`` itself
        when the next byte is not written yet). Call with ``lock`` held."""
        at = self.hashed
        if at >= self.blob.size:
            return at
        return max(at, self.ranges[at // self.part_size].pos)

    def record_mismatch(self, actual: str) -> None:
        assert self.expected is not None
        self.mismatch = (
            f"blob '{self.label}': {self.expected.algorithm} is {actual}, "
            f"the store announced {self.expected.hexdigest}"
        )


class _Job:
    """One call of :meth:`PullEngine.fetch`: its cancel event and its failure flag."""

    def __init__(
        self, storage: Storage, cancel: threading.Event, closing: threading.Event, progress: Progress | None
    ) -> None:
        self.storage = storage
        self.cancel = cancel
        self.closing = closing
        self.progress = progress
        self.failed = threading.Event()

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
    Call :meth:`close` when done. ``verify_checksums=False`` checks sizes only;
    ``single_stream_hash_bytes`` is the size up to which a blob verified by a digest is
    fetched as one stream (see the module docstring).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        verify_checksums: bool = True,
        single_stream_hash_bytes: int = SINGLE_STREAM_HASH_BYTES,
        buffer_bytes: int = BUFFER_BYTES,
        reserve_min_bytes: int = RESERVE_MIN_BYTES,
    ) -> None:
        self.part_bytes = settings.pull_part_bytes
        self.attempts = settings.pull_retries
        self.workers = settings.pull_workers
        self.buffer_bytes = buffer_bytes
        self.reserve_min_bytes = reserve_min_bytes
        self.verify_checksums = verify_checksums
        self.single_stream_hash_bytes = single_stream_hash_bytes
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

    def fetch(
        self,
        storage: Storage,
        plan: Plan,
        dest: Path,
        cancel: threading.Event,
        progress: Progress | None = None,
    ) -> FetchStats:
        """Write every blob of ``plan`` to ``dest/<blob.relpath>``; blocking.

        ``dest`` is a directory (created when missing). Guarantees on return: every file
        exists with exactly ``blob.size`` bytes, each delivered in full by the store,
        and matching the checksum chosen from ``blob.checksums`` when one can be
        verified (a mismatch re-fetches the blob once). Raises :class:`UnsafePath`
        before writing anything when a relpath is unsafe, :class:`StorageError` when two
        blobs would land on the same path or a file and a folder share a name, the
        backend's error when a read fails for good (after ``pull_retries`` attempts for
        transient ones), :class:`IntegrityError` (short, wrong size, or a checksum
        mismatch twice), :class:`DiskFull`, or :class:`FetchCancelled` soon after
        ``cancel`` is set (checked between chunks and while backing off). On any error,
        every worker of this fetch has stopped before it returns; files already written
        stay (the caller removes its staging directory).

        ``progress``, when given, is called with the byte count of every chunk written
        to disk (a re-fetched blob counts again), from the worker threads, several at
        once: it must be thread-safe, quick (it runs on the data path, every
        ``buffer_bytes`` or less) and must not raise (an exception fails the fetch like
        any other).
        """
        started = time.monotonic()
        targets = self._targets(plan, dest)
        job = _Job(storage, cancel, self._closing, progress)
        job.check()
        try:
            if not dest.is_dir():  # normally the caller's staging folder, there already
                dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _local_error(exc, dest) from exc
        states = self._states(plan, targets)
        # a model copied in this thread keeps its files open from creation to the end
        keep_open = self._runs_inline(job, [part for state in states for part in state.ranges])
        try:
            self._create_files(states, dest, keep_open=keep_open)
            self._run(job, states)
        finally:
            if keep_open:
                for state in states:
                    state.close()
        mismatched = [state for state in states if state.mismatch is not None]
        if mismatched:
            for state in mismatched:
                log.warning(
                    "checksum mismatch, fetching the blob again", blob=state.label, error=state.mismatch
                )
                self._empty(state)
                state.reset()
            self._run(job, mismatched)
            for state in mismatched:
                if state.mismatch is not None:
                    raise IntegrityError(f"{state.mismatch} (fetched twice)")
        for state in states:
            if state.expected is not None and not state.checked:  # pragma: no cover - a bug
                raise IntegrityError(
                    f"blob '{state.label}': its {state.expected.algorithm} was never checked"
                )
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
                raise StorageError(f"two objects land on the same file '{rel}' (from '{blob_label(blob)}')")
            files.add(rel)
        for rel in files:
            for parent in rel.parents:
                if parent in files:
                    raise StorageError(f"'{parent}' is both a file and a folder in this model")
        return targets

    def _expected(self, blob: Blob) -> ExpectedChecksum | None:
        if not self.verify_checksums or not blob.checksums:
            return None
        expected = choose_checksum(blob.checksums, blob.size)
        if expected is None:
            log.debug(
                "no announced checksum can be verified here; checking the size only",
                blob=blob_label(blob),
                announced=sorted(blob.checksums),
                fast_crc32c=FAST_CRC32C,
            )
        return expected

    def _states(self, plan: Plan, targets: list[Path]) -> list[_BlobState]:
        """Every blob's state: its file, its checksum, its ranges."""
        states: list[_BlobState] = []
        for blob, target in zip(plan.blobs, targets, strict=True):
            if blob.size < 0:
                raise StorageError(f"blob '{blob_label(blob)}' has a negative size")
            expected = self._expected(blob)
            part_size = self.part_bytes if blob.ranged else max(blob.size, 1)
            if (
                expected is not None
                and not expected.combinable
                and blob.size <= self.single_stream_hash_bytes
            ):
                part_size = max(blob.size, 1)  # one stream, hashed in order: nothing read back
            states.append(_BlobState(blob, target, expected, part_size))
        return states

    @staticmethod
    def _create_files(states: list[_BlobState], dest: Path, *, keep_open: bool) -> None:
        """Create every blob's file (empty; set to its full size when its ranges are
        written in parallel) and its folders; ``keep_open``: each file stays open for
        its copy (``_BlobState.fd``), the caller closes it."""
        folders = {dest}  # made already
        for state in states:
            target = state.path
            try:
                if target.parent not in folders:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    folders.add(target.parent)
                fd = os.open(
                    target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
                )
                try:
                    if len(state.ranges) > 1:
                        os.ftruncate(fd, state.blob.size)
                except BaseException:
                    os.close(fd)
                    raise
            except OSError as exc:
                raise _local_error(exc, target) from exc
            if keep_open:
                state.fd = fd
            else:
                os.close(fd)

    @staticmethod
    def _empty(state: _BlobState) -> None:
        """Zero a file before its blob is fetched again."""
        try:
            fd = os.open(state.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, state.blob.size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _local_error(exc, state.path) from exc

    def _run(self, job: _Job, states: Sequence[_BlobState]) -> None:
        """Fetch every range of ``states`` on the pool, in plan order, and wait for all
        of them; on any error stop the others, wait until every one has stopped, and
        raise the first real error."""
        parts = [part for state in states for part in state.ranges]
        if self._runs_inline(job, parts):
            for part in parts:
                self._fetch_range(job, part)
            return
        futures: list[Future[None]] = []
        try:
            for part in parts:
                futures.append(self._pool.submit(self._fetch_range, job, part))
        except RuntimeError:  # the pool was shut down meanwhile
            job.failed.set()
            wait(futures)
            raise FetchCancelled("the pull engine is shutting down") from None
        try:
            self._wait(futures, job)
        except BaseException:
            job.failed.set()
            wait(futures)
            raise

    def _runs_inline(self, job: _Job, parts: Sequence[_Range]) -> bool:
        """Whether to copy ``parts`` one after the other in the calling thread: a
        small model that is one part, or read from local files, where handing each part
        to the pool costs more than the copy (the control plane's tiny models). Big
        models always go through the pool, which bounds the streams of all pulls."""
        if sum(part.end - part.pos for part in parts) > INLINE_MAX_BYTES:
            return False
        return len(parts) <= 1 or (job.storage.reads_locally and len(parts) <= INLINE_MAX_PARTS)

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
        for attempt in range(self.attempts):
            job.check()
            try:
                self._copy(job, part)
                break
            except StorageUnavailable as exc:
                job.check()  # a cancel that ended the read is a cancel, not a store error
                if attempt + 1 < self.attempts:
                    job.pause(_backoff(attempt))
                    continue
                if isinstance(exc, ShortRead):
                    raise IntegrityError(
                        f"blob '{state.label}' is shorter than the {state.blob.size} bytes announced: "
                        f"bytes {part.pos}..{part.end} never arrived in {self.attempts} attempts"
                    ) from exc
                raise
        with state.lock:
            state.written += part.pos - part.start
            state.remaining_ranges -= 1
            last = state.remaining_ranges == 0
        if last:
            self._finish(job, state)

    def _copy(self, job: _Job, part: _Range) -> None:
        """Copy ``[part.pos, part.end)`` of the blob into its file, advancing
        ``part.pos`` (and the range's CRC) past every chunk written, so a retry resumes
        where this attempt stopped and the checksum sees every byte once, in order."""
        if part.pos >= part.end:
            return
        state = part.state
        fd = state.fd
        if fd is None:
            try:
                fd = os.open(state.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise _local_error(exc, state.path) from exc
        try:
            reserved = self._reserve(fd, part, part.pos)
            # a cancel of the pull ends a wait on a stalled store at once (puller.cancel)
            with watching(job.cancel):
                stream = job.storage.open_range(state.blob, part.pos, part.end)
                try:
                    self._read(job, part, stream, fd, reserved)
                finally:
                    stream.close()
        finally:
            if fd != state.fd:
                os.close(fd)

    def _reserve(self, fd: int, part: _Range, reserved: int) -> int:
        """When ``part.pos`` has reached ``reserved``, reserve the next
        ``part_bytes`` of the range; return the new end of the reserved bytes. A blob
        smaller than ``reserve_min_bytes`` is not reserved: for a few KiB the
        ``fallocate`` costs more than it saves, and makes deleting the file slower."""
        if part.pos < reserved:
            return reserved
        if part.state.blob.size < self.reserve_min_bytes:
            return part.end
        end = min(part.end, part.pos + self.part_bytes)
        try:
            reserve(fd, part.pos, end - part.pos)
        except OSError as exc:
            raise _local_error(exc, part.state.path) from exc
        return end

    def _read(self, job: _Job, part: _Range, stream: ByteStream, fd: int, reserved: int) -> None:
        """The copy loop, through the worker's buffer (checksums see the bytes in hand)."""
        state = part.state
        expected = state.expected
        crc_update = expected.update if expected is not None else None
        view = self._buffer()
        while part.pos < part.end:
            job.check()
            reserved = self._reserve(fd, part, reserved)
            want = part.end - part.pos
            count = stream.readinto(view[:want] if want < len(view) else view)
            if not count:
                raise _short_read(part)
            at = part.pos
            data = view[:count]
            try:
                pwrite_all(fd, data, at)
            except OSError as exc:
                raise _local_error(exc, state.path) from exc
            if crc_update is not None:
                part.crc = crc_update(part.crc, data)
            part.pos = at + count  # written: from here on a catch-up may read it back
            if state.digest is not None:
                self._hash_chunk(job, state, data, at, view)
            if job.progress is not None:
                job.progress(count)

    # --- digests along the frontier ---------------------------------------------------

    def _hash_chunk(self, job: _Job, state: _BlobState, data: memoryview, at: int, view: memoryview) -> None:
        """Feed ``data`` (bytes ``at..``, just written) to the blob's digest when the
        frontier stands at ``at``; otherwise leave it for whoever reaches it."""
        with state.lock:
            if state.hashing or state.hashed != at:
                return
            state.hashing = True
        try:
            assert state.digest is not None
            state.digest.update(data)
            self._advance(job, state, at + len(data), view)
        except BaseException:
            with state.lock:
                state.hashing = False
            raise

    def _advance(self, job: _Job, state: _BlobState, upto: int, view: memoryview) -> None:
        """Move the frontier to ``upto`` (this thread holds the digest), then feed the
        bytes already written beyond it, read back into ``view``, until the next byte
        is not written yet; release the digest, and verify it when it covers the blob."""
        assert state.digest is not None
        fd: int | None = None
        complete = False
        try:
            while True:
                with state.lock:
                    state.hashed = upto
                    stop = state.written_end()
                    if stop == upto:
                        state.hashing = False
                        complete = upto == state.blob.size and not state.checked
                        if complete:
                            state.checked = True
                        break
                job.check()
                if fd is None:
                    fd = os.open(state.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                want = min(len(view), stop - upto)
                got = os.preadv(fd, [view[:want]], upto)
                if got <= 0:
                    raise IntegrityError(f"blob '{state.label}': bytes written at {upto} cannot be read back")
                state.digest.update(view[:got])
                upto += got
        except OSError as exc:
            raise _local_error(exc, state.path, "reading back") from exc
        finally:
            if fd is not None:
                os.close(fd)
        if complete:
            self._check_digest(state)

    @staticmethod
    def _check_digest(state: _BlobState) -> None:
        assert state.digest is not None and state.expected is not None
        actual = state.digest.hexdigest()
        if actual != state.expected.hexdigest:
            with state.lock:
                state.record_mismatch(actual)

    # --- the end of a blob ------------------------------------------------------------

    def _finish(self, job: _Job, state: _BlobState) -> None:
        """The last range of a blob is in: check the file's size and, for a CRC, the
        ranges' CRCs combined in order (a digest is checked where it completes)."""
        try:
            size = state.path.lstat().st_size
        except OSError as exc:
            raise _local_error(exc, state.path) from exc
        if size != state.blob.size or state.written != state.blob.size:
            raise IntegrityError(
                f"file for blob '{state.label}' has {size} bytes ({state.written} received), "
                f"the store announced {state.blob.size}"
            )
        expected = state.expected
        if expected is None:
            return
        if expected.combine is not None:
            total = 0
            for part in state.ranges:
                total = expected.combine(total, part.crc, part.end - part.start) if part.start else part.crc
            state.checked = True
            actual = crc_hex(total)
            if actual != expected.hexdigest:
                with state.lock:
                    state.record_mismatch(actual)
            return
        with state.lock:  # an empty blob: its digest is complete before any byte
            complete = state.hashed == state.blob.size and not state.hashing and not state.checked
            if complete:
                state.checked = True
        if complete:
            self._check_digest(state)


def _short_read(part: _Range) -> ShortRead:
    return ShortRead(
        f"blob '{part.state.label}': the stream ended at byte {part.pos}, expected bytes up to {part.end}"
    )


def _local_error(exc: OSError, path: Path, doing: str = "writing") -> SidecarError:
    if exc.errno in _DISK_FULL_ERRNOS:
        return DiskFull(f"no space left on the device while writing {path}")
    return StorageError(f"error {doing} {path}: {exc.strerror or exc}")


def _backoff(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential, capped, with half
    of it random (so parallel ranges that failed together do not retry together)."""
    delay = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2.0**attempt)
    jitter: float = random.uniform(0, delay / 2)  # noqa: S311 - jitter, not crypto
    return delay / 2 + jitter
