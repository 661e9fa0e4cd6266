"""Decode ahead, encode behind: the host's work on frames overlaps the model's work on the next chunk.

    for frame in read_ahead(decoded_frames, depth=16): ...       # a thread decodes up to 16 frames ahead
    with WriteBehind(writer.write, depth=16) as behind:          # a thread encodes what the model gave
        behind.put(frame)

Both keep the order and the values (the same output as doing it inline), are bounded (at most `depth` frames
wait), carry the other thread's exception over to the caller, and stop their thread on every path out,
closing the source generator in the thread that runs it. The job's context (its id in the logs) goes with
them.
"""

import contextvars
import queue
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")
POLL_S = 0.1  # how often a blocked thread looks whether it should stop


@dataclass
class _Failed:
    error: BaseException


_END = object()


def read_ahead(source: Generator[T, None, None], depth: int) -> Generator[T, None, None]:
    """Yield `source`'s items, produced by a thread of their own up to `depth` items ahead."""
    slots: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not offer(item):
                    return
            offer(_END)
        except BaseException as error:  # carried over to the consumer, which raises it
            offer(_Failed(error))
        finally:
            source.close()

    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(produce,), name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]  # anything else is one of source's items
    finally:
        stop.set()
        thread.join()


class WriteBehind(Generic[T]):
    """`write` called on every item put, in order, by a thread of its own; at most `depth` items wait."""

    def __init__(self, write: Callable[[T], None], depth: int):
        self._write = write
        self._slots: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._failure: BaseException | None = None
        self._stop = threading.Event()
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._consume,), name="write-behind", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        while True:
            item = self._slots.get()
            if item is _END or self._stop.is_set():
                return
            try:
                self._write(item)  # type: ignore[arg-type]  # only put() fills the queue
            except BaseException as error:
                self._failure = error
                return

    def put(self, item: T) -> None:
        """Queue one item; raises the writer's error as soon as one happened."""
        while True:
            self._raise_failure()
            try:
                self._slots.put(item, timeout=POLL_S)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def __enter__(self) -> "WriteBehind[T]":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Wait for every item to be written (or, after an error, drop the rest); raise the writer's error."""
        if exc_type is not None:
            self._stop.set()
        while self._thread.is_alive():
            try:
                self._slots.put(_END, timeout=POLL_S)
                break
            except queue.Full:
                continue
        self._thread.join()
        if exc_type is None:
            self._raise_failure()
