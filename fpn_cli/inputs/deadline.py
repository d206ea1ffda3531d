"""Work on a few threads, each item with a deadline: :func:`ordered_map` runs a function over
items a bounded number ahead of the consumer and hands the results back in order;
:func:`bounded` runs one call so.

An item still running when its deadline passes (a read from a hung network mount) is given up:
the consumer gets ``late(item)`` instead, and a fresh thread takes the stuck one's place, which
finishes or hangs on its own. The threads are daemon threads, unlike ThreadPoolExecutor's, which
the interpreter joins at exit: one stuck read would keep the process from ever exiting.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Task(Generic[T, R]):
    __slots__ = ("item", "started", "done", "value", "error", "given_up")

    def __init__(self, item: T) -> None:
        self.item = item
        self.started: float | None = None  # time.monotonic() when a thread began it
        self.done = threading.Event()
        self.value: R | None = None
        self.error: BaseException | None = None
        self.given_up = False  # past its deadline (or no longer wanted): its result is dropped


class DeadlinePool(Generic[T, R]):
    """``workers`` daemon threads running ``fn``; :meth:`result` waits at most ``timeout`` seconds
    from the moment a thread began the item (None: no deadline)."""

    def __init__(self, fn: Callable[[T], R], workers: int, timeout: float | None, name: str) -> None:
        self.fn, self.timeout, self.name = fn, timeout, name
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders a thread's "done" against the consumer's "given up"
        self._live = 0  # threads not given up
        self._spawned = 0
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        self._live += 1
        self._spawned += 1
        threading.Thread(target=self._work, name=f"{self.name}-{self._spawned}", daemon=True).start()

    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            with self._lock:
                if task.given_up:
                    continue
                task.started = time.monotonic()
            try:
                task.value = self.fn(task.item)
            except BaseException as e:  # handed to the consumer, which raises it
                task.error = e
            with self._lock:
                task.done.set()
                if task.given_up:
                    return  # replaced while it ran: the pool has its full count without this thread

    def submit(self, item: T) -> _Task[T, R]:
        task: _Task[T, R] = _Task(item)
        self._queue.put(task)
        return task

    def result(self, task: _Task[T, R]) -> tuple[bool, R | None]:
        """(True, ``fn(item)``), or (False, None) when the item ran past its deadline; an
        exception ``fn`` raised is raised here."""
        while True:
            started = task.started
            if self.timeout is None:
                wait = None
            elif started is None:  # every thread is busy: it starts when one is free
                wait = self.timeout
            else:
                wait = max(0.0, started + self.timeout - time.monotonic())
            if task.done.wait(wait):
                break
            with self._lock:
                if task.done.is_set():
                    break
                if task.started is not None and time.monotonic() - task.started >= self.timeout:
                    task.given_up = True
                    self._live -= 1
                    self._spawn()
                    return False, None
        if task.error is not None:
            raise task.error
        return True, task.value

    def close(self) -> None:
        """No more work: waiting items are dropped, idle threads end, busy ones after their item.
        Nothing is joined (see the module's note)."""
        with self._lock:
            while True:
                try:
                    task = self._queue.get_nowait()
                except queue.Empty:
                    break
                if task is not None:
                    task.given_up = True
            for _ in range(self._live):
                self._queue.put(None)
            self._live = 0


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    lookahead: int,
    timeout: float | None,
    late: Callable[[T], R],
    name: str,
) -> Iterator[R]:
    """``fn(item)`` for each of ``items``, in order, computed on ``workers`` threads at most
    ``lookahead`` items ahead of the consumer; ``late(item)`` for an item that ran more than
    ``timeout`` seconds."""
    pool: DeadlinePool[T, R] = DeadlinePool(fn, workers, timeout, name)
    try:
        it = iter(items)
        pending = collections.deque(pool.submit(item) for item in itertools.islice(it, max(1, lookahead)))
        while pending:
            task = pending.popleft()
            for item in itertools.islice(it, 1):
                pending.append(pool.submit(item))
            in_time, value = pool.result(task)
            yield value if in_time else late(task.item)
    finally:
        pool.close()


def bounded(fn: Callable[[], R], timeout: float | None, name: str) -> tuple[bool, R | None]:
    """(True, ``fn()``), or (False, None) when ``fn`` runs more than ``timeout`` seconds (None: no
    limit); it then goes on alone on its daemon thread. An exception ``fn`` raised is raised here."""
    if timeout is None:
        return True, fn()
    pool: DeadlinePool[None, R] = DeadlinePool(lambda _: fn(), 1, timeout, name)
    try:
        return pool.result(pool.submit(None))
    finally:
        pool.close()
