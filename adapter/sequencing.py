"""Per-model-id ordering of operations.

Every load and unload of one model id takes a *turn* at the moment the request
arrives (synchronously, before any ``await``), and runs only after every earlier turn
of the same id has finished. So the final state of a model always matches the last
call the mesh made, whatever the scheduling of the tasks in between; different ids
never wait for each other.

:func:`run_to_end` is the other half of that order: work a cancelled caller must not
leave running behind the clean-up that follows it (a worker thread writing files).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")


class Turn:
    """One place in the queue of a model id; use as ``async with turn:``."""

    def __init__(self, owner: TurnQueue, key: str, previous: asyncio.Future[None] | None) -> None:
        self._owner = owner
        self._key = key
        self._previous = previous
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def __aenter__(self) -> Turn:
        if self._previous is not None and not self._previous.done():
            try:
                await asyncio.shield(self._previous)
            except asyncio.CancelledError:
                self._release_after_previous()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._finish()

    def abandon(self) -> None:
        """Give the turn up without running (the operation was never started)."""
        self._release_after_previous()

    def _release_after_previous(self) -> None:
        # Our successor must still wait for our predecessor: hand the baton on only
        # once the predecessor is done.
        if self._previous is None or self._previous.done():
            self._finish()
        else:
            self._previous.add_done_callback(lambda _f: self._finish())

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        self._owner._forget(self._key, self.done)


class TurnQueue:
    """FIFO turns per key."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}

    def take(self, key: str) -> Turn:
        """Queue up behind every earlier turn of ``key``; never blocks."""
        turn = Turn(self, key, self._tails.get(key))
        self._tails[key] = turn.done
        return turn

    def busy(self, key: str) -> bool:
        return key in self._tails

    def _forget(self, key: str, done: asyncio.Future[None]) -> None:
        if self._tails.get(key) is done:
            del self._tails[key]


async def run_to_end(future: Awaitable[T], on_cancel: Callable[[], None] | None = None) -> T:
    """Await ``future`` (a thread's work, a clean-up) to its end. If the caller is
    cancelled meanwhile, call ``on_cancel`` once, keep waiting until the work has
    finished (so nothing keeps writing behind our back), then raise
    ``CancelledError``; however often it is cancelled again."""
    task = asyncio.ensure_future(future)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            if not cancelled and on_cancel is not None:
                on_cancel()
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller sees
        raise asyncio.CancelledError
    return task.result()
