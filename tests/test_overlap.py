"""Decode ahead and encode behind keep order and values, carry errors over, and never leave a thread behind."""

import threading
import time

import pytest

from seedvr.serving.overlap import WriteBehind, read_ahead


def threads_named(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


def counted(n: int, closed: list[bool], produced: list[int]):
    try:
        for value in range(n):
            produced.append(value)
            yield value
    finally:
        closed.append(True)


def test_read_ahead_yields_everything_in_order_and_runs_ahead():
    closed, produced = [], []
    ahead = read_ahead(counted(100, closed, produced), depth=4)
    assert next(ahead) == 0
    time.sleep(0.2)
    assert 2 <= len(produced) <= 7  # ran ahead, but no further than the bound
    assert list(ahead) == list(range(1, 100)) and closed == [True]
    assert not threads_named("read-ahead")


def test_stopping_early_closes_the_source_in_its_thread_and_ends_the_thread():
    closed, produced = [], []
    ahead = read_ahead(counted(10_000, closed, produced), depth=4)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()
    assert closed == [True] and len(produced) < 20
    assert not threads_named("read-ahead")


def test_an_error_of_the_source_reaches_the_consumer_after_the_items_before_it():
    def failing():
        yield 1
        yield 2
        raise ValueError("decoder died")

    ahead = read_ahead(failing(), depth=8)
    assert next(ahead) == 1 and next(ahead) == 2
    with pytest.raises(ValueError, match="decoder died"):
        next(ahead)
    assert not threads_named("read-ahead")


def test_write_behind_writes_everything_in_order_before_leaving():
    written = []

    def slow_write(item):
        time.sleep(0.001)
        written.append(item)

    with WriteBehind(slow_write, depth=3) as behind:
        for value in range(50):
            behind.put(value)
    assert written == list(range(50))
    assert not threads_named("write-behind")


def test_a_writer_error_is_raised_by_put_or_at_the_end():
    def failing_write(item):
        if item == 5:
            raise OSError("encoder died")

    with pytest.raises(OSError, match="encoder died"):
        with WriteBehind(failing_write, depth=2) as behind:
            for value in range(100):
                behind.put(value)
    assert not threads_named("write-behind")


def test_an_error_of_the_caller_drops_what_waits_and_ends_the_thread():
    written = []
    started = threading.Event()

    def blocking_write(item):
        started.set()
        time.sleep(0.05)
        written.append(item)

    with pytest.raises(KeyError):
        with WriteBehind(blocking_write, depth=10) as behind:
            for value in range(10):
                behind.put(value)
            started.wait(1)
            raise KeyError("the model failed")
    assert len(written) < 10
    assert not threads_named("write-behind")
