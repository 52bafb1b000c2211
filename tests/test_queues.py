"""Queue, SimpleQueue and JoinableQueue across processes, under every start method.

The stdlib is the oracle for semantics (ordering, Full/Empty, task_done accounting);
where ferromp differs on purpose (an unpicklable put raises in the caller) the test
says so.
"""

import multiprocessing
import os
import queue
import threading
import time

import pytest

import ferromp

pytestmark = pytest.mark.timeout(60)


def _produce(q, start, n):
    for i in range(start, start + n):
        q.put(i)


def _consume_until_none(q, out):
    got = []
    while True:
        x = q.get()
        if x is None:
            break
        got.append(x)
    out.put(got)


def _joinable_worker(q):
    while True:
        x = q.get()
        q.task_done()
        if x is None:
            break


def test_many_producers_one_consumer_no_loss_no_duplication(start_method):
    q = start_method.Queue()
    out = start_method.SimpleQueue()
    n = 2000
    producers = [start_method.Process(target=_produce, args=(q, k * n, n)) for k in range(3)]
    consumer = start_method.Process(target=_consume_until_none, args=(q, out))
    for p in producers + [consumer]:
        p.start()
    for p in producers:
        p.join()
    q.put(None)
    got = out.get()
    consumer.join()
    assert sorted(got) == list(range(3 * n))
    # Each producer's items arrive in the order it put them.
    for k in range(3):
        mine = [x for x in got if k * n <= x < (k + 1) * n]
        assert mine == sorted(mine)
    assert all(p.exitcode == 0 for p in producers + [consumer])


def test_items_put_before_exit_are_not_lost(start_method):
    # The feeder thread flushes at process exit: a child that puts and exits at once
    # still delivers everything.
    q = start_method.Queue()
    p = start_method.Process(target=_produce, args=(q, 0, 500))
    p.start()
    got = [q.get(timeout=10) for _ in range(500)]
    p.join()
    assert got == list(range(500))


@pytest.mark.parametrize('mod', [ferromp, multiprocessing])
def test_full_empty_and_timeouts(mod):
    q = mod.Queue(maxsize=2)
    q.put(1)
    q.put(2)
    assert q.full()
    with pytest.raises(queue.Full):
        q.put(3, block=False)
    t = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.2)
    assert time.monotonic() - t >= 0.18
    assert q.get() == 1
    assert q.get() == 2
    with pytest.raises(queue.Empty):
        q.get(block=False)
    t = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    assert time.monotonic() - t >= 0.18
    assert q.empty()
    q.close()
    q.join_thread()


@pytest.mark.parametrize('mod', [ferromp, multiprocessing])
def test_closed_queue_raises_value_error(mod):
    q = mod.Queue()
    q.put('x')
    q.close()
    with pytest.raises(ValueError, match='is closed'):
        q.put('y')
    with pytest.raises(ValueError, match='is closed'):
        q.get()
    q.join_thread()


def test_unpicklable_put_raises_in_the_caller_and_queue_stays_usable():
    # The stdlib drops the object in its feeder thread (cpython#84376); ferromp raises
    # at the call, with the pickling error, and the queue keeps working.
    q = ferromp.Queue()
    # A lambda alone would go by value (cloudpickle); not the lock it holds.
    lock = threading.Lock()
    with pytest.raises(Exception) as info:
        q.put(lambda: lock)
    assert 'pickle' in str(info.value).lower()
    q.put('after')
    assert q.get(timeout=5) == 'after'
    q.close()
    q.join_thread()


def test_feeder_error_hook_of_a_subclass_is_called():
    calls = []

    class Unpicklable:
        def __reduce__(self):
            raise AttributeError('nope')

    class HookedQueue(ferromp.queues.Queue):
        @staticmethod
        def _on_queue_feeder_error(e, obj):
            calls.append((type(e), type(obj)))

    q = HookedQueue(ctx=ferromp.get_context())
    q.put(Unpicklable())
    q.put(True)
    assert q.get(timeout=5) is True
    assert calls == [(AttributeError, Unpicklable)]
    q.close()
    q.join_thread()


def test_joinable_queue_protocol(start_method):
    q = start_method.JoinableQueue()
    workers = [start_method.Process(target=_joinable_worker, args=(q,)) for _ in range(2)]
    for w in workers:
        w.start()
    for i in range(50):
        q.put(i)
    q.join()  # returns only once all 50 are task_done
    for _ in workers:
        q.put(None)
    q.join()
    for w in workers:
        w.join()
        assert w.exitcode == 0


@pytest.mark.parametrize('mod', [ferromp, multiprocessing])
def test_task_done_too_many_times(mod):
    q = mod.JoinableQueue()
    q.put(1)
    q.get()
    q.task_done()
    with pytest.raises(ValueError, match='task_done\\(\\) called too many times'):
        q.task_done()


def test_simple_queue_round_trip_and_close(start_method):
    q = start_method.SimpleQueue()
    out = start_method.SimpleQueue()
    p = start_method.Process(target=_consume_until_none, args=(q, out))
    p.start()
    for i in range(100):
        q.put(i)
    q.put(None)
    assert out.get() == list(range(100))
    p.join()
    assert q.empty()
    q.close()
    with pytest.raises(OSError):
        q.get()


@pytest.mark.parametrize('size', [0, 1, 70000, 4 << 20])
def test_message_sizes(size):
    q = ferromp.Queue()
    payload = os.urandom(size)
    q.put(payload)
    assert q.get(timeout=10) == payload
    q.close()
    q.join_thread()


def test_pickling_a_queue_outside_process_start_is_refused():
    import pickle
    q = ferromp.Queue()
    with pytest.raises(RuntimeError, match='should only be shared between processes'):
        pickle.dumps(q)


def test_feeder_error_hook_as_instance_method_is_called_bound():
    # The stdlib ProcessPoolExecutor's _SafeQueue defines the hook as a plain method.
    seen = []

    class Unpicklable:
        def __reduce__(self):
            raise TypeError('no')

    class SafeQueue(ferromp.queues.Queue):
        def _on_queue_feeder_error(self, e, obj):
            seen.append((self, type(e)))

    q = SafeQueue(ctx=ferromp.get_context())
    q.put(Unpicklable())
    assert seen == [(q, TypeError)]
    q.put(1)
    assert q.get(timeout=5) == 1
    q.close()
    q.join_thread()
