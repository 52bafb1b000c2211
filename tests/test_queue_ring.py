"""The shared-memory ring under the queues: many producers and consumers, large
messages, processes killed mid-operation, wait()-ability, Ctrl-C, and use by the
stdlib's ProcessPoolExecutor. Every test runs under fork, spawn and forkserver; the
stdlib is the oracle where the behaviour must match.
"""

import concurrent.futures
import enum
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import time

import numpy
import pytest

import _helpers
import ferromp
from ferromp import _core
import ferromp.connection
from _helpers import wait_for

pytestmark = pytest.mark.timeout(90)

BIG = 64 << 20


# --- child targets (module level: spawn and forkserver pickle them by reference) ---

def _produce_tagged(q, tag, n):
    for i in range(n):
        q.put((tag, i))


def _consume_n(q, n, out):
    got = [q.get() for _ in range(n)]
    out.put(got)


def _put_big(q, seed):
    q.put(_payload(seed))
    q.put('after-big')


def _payload(seed):
    return hashlib.sha256(str(seed).encode()).digest() * (BIG // 32)


def _put_array(q):
    a = numpy.arange(BIG // 8, dtype=numpy.int64)
    q.put(a)


def _get_one(q, out):
    out.put(q.get())


def _put_later(q, delay, obj):
    time.sleep(delay)
    q.put(obj)


def _square(x):
    return x * x


# --- many producers, many consumers ----------------------------------------------

@pytest.mark.parametrize('kind', ['Queue', 'SimpleQueue', 'JoinableQueue'])
def test_many_producers_many_consumers_count_checksum_and_order(start_method, kind):
    q = getattr(start_method, kind)()
    out = start_method.Queue()
    n, producers, consumers = 3000, 3, 2
    total = n * producers
    per = [total // consumers + (i < total % consumers) for i in range(consumers)]
    procs = [start_method.Process(target=_produce_tagged, args=(q, t, n))
             for t in range(producers)]
    procs += [start_method.Process(target=_consume_n, args=(q, k, out)) for k in per]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in range(consumers)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    flat = [x for part in got for x in part]
    assert len(flat) == total
    assert sorted(flat) == sorted((t, i) for t in range(producers) for i in range(n))
    # Each consumer sees each producer's items in the order they were put.
    for part in got:
        for t in range(producers):
            seq = [i for (tag, i) in part if tag == t]
            assert seq == sorted(seq)
    assert q.empty()


# --- large and empty messages --------------------------------------------------

@pytest.mark.parametrize('kind', ['Queue', 'SimpleQueue'])
def test_64mib_bytes_from_a_child(start_method, kind):
    q = getattr(start_method, kind)()
    p = start_method.Process(target=_put_big, args=(q, 7))
    p.start()
    got = q.get()
    assert len(got) == BIG and got == _payload(7)
    assert q.get() == 'after-big'
    p.join(30)
    assert p.exitcode == 0


def test_64mib_numpy_array_from_a_child(start_method):
    q = start_method.Queue()
    p = start_method.Process(target=_put_array, args=(q,))
    p.start()
    a = q.get()
    p.join(30)
    assert a.dtype == numpy.int64 and a.shape == (BIG // 8,)
    assert a[0] == 0 and a[-1] == BIG // 8 - 1 and int(a.sum()) == (BIG // 8) * (BIG // 8 - 1) // 2
    a[0] = 5  # writable, as the stdlib's is
    assert p.exitcode == 0


@pytest.mark.parametrize('obj', [b'', '', (), None, 0, b'x' * 65535, b'y' * 65536,
                                 b'w' * (2 << 20) + b'!'])
@pytest.mark.parametrize('mod', [ferromp, multiprocessing])
def test_message_boundaries_match_the_stdlib(mod, obj):
    # The stdlib's SimpleQueue cannot hold more than a pipe's worth in one process.
    kinds = (mod.Queue(), mod.SimpleQueue()) if mod is ferromp else (mod.Queue(),)
    for q in kinds:
        q.put(obj)
        q.put('next')
        assert q.get() == obj
        assert q.get() == 'next'


def test_ring_wraps_around_many_times_in_one_process():
    # Queue, not SimpleQueue: 5 MiB put in a row exceed the ring, and only Queue's
    # feeder thread lets one process put more than the ring holds before it reads.
    q = ferromp.Queue()
    sizes = [1, 100, 4000, 70000, 300000, 1 << 20, 3 << 20]
    for rnd in range(40):
        for s in sizes:
            q.put(bytes([rnd % 251]) * s)
        for s in sizes:
            got = q.get()
            assert len(got) == s and got[:1] == bytes([rnd % 251])


# --- maxsize, qsize, Full / Empty against the stdlib ----------------------------

@pytest.mark.parametrize('mod', [ferromp, multiprocessing])
def test_maxsize_qsize_full_empty(mod):
    q = mod.Queue(maxsize=3)
    assert q.empty() and not q.full() and q.qsize() == 0
    for i in range(3):
        q.put(i, timeout=1)
    assert q.full() and q.qsize() == 3
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 2
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    assert [q.get(timeout=5) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(queue.Empty):
        q.get(timeout=0.1)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert q.qsize() == 0 and not q.full()
    q.close()
    q.join_thread()


def test_bounded_put_blocks_until_a_consumer_takes(start_method):
    q = start_method.Queue(maxsize=1)
    out = start_method.Queue()
    q.put('first')
    p = start_method.Process(target=_get_one, args=(q, out))
    p.start()
    q.put('second', timeout=30)  # unblocks once the child took 'first'
    assert out.get(timeout=30) == 'first'
    assert q.get(timeout=5) == 'second'
    p.join(10)


# --- processes killed mid-operation -------------------------------------------

def test_killed_producer_in_the_middle_of_a_large_put(start_method):
    # The child dies while streaming a message larger than the ring: its message is
    # dropped, the queue keeps working for everyone else.
    q = start_method.Queue()
    ready = start_method.Event()
    p = start_method.Process(target=_helpers.ready_then_put_bytes,
                             args=(q, ready, 16 << 20))
    p.start()
    assert ready.wait(30)
    # The message is four times the ring: once any of it shows, the put is under way.
    assert wait_for(lambda: not q.empty(), 30)
    p.kill()
    p.join(10)
    q.put('survivor')
    assert q.get(timeout=30) == 'survivor'
    q.put('again')
    assert q.get(timeout=10) == 'again'
    assert q.qsize() == 0


def test_killed_consumer_waiting_in_get(start_method):
    # A consumer killed while it waits in get() holds the read side; the next consumer
    # takes over from the dead one instead of waiting forever.
    q = start_method.Queue()
    out = start_method.Queue()
    ready = start_method.Event()
    p = start_method.Process(target=_helpers.ready_then_get, args=(q, out, ready))
    p.start()
    assert ready.wait(30)
    # Past ready.set(), the only thing the child can sleep in is the get.
    assert wait_for(lambda: _helpers.sleeping(p.pid), 30)
    p.kill()
    p.join(10)
    q.put('for-the-living')
    assert q.get(timeout=10) == 'for-the-living'
    assert out.empty()


def test_killed_producer_leaves_nothing_half_written(start_method):
    # Kill producers at random points; every message that arrives is whole.
    q = start_method.SimpleQueue()
    got = []
    for _ in range(3):
        ready = start_method.Event()
        p = start_method.Process(target=_helpers.ready_then_produce,
                                 args=(q, ready, 'x', 10 ** 6))
        p.start()
        assert ready.wait(30)
        # The queue was emptied: once anything shows, this producer is putting. It is
        # killed then, wherever in a put it is.
        assert wait_for(lambda: not q.empty(), 30)
        p.kill()
        p.join(10)
        while not q.empty():
            got.append(q.get())
    assert got and all(tag == 'x' and isinstance(i, int) for tag, i in got)


# --- waiting on the reader, Ctrl-C ------------------------------------------------

@pytest.mark.parametrize('wait', [ferromp.connection.wait, multiprocessing.connection.wait])
def test_simple_queue_reader_is_waitable(start_method, wait):
    q = start_method.SimpleQueue()
    assert wait([q._reader], 0.05) == []
    p = start_method.Process(target=_put_later, args=(q, 0.2, 'ring'))
    p.start()
    assert wait([q._reader], 30) == [q._reader]
    assert q._reader.poll()
    assert q._reader.recv() == 'ring'
    assert wait([q._reader], 0.05) == []
    assert not q._reader.poll(0.01)
    p.join(10)


def test_blocking_get_wakes_on_a_signal_and_the_queue_stays_usable():
    q = ferromp.Queue()

    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        t0 = time.monotonic()
        with pytest.raises(Stop):
            q.get()
        assert time.monotonic() - t0 < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    q.put('still works')
    assert q.get(timeout=5) == 'still works'


# --- exit semantics -------------------------------------------------------------

def test_joinable_queue_join_waits_for_every_task_done(start_method):
    q = start_method.JoinableQueue()
    out = start_method.Queue()
    for i in range(5):
        q.put(i)
    p = start_method.Process(target=_consume_and_mark_done, args=(q, 5, out))
    p.start()
    q.join()
    assert out.get(timeout=10) == list(range(5))
    p.join(10)


def _consume_and_mark_done(q, n, out):
    got = []
    for _ in range(n):
        got.append(q.get())
        time.sleep(0.01)
        q.task_done()
    out.put(got)


def test_a_producer_can_be_joined_before_its_items_are_drained(start_method):
    # cpython#73983: with the stdlib a process that put large items cannot be joined
    # until someone reads them (its feeder thread blocks on a full pipe).
    q = start_method.Queue()
    p = start_method.Process(target=_produce_tagged, args=(q, 'p', 2000))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert [q.get(timeout=5) for _ in range(2000)] == [('p', i) for i in range(2000)]


# --- the stdlib's ProcessPoolExecutor on a ferromp context ----------------------

def test_stdlib_process_pool_executor_on_a_ferromp_context(start_method):
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=start_method) as ex:
        assert list(ex.map(_square, range(50))) == [x * x for x in range(50)]
        fut = ex.submit(_square, 12)
        assert fut.result(timeout=30) == 144


def test_ring_capacity_is_shared_memory_not_a_pipe():
    q = ferromp.Queue()
    assert q._ring.capacity >= 1 << 20
    _, r, w = q._ring.fds
    assert os.get_blocking(r) is False


# --- large payloads travel out of band -------------------------------------------

def _echo_back(q_in, q_out):
    q_out.put(q_in.get())


@pytest.mark.parametrize('kind', ['Queue', 'SimpleQueue'])
def test_out_of_band_payloads_keep_their_types_and_identity(start_method, kind):
    big = b'b' * 100000
    arr = numpy.arange(50000, dtype=numpy.float64).reshape(250, 200)
    obj = {
        'bytes': big,
        'again': big,  # the same object twice: one payload, shared on arrival
        'bytearray': bytearray(b'a' * 70000),
        'array': arr,
        'many': [bytes([i]) * 65536 for i in range(70)],  # more than an envelope holds
        'small': b'tiny',
    }
    q_in, q_out = getattr(start_method, kind)(), getattr(start_method, kind)()
    p = start_method.Process(target=_echo_back, args=(q_in, q_out))
    p.start()
    q_in.put(obj)
    got = q_out.get()
    p.join(30)
    assert got['bytes'] == big and type(got['bytes']) is bytes
    assert got['again'] is got['bytes']
    assert type(got['bytearray']) is bytearray and got['bytearray'] == obj['bytearray']
    assert got['array'].shape == (250, 200) and (got['array'] == arr).all()
    got['array'][0, 0] = -1.0  # writable, as with the stdlib
    assert got['many'] == obj['many'] and got['small'] == b'tiny'
    assert p.exitcode == 0


def test_out_of_band_envelope_pickle_is_the_stdlib_pickle():
    import pickle
    from ferromp import queues
    obj = [b'x' * 70000, bytearray(b'y' * 80000), 'text']
    env = queues._dumps_for_ring(obj)
    assert isinstance(env, tuple) and len(env) == 3
    body, p1, p2 = env
    assert (p1, p2) == (obj[0], obj[1])
    assert (type(p1), type(p2)) == (bytes, bytearray)
    assert pickle.loads(body, buffers=[p1, p2]) == obj


# --- scalars travel natively, everything else pickled: types must survive -------

class _MyInt(int):
    pass


class _MyStr(str):
    pass


class _Color(enum.IntEnum):
    RED = 1


def _native_cases():
    return [0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 63, -2 ** 64 - 5, 10 ** 40, True, False,
            None, 0.0, -0.0, 1e308, float('inf'), '', 'héllo wörld ✓', '\x00', b'',
            b'\x00\xff', 'x' * 300000, b'y' * 300000, 'a\udc80b', _MyInt(7), _MyStr('s'),
            # Just past the plain length (in characters, or in UTF-8 bytes only), and
            # long ones with lone surrogates: out of band whole.
            b'z' * (_core.PLAIN_MAX + 1), 'é' * (_core.PLAIN_MAX // 2 + 1),
            'a\udc80b' * 20000, _MyStr('s' * 100000),
            _Color.RED, bytearray(b'ba'), 3 + 4j]


@pytest.mark.parametrize('kind', ['Queue', 'SimpleQueue', 'JoinableQueue'])
def test_scalars_and_their_subclasses_keep_type_and_value(start_method, kind):
    import math
    cases = _native_cases()
    q_in, q_out = getattr(start_method, kind)(), getattr(start_method, kind)()
    p = start_method.Process(target=_echo_n, args=(q_in, q_out, len(cases)))
    p.start()
    for c in cases:
        q_in.put(c)
    got = [q_out.get() for _ in cases]
    p.join(30)
    for a, b in zip(cases, got):
        assert type(a) is type(b), (a, b)
        assert a == b
        if isinstance(a, float):
            assert math.copysign(1, a) == math.copysign(1, b)
    nan = float('nan')
    q_in2 = getattr(start_method, kind)()
    q_in2.put(nan)
    assert math.isnan(q_in2.get())


def _echo_n(q_in, q_out, n):
    for _ in range(n):
        q_out.put(q_in.get())


@pytest.mark.parametrize('mod', [ferromp, multiprocessing])
@pytest.mark.parametrize('kind', ['Queue', 'SimpleQueue'])
def test_fork_context_queue_refused_by_spawned_children(mod, kind):
    # As the stdlib's (whose locks refuse it): a queue made in a fork context cannot be
    # passed to a spawn or forkserver child; one made for spawn goes to any child.
    for method in ('spawn', 'forkserver'):
        q = getattr(mod.get_context('fork'), kind)()
        p = mod.get_context(method).Process(target=_echo_n, args=(q, q, 0))
        with pytest.raises(RuntimeError, match='A SemLock created in a fork'):
            p.start()
    q = getattr(mod.get_context('spawn'), kind)()
    for method in ('fork', 'spawn', 'forkserver'):
        p = mod.get_context(method).Process(target=_echo_n, args=(q, q, 0))
        p.start()
        p.join(30)
        assert p.exitcode == 0
