"""puller.cancel: a pull's cancel ends its threads' waits on a stalled socket at once.

A socket pair stands in for a store that stopped sending: the reading thread would
block for the whole socket timeout unless the cancel shuts the socket down."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
from collections.abc import Iterator

import pytest

from adapter.errors import StorageUnavailable
from puller.cancel import PullCancel, run_watching, watch, watching

#: the socket timeout of the stalled reads: far longer than any wait of these tests
STALL_SECONDS = 30.0


class _Conn:
    """What the byte path hands to :func:`watch`: an object with a ``sock``."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock


@pytest.fixture
def stalled() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair; the peer sends nothing."""
    ours, peer = socket.socketpair()
    ours.settimeout(STALL_SECONDS)
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()


def _blocked_read(cancel: threading.Event, conn: _Conn, started: threading.Event) -> bytes:
    with watching(cancel):
        watch(conn)
        started.set()
        assert conn.sock is not None
        return conn.sock.recv(1)


def test_a_cancel_ends_a_blocked_read(stalled: tuple[socket.socket, socket.socket]) -> None:
    cancel, started = PullCancel(), threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        read = pool.submit(_blocked_read, cancel, _Conn(stalled[0]), started)
        assert started.wait(10)
        assert not read.done()
        cancel.set()
        # the read ends (an empty read: the socket is shut down), long before its timeout
        assert read.result(timeout=10) == b""
    assert cancel.is_set()


def test_watching_after_the_cancel_refuses_at_once(stalled: tuple[socket.socket, socket.socket]) -> None:
    cancel = PullCancel()
    cancel.set()
    with watching(cancel), pytest.raises(StorageUnavailable, match="cancelled"):
        watch(_Conn(stalled[0]))


def test_connections_are_forgotten_when_the_block_ends(stalled: tuple[socket.socket, socket.socket]) -> None:
    cancel = PullCancel()
    run_watching(cancel, watch, _Conn(stalled[0]))
    cancel.set()  # the thread has moved on: its connection is left alone
    stalled[1].sendall(b"x")
    assert stalled[0].recv(1) == b"x"


def test_a_plain_event_or_no_block_watches_nothing(stalled: tuple[socket.socket, socket.socket]) -> None:
    plain = threading.Event()
    with watching(plain):
        watch(_Conn(stalled[0]))
    watch(_Conn(stalled[0]))  # outside any block
    watch(_Conn(None))  # not connected
    plain.set()
    stalled[1].sendall(b"y")
    assert stalled[0].recv(1) == b"y"
