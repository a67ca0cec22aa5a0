"""Cancelling a pull at once, even while one of its threads waits on a stalled store.

A pull runs in worker threads, which asyncio cannot interrupt: a cancelled pull sets a
:class:`threading.Event` that its threads check between chunks. A thread blocked in a
socket read checks nothing until the read times out (``PULL_TIMEOUT_SECONDS``, 60 s
by default), and the pull waits for its threads before it lets go of its staging
folder, so a store that stops sending would hold a cancelled load (LOADTIME_TIMEOUT,
or the mesh's own cancel) that long, with its model id's turn and a loading slot.

:class:`PullCancel` is that event plus the connections its threads wait on. A thread
runs its storage calls inside :func:`watching`; the byte path
(:mod:`puller.storage.ranged_http`) calls :func:`watch` with each connected socket
before it waits on it; :meth:`PullCancel.set` shuts those sockets down, which ends
the blocked reads at once with a connection error that the caller's cancel check then
turns into the cancellation. A socket still connecting is not watched yet: a cancel
then waits for its connect timeout. A plain ``threading.Event`` watches nothing.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import ParamSpec, Protocol, TypeVar

from adapter.errors import StorageUnavailable

P = ParamSpec("P")
T = TypeVar("T")


class Connection(Protocol):
    """What is watched: an object with a ``sock`` (``http.client.HTTPConnection``)."""

    sock: socket.socket | None


class PullCancel(threading.Event):
    """The cancel event of one pull; :meth:`set` also ends its threads' socket waits."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._watched: dict[int, Connection] = {}

    def set(self) -> None:
        super().set()  # first: a connection watched after this raises in watch()
        with self._lock:
            connections = list(self._watched.values())
        for connection in connections:
            _shut_down(connection)

    def _watch(self, connection: Connection) -> None:
        with self._lock:
            self._watched[id(connection)] = connection
        if self.is_set():
            self._forget([connection])
            raise StorageUnavailable("the pull was cancelled")

    def _forget(self, connections: list[Connection]) -> None:
        with self._lock:
            for connection in connections:
                if self._watched.get(id(connection)) is connection:
                    del self._watched[id(connection)]


class _Scope:
    def __init__(self, cancel: PullCancel) -> None:
        self.cancel = cancel
        self.connections: list[Connection] = []


class _Current(threading.local):
    def __init__(self) -> None:
        self.scope: _Scope | None = None


_current = _Current()


@contextlib.contextmanager
def watching(cancel: threading.Event) -> Iterator[None]:
    """Inside this block, the connections this thread waits on belong to the pull of
    ``cancel``: setting it shuts them down. They are forgotten when the block ends (a
    pool thread serves other pulls next)."""
    if not isinstance(cancel, PullCancel):
        yield
        return
    previous, scope = _current.scope, _Scope(cancel)
    _current.scope = scope
    try:
        yield
    finally:
        _current.scope = previous
        cancel._forget(scope.connections)


def watch(connection: Connection) -> None:
    """Called by the byte path with a connected ``connection`` before it sends a
    request and waits for the answer: from now on a cancel of this thread's pull (see
    :func:`watching`) shuts its socket down. Raises :class:`StorageUnavailable` when
    that pull is cancelled already. Outside :func:`watching` it does nothing."""
    scope = _current.scope
    if scope is None:
        return
    scope.cancel._watch(connection)
    scope.connections.append(connection)


def _shut_down(connection: Connection) -> None:
    """End every wait on the connection's socket (``shutdown``, not ``close``: a
    ``close`` from another thread does not wake a blocked read). The raw socket's
    method, so that a TLS socket's own state is left to its reader."""
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def run_watching(
    cancel: threading.Event, function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """``function(*args, **kwargs)`` inside :func:`watching` ``(cancel)``; for
    ``asyncio.to_thread``, so that a whole thread's storage calls are watched."""
    with watching(cancel):
        return function(*args, **kwargs)
