"""A keyed work queue: informer handlers enqueue keys, a few workers reconcile them.

Handlers stay fast (watch streams are never held up by API calls), a key
queued many times while waiting is processed once, and a key is never worked
on by two workers at once. A failed reconcile is retried with back-off.
:class:`KeyedLocks` gives the same one-at-a-time rule to message handlers,
which a consumer runs many at once. :func:`for_each` runs a pass over many
keys (a resync) a bounded number at a time. :func:`cancel_all` stops tasks
for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


YIELD_EVERY = 50  # items a for_each worker handles between two turns of the event loop


async def for_each(items: Iterable[T], action: Callable[[T], Awaitable[None]], limit: int, what: str) -> None:
    """Run ``action`` on every item, ``limit`` at a time; one that fails is logged and the others go on.

    Each worker lets the event loop run every few items, so thousands of items that need nothing
    (most of a resync) never hold up the handlers of new work.
    """
    pending = iter(items)

    async def worker() -> None:
        for done, item in enumerate(pending, 1):  # shared: each item goes to the first free worker
            try:
                await action(item)
            except Exception as exc:
                log.warning("%s failed: %s", what, exc)
            if done % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(limit)))


async def cancel_all(tasks: list[asyncio.Task[None]], again_after: float = 1.0) -> None:
    """Cancel ``tasks`` and wait until all have ended, cancelling again those that go on: a
    cancellation can be lost (Python 3.11's ``asyncio.wait_for`` returns the result of what it awaits
    when that finishes as the cancellation arrives), and one task going on would hold up a
    recomposition for ever."""
    for task in tasks:
        task.cancel()
    pending = {task for task in tasks if not task.done()}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=again_after)
        for task in pending:
            log.warning("task %s went on after it was cancelled; cancelling it again", task.get_name())
            task.cancel()
    for task in tasks:  # their failures were theirs to log; taken here so asyncio does not report them again
        if not task.cancelled():
            task.exception()


class WorkQueue(Generic[K]):
    def __init__(self, name: str, reconcile: Callable[[K], Awaitable[None]], workers: int = 8) -> None:
        self.name, self.reconcile, self.workers = name, reconcile, workers
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._again: set[K] = set()
        self._failures: dict[K, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, key: K) -> None:
        if key in self._active:
            self._again.add(key)  # changed while being worked on: once more afterwards
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Add ``key`` in ``delay`` seconds (an :meth:`add` meanwhile is not held back)."""
        asyncio.get_running_loop().call_later(delay, self.add, key)

    def __len__(self) -> int:
        return len(self._queued)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"{self.name} worker {i}") for i in range(self.workers)]

    async def stop(self) -> None:
        await cancel_all(self._tasks)

    async def _retry_later(self, key: K) -> None:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        await asyncio.sleep(min(0.2 * 2 ** min(failures, 8), 30))  # (2**1024 would overflow a float)
        self.add(key)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            try:
                await self.reconcile(key)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: reconciling %s failed (%s); retrying", self.name, key, exc)
                asyncio.get_running_loop().create_task(self._retry_later(key))
            finally:
                self._active.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.add(key)


class KeyedLocks(Generic[K]):
    """One lock per key, kept only while someone holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[K, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
