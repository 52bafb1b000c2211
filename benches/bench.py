"""ferromp vs the stdlib, side by side, in one run.

Each workload runs under ``multiprocessing`` (the stdlib) and ``ferromp`` for each start
method, alternating the two several times, each time in a fresh interpreter that
imports only the library under test; the table shows the median of each and the
ratio ferromp/stdlib for times (lower is better) or stdlib/ferromp for rates, so that a
ratio below 1 always means ferromp is better.

    python benches/bench.py            # full run (a few minutes)
    python benches/bench.py --quick    # the README demo (well under a minute)
    python benches/bench.py --only pipe --methods fork
    python benches/bench.py --only Pool --baseline ../old/.venv/bin/python

``--baseline PYTHON`` measures a second ferromp build (the one installed for that
interpreter) in the same alternation, in place of the executor columns: its ratio to
the stdlib, and ferromp's time relative to it ("vs base", below 1: this build is
faster).
"""

import importlib
import importlib.util
import os
import sys
import time

# The measuring workers import nothing beyond this: modules a worker imports make its
# fork()s costlier, and the comparison is of the two libraries, not of this script.

IMPLS = ('multiprocessing', 'ferromp')
# Also measured for the Pool rows, when installed: concurrent.futures'
# ProcessPoolExecutor on a stdlib context ('cf') and loky's ProcessPoolExecutor.
EXECUTORS = ('cf', 'loky')


# --- child targets (module level so spawn/forkserver children can import them) ---

def _noop():
    pass


def _echo(conn):
    # Echo objects until None arrives.
    while True:
        obj = conn.recv()
        if obj is None:
            break
        conn.send(obj)


def _echo_bytes(conn):
    while True:
        b = conn.recv_bytes()
        if not b:
            break
        conn.send_bytes(b)


def _sink(conn, count):
    # Receive `count` messages, then report the total size.
    total = 0
    for _ in range(count):
        total += len(conn.recv_bytes())
    conn.send(total)


# --- workloads: each returns the value to compare (seconds per op, or bytes/s) ---

def start_join(mp, n):
    """Process start + join, seconds per process."""
    mp.Process(target=_noop).start()  # warm up (starts a fork server if any)
    for p in mp.active_children():
        p.join()
    t = time.perf_counter()
    for _ in range(n):
        p = mp.Process(target=_noop)
        p.start()
        p.join()
    return (time.perf_counter() - t) / n


def _with_child(mp, target, body, *args):
    a, b = mp.Pipe()
    p = mp.Process(target=target, args=(b,) + args)
    p.start()
    b.close()
    try:
        return body(a)
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
        a.close()


def _round_trips(mp, n, echo, msg, stop, raw):
    def body(a):
        send, recv = (a.send_bytes, a.recv_bytes) if raw else (a.send, a.recv)
        for _ in range(200):
            send(msg)
            recv()
        t = time.perf_counter()
        for _ in range(n):
            send(msg)
            recv()
        dt = (time.perf_counter() - t) / n
        send(stop)
        return dt
    return _with_child(mp, echo, body)


def pipe_rt_obj(mp, n):
    """Pipe round trip of a small object (send + recv in both processes), s per trip."""
    return _round_trips(mp, n, _echo, ('task', 12345, 3.5, 'payload'), None, raw=False)


def pipe_rt_bytes(mp, n):
    """Pipe round trip of 8 bytes with send_bytes / recv_bytes, s per trip."""
    return _round_trips(mp, n, _echo_bytes, b'12345678', b'', raw=True)


def _bandwidth(mp, size, count):
    data = b'\x5a' * size

    def body(a):
        t = time.perf_counter()
        for _ in range(count):
            a.send_bytes(data)
        total = a.recv()
        dt = time.perf_counter() - t
        assert total == size * count
        return size * count / dt
    return _with_child(mp, _sink, body, count)


def pipe_bw_1m(mp, n):
    """Pipe bandwidth with 1 MiB messages, bytes/s."""
    return _bandwidth(mp, 1 << 20, n)


def pipe_bw_64m(mp, n):
    """Pipe bandwidth with 64 MiB messages, bytes/s."""
    return _bandwidth(mp, 64 << 20, n)


def lock_uncontended(mp, n):
    """Lock acquire + release in one process, no contention, s per pair."""
    lock = mp.Lock()
    acquire, release = lock.acquire, lock.release
    t = time.perf_counter()
    for _ in range(n):
        acquire()
        release()
    return (time.perf_counter() - t) / n


def _lock_hammer(lock, n, ready=None, go=None):
    if ready is not None:
        ready.set()
        go.wait()
    for _ in range(n):
        lock.acquire()
        lock.release()


def _increment(v, n, ready=None, go=None):
    if ready is not None:
        ready.set()
        go.wait()
    for _ in range(n):
        with v.get_lock():
            v.value += 1


def _race(mp, target, shared, n):
    # Both processes start hammering together: the clock starts once the child is up.
    ready, go = mp.Event(), mp.Event()
    p = mp.Process(target=target, args=(shared, n, ready, go))
    p.start()
    ready.wait()
    t = time.perf_counter()
    go.set()
    target(shared, n)
    p.join()
    return (time.perf_counter() - t) / (2 * n)


def lock_contended(mp, n):
    """Lock acquire + release by 2 processes at once, wall s per pair."""
    return _race(mp, _lock_hammer, mp.Lock(), n)


def value_increment_1(mp, n):
    """`with v.get_lock(): v.value += 1` in one process, s per increment."""
    v = mp.Value('i', 0)
    t = time.perf_counter()
    _increment(v, n)
    return (time.perf_counter() - t) / n


def value_increment_2(mp, n):
    """The same increment by 2 processes at once, wall s per increment."""
    v = mp.Value('i', 0)
    dt = _race(mp, _increment, v, n)
    assert v.value == 2 * n
    return dt


def _time_reads(v, n):
    t = time.perf_counter()
    for _ in range(n):
        _ = v.value
    return (time.perf_counter() - t) / n


def value_read(mp, n):
    """Synchronized `Value('d').value` read, s per read."""
    return _time_reads(mp.Value('d', 1.5), n)


def value_write(mp, n):
    """Synchronized `Value('d').value = x`, s per write."""
    v = mp.Value('d', 1.5)
    t = time.perf_counter()
    for _ in range(n):
        v.value = 2.5
    return (time.perf_counter() - t) / n


def rawvalue_read(mp, n):
    """`RawValue('d').value` read, s per read."""
    return _time_reads(mp.RawValue('d', 1.5), n)


def array_item(mp, n):
    """Synchronized `Array('i', 100)[i]` read, s per read."""
    a = mp.Array('i', 100)
    t = time.perf_counter()
    for i in range(n):
        a[i % 100]
    return (time.perf_counter() - t) / n


def _shm_cycle(SharedMemory):
    shm = SharedMemory(create=True, size=4096)
    other = SharedMemory(shm.name)
    other.close()
    shm.close()
    shm.unlink()


def shm_create_attach(mp, n):
    """SharedMemory(create=True, size=4096) + attach by name + close both + unlink,
    s per cycle (includes the resource tracker messages)."""
    lib = type(mp).__module__.split('.')[0]
    SharedMemory = importlib.import_module(lib + '.shared_memory').SharedMemory
    _shm_cycle(SharedMemory)  # warm up: starts the resource tracker
    t = time.perf_counter()
    for _ in range(n):
        _shm_cycle(SharedMemory)
    return (time.perf_counter() - t) / n


# Workloads whose cost does not depend on the start method run under the first only.
ANY_METHOD = {'Serial loop, 200k tiny calls (no pool)',
              'lock acquire+release, uncontended', 'Value(get_lock) += 1, 1 process',
              'Value.value read', 'Value.value write', 'RawValue.value read',
              'Array[i] read', 'SharedMemory create+attach+unlink',
              'Queue put+get, same process', 'SimpleQueue put+get, same process'}
# (The manager rows run in every method: the server is started with it.)


def _queue_producer(q, n, payload, ready):
    q.put('warm')
    ready.wait()
    for i in range(n):
        q.put(i if payload is None else payload)


def _queue_throughput(mp, kind, producers, n, payload=None):
    """Messages (or bytes) per second from child producers to the parent."""
    q = getattr(mp, kind)()
    ready = mp.Event()
    per = n // producers
    procs = [mp.Process(target=_queue_producer, args=(q, per, payload, ready))
             for _ in range(producers)]
    for p in procs:
        p.start()
    for _ in procs:
        q.get()
    t = time.perf_counter()
    ready.set()
    get = q.get
    for _ in range(per * producers):
        get()
    dt = time.perf_counter() - t
    for p in procs:
        p.join()
    unit = len(payload) if isinstance(payload, bytes) else 1
    return per * producers * unit / dt


def queue_1p(mp, n):
    """Queue, 1 producer -> 1 consumer, small ints, messages/s."""
    return _queue_throughput(mp, 'Queue', 1, n)


def queue_1p_tuple(mp, n):
    """Queue, 1 producer -> 1 consumer, a small tuple (pickled), messages/s."""
    return _queue_throughput(mp, 'Queue', 1, n, ('task', 12345, 3.5, 'payload'))


def queue_4p(mp, n):
    """Queue, 4 producers -> 1 consumer, small ints, messages/s."""
    return _queue_throughput(mp, 'Queue', 4, n)


def queue_1m(mp, n):
    """Queue, 1 MiB bytes messages, bytes/s."""
    return _queue_throughput(mp, 'Queue', 1, n, b'\x5a' * (1 << 20))


def queue_64m(mp, n):
    """Queue, 64 MiB bytes messages, bytes/s."""
    return _queue_throughput(mp, 'Queue', 1, n, b'\x5a' * (64 << 20))


def simple_1p(mp, n):
    """SimpleQueue, 1 producer -> 1 consumer, small ints, messages/s."""
    return _queue_throughput(mp, 'SimpleQueue', 1, n)


def simple_4p(mp, n):
    """SimpleQueue, 4 producers -> 1 consumer, small ints, messages/s."""
    return _queue_throughput(mp, 'SimpleQueue', 4, n)


def simple_1m(mp, n):
    """SimpleQueue, 1 MiB bytes messages, bytes/s."""
    return _queue_throughput(mp, 'SimpleQueue', 1, n, b'\x5a' * (1 << 20))


def simple_64m(mp, n):
    """SimpleQueue, 64 MiB bytes messages, bytes/s."""
    return _queue_throughput(mp, 'SimpleQueue', 1, n, b'\x5a' * (64 << 20))


def _put_get_latency(mp, kind, n):
    q = getattr(mp, kind)()
    for i in range(200):
        q.put(i)
        q.get()
    t = time.perf_counter()
    for i in range(n):
        q.put(i)
        q.get()
    return (time.perf_counter() - t) / n


def queue_latency(mp, n):
    """Queue put + get in one process, seconds per pair."""
    return _put_get_latency(mp, 'Queue', n)


def simple_latency(mp, n):
    """SimpleQueue put + get in one process, seconds per pair."""
    return _put_get_latency(mp, 'SimpleQueue', n)


def _tiny(x):
    return x + 1


def _ident(x):
    return x


def _pid_after_nap(_):
    time.sleep(0.002)
    return os.getpid()


def _warm(map_fn, workers=2):
    """Runs small tasks through ``map_fn`` until every worker has answered one: a
    worker still starting up (spawn takes ~100 ms) would share the CPUs with the
    measured run, and the rows measure the work, not the pool's start (its own row)."""
    deadline = time.monotonic() + 60
    seen = set()
    while len(seen) < workers and time.monotonic() < deadline:
        seen.update(map_fn(_pid_after_nap, range(4 * workers)))


def pool_map_tiny(mp, n, **extra):
    """Pool(2).map of n tiny tasks, default chunksize, seconds per map."""
    with mp.Pool(2) as pool:
        _warm(lambda f, it: pool.map(f, it, chunksize=1))
        pool.map(_tiny, range(1000), **extra)
        t = time.perf_counter()
        pool.map(_tiny, range(n), **extra)
        return time.perf_counter() - t


def _ferromp_only(mp, **extra):
    # ferromp's extensions, for the rows that compare them with the stdlib's plain call.
    return extra if type(mp).__module__.startswith('ferromp') else {}


def pool_map_tiny_timeout(mp, n):
    """The same map with task_timeout=60 (ferromp; the stdlib's plain map)."""
    return pool_map_tiny(mp, n, **_ferromp_only(mp, task_timeout=60))


def pool_map_tiny_progress(mp, n):
    """The same map with progress=True (ferromp; the stdlib's plain map). The bar
    (tqdm's if installed, else the built-in one) is drawn into a buffer, not the
    terminal, so that it does not mix with the table."""
    import io
    saved, sys.stderr = sys.stderr, io.StringIO()
    try:
        return pool_map_tiny(mp, n, **_ferromp_only(mp, progress=True))
    finally:
        sys.stderr = saved


def _pool_per_task(mp, n, how):
    with mp.Pool(2) as pool:
        _warm(lambda f, it: pool.map(f, it, chunksize=1))
        pool.map(_tiny, range(100), chunksize=1)
        t = time.perf_counter()
        if how == 'map':
            pool.map(_tiny, range(n), chunksize=1)
        elif how == 'imap':
            for _ in pool.imap(_tiny, range(n), chunksize=1):
                pass
        elif how == 'imap_unordered':
            for _ in pool.imap_unordered(_tiny, range(n), chunksize=1):
                pass
        else:
            for i in range(n):
                pool.apply_async(_tiny, (i,)).get()
        return (time.perf_counter() - t) / n


def pool_map_c1(mp, n):
    """Pool(2).map, chunksize=1, seconds per task."""
    return _pool_per_task(mp, n, 'map')


def pool_imap_c1(mp, n):
    """Pool(2).imap, chunksize=1, seconds per task."""
    return _pool_per_task(mp, n, 'imap')


def pool_imap_unordered_c1(mp, n):
    """Pool(2).imap_unordered, chunksize=1, seconds per task."""
    return _pool_per_task(mp, n, 'imap_unordered')


def pool_apply_rt(mp, n):
    """Sequential apply_async(f).get() round trip, seconds per call."""
    return _pool_per_task(mp, n, 'apply')


def pool_start(mp, n):
    """Pool(2) create + map of 10 tasks + close + join, seconds each."""
    t = time.perf_counter()
    for _ in range(n):
        pool = mp.Pool(2)
        pool.map(_tiny, range(10))
        pool.close()
        pool.join()
    return (time.perf_counter() - t) / n


def pool_numpy_rt(mp, n):
    """Pool(2).apply of a 100 MB numpy array returned as is, seconds per round trip."""
    import numpy
    a = numpy.ones(100 * 10 ** 6 // 8)
    with mp.Pool(2) as pool:
        _warm(lambda f, it: pool.map(f, it, chunksize=1))
        pool.apply(_ident, (a[:10],))
        t = time.perf_counter()
        for _ in range(n):
            pool.apply(_ident, (a,))
        return (time.perf_counter() - t) / n


def serial_tiny(mp, n):
    """The same 200k tiny calls in a plain loop, no pool (the bar a pool must beat)."""
    [_tiny(x) for x in range(1000)]
    t = time.perf_counter()
    [_tiny(x) for x in range(n)]
    return time.perf_counter() - t


# --- the same pool workloads on concurrent.futures executors (stdlib, loky) ---------

def _executor(impl, method):
    if impl == 'cf':
        import concurrent.futures
        import multiprocessing
        return concurrent.futures.ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context(method))
    import loky
    return loky.ProcessPoolExecutor(2, context=loky.backend.get_context(method))


def executor_workload(impl, method, title, n):
    """The executor version of a Pool row: ``map`` with the Pool's default chunk size
    for the 200k row (an executor's own default is 1), ``map`` / ``as_completed`` for
    the chunksize=1 rows, ``submit().result()`` for the round trips."""
    import concurrent.futures
    if title == 'Pool start+map+close+join':
        t = time.perf_counter()
        for _ in range(n):
            ex = _executor(impl, method)
            list(ex.map(_tiny, range(10)))
            ex.shutdown(wait=True)
        return (time.perf_counter() - t) / n
    ex = _executor(impl, method)
    try:
        _warm(lambda f, it: list(ex.map(f, it)))
        list(ex.map(_tiny, range(100)))
        if title == 'Pool map, 200k tiny tasks':
            list(ex.map(_tiny, range(1000), chunksize=125))
            t = time.perf_counter()
            list(ex.map(_tiny, range(n), chunksize=-(-n // 8)))
            return time.perf_counter() - t
        if title == 'Pool apply, 100 MB numpy round trip':
            import numpy
            a = numpy.ones(100 * 10 ** 6 // 8)
            ex.submit(_ident, a[:10]).result()
            t = time.perf_counter()
            for _ in range(n):
                ex.submit(_ident, a).result()
            return (time.perf_counter() - t) / n
        t = time.perf_counter()
        if title in ('Pool map, chunksize=1', 'Pool imap, chunksize=1'):
            for _ in ex.map(_tiny, range(n)):
                pass
        elif title == 'Pool imap_unordered, chunksize=1':
            for f in concurrent.futures.as_completed([ex.submit(_tiny, i) for i in range(n)]):
                f.result()
        else:
            for i in range(n):
                ex.submit(_tiny, i).result()
        return (time.perf_counter() - t) / n
    finally:
        ex.shutdown(wait=True)


def manager_start(mp, n):
    """Manager() start (a running server process), seconds each; shutdown untimed."""
    mp.Manager().shutdown()  # warm up: imports, and the fork server if any
    total = 0.0
    for _ in range(n):
        t = time.perf_counter()
        m = mp.Manager()
        total += time.perf_counter() - t
        m.shutdown()
    return total / n


def manager_start_shutdown(mp, n):
    """Manager() start + shutdown, seconds each."""
    mp.Manager().shutdown()  # warm up, as above
    t = time.perf_counter()
    for _ in range(n):
        mp.Manager().shutdown()
    return (time.perf_counter() - t) / n


def _dict_ops(d, n, conn):
    d['k'] = 0
    d['k']
    t = time.perf_counter()
    for i in range(n):
        d['k'] = i
        d['k']
    conn.send(time.perf_counter() - t)


def manager_dict_child(mp, n):
    """A managed dict, set + get from a child process, operations/s."""
    m = mp.Manager()
    try:
        d = m.dict()
        r, w = mp.Pipe(duplex=False)
        p = mp.Process(target=_dict_ops, args=(d, n, w))
        p.start()
        dt = r.recv()
        p.join()
        return 2 * n / dt
    finally:
        m.shutdown()


def _mq_producer(q, n):
    for i in range(n):
        q.put(i)


def manager_queue(mp, n):
    """Manager().Queue(), child -> parent, messages/s."""
    m = mp.Manager()
    try:
        q = m.Queue()
        p = mp.Process(target=_mq_producer, args=(q, n + 1))
        p.start()
        q.get()
        t = time.perf_counter()
        for _ in range(n):
            q.get()
        dt = time.perf_counter() - t
        p.join()
        return n / dt
    finally:
        m.shutdown()


def manager_lock(mp, n):
    """A proxied Lock, acquire + release from the parent, seconds per pair."""
    m = mp.Manager()
    try:
        lock = m.Lock()
        for _ in range(100):
            lock.acquire()
            lock.release()
        t = time.perf_counter()
        for _ in range(n):
            lock.acquire()
            lock.release()
        return (time.perf_counter() - t) / n
    finally:
        m.shutdown()


# name, function, kind ('time', 'rate' in bytes/s or 'msgs' per s), n for full run,
# n for --quick
WORKLOADS = [
    ('process start+join', start_join, 'time', 30, 6),
    ('pipe round trip, small object', pipe_rt_obj, 'time', 20000, 3000),
    ('pipe round trip, 8-byte send_bytes', pipe_rt_bytes, 'time', 20000, 3000),
    ('pipe bandwidth, 1 MiB messages', pipe_bw_1m, 'rate', 300, 60),
    ('pipe bandwidth, 64 MiB messages', pipe_bw_64m, 'rate', 6, 2),
    ('lock acquire+release, uncontended', lock_uncontended, 'time', 200000, 50000),
    ('lock contended by 2 processes', lock_contended, 'time', 100000, 20000),
    ('Value(get_lock) += 1, 1 process', value_increment_1, 'time', 100000, 20000),
    ('Value(get_lock) += 1, 2 processes', value_increment_2, 'time', 50000, 10000),
    ('Value.value read', value_read, 'time', 200000, 50000),
    ('Value.value write', value_write, 'time', 200000, 50000),
    ('RawValue.value read', rawvalue_read, 'time', 200000, 50000),
    ('Array[i] read', array_item, 'time', 200000, 50000),
    ('SharedMemory create+attach+unlink', shm_create_attach, 'time', 5000, 1000),
    ('Queue 1->1 small ints', queue_1p, 'msgs', 200000, 40000),
    ('Queue 1->1 small tuples', queue_1p_tuple, 'msgs', 200000, 40000),
    ('Queue 4->1 small ints', queue_4p, 'msgs', 200000, 40000),
    ('Queue 1 MiB messages', queue_1m, 'rate', 1000, 200),
    ('Queue 64 MiB messages', queue_64m, 'rate', 10, 3),
    ('Queue put+get, same process', queue_latency, 'time', 100000, 20000),
    ('SimpleQueue 1->1 small ints', simple_1p, 'msgs', 200000, 40000),
    ('SimpleQueue 4->1 small ints', simple_4p, 'msgs', 200000, 40000),
    ('SimpleQueue 1 MiB messages', simple_1m, 'rate', 1000, 200),
    ('SimpleQueue 64 MiB messages', simple_64m, 'rate', 10, 3),
    ('SimpleQueue put+get, same process', simple_latency, 'time', 100000, 20000),
    ('Manager start', manager_start, 'time', 8, 3),
    ('Manager start+shutdown', manager_start_shutdown, 'time', 8, 3),
    ('Manager dict set+get from a child', manager_dict_child, 'msgs', 5000, 1000),
    ('Manager().Queue child->parent', manager_queue, 'msgs', 5000, 1000),
    ('Manager Lock acquire+release', manager_lock, 'time', 5000, 1000),
    ('Serial loop, 200k tiny calls (no pool)', serial_tiny, 'time', 200000, 50000),
    ('Pool map, 200k tiny tasks', pool_map_tiny, 'time', 200000, 50000),
    ('Pool map 200k, task_timeout', pool_map_tiny_timeout, 'time', 200000, 50000),
    ('Pool map 200k, progress=True', pool_map_tiny_progress, 'time', 200000, 50000),
    ('Pool map, chunksize=1', pool_map_c1, 'time', 20000, 3000),
    ('Pool imap, chunksize=1', pool_imap_c1, 'time', 20000, 3000),
    ('Pool imap_unordered, chunksize=1', pool_imap_unordered_c1, 'time', 20000, 3000),
    ('Pool apply_async().get()', pool_apply_rt, 'time', 2000, 500),
    ('Pool start+map+close+join', pool_start, 'time', 10, 3),
    ('Pool apply, 100 MB numpy round trip', pool_numpy_rt, 'time', 5, 2),
]


# Rows of ferromp's own extensions, each against the stdlib's plain call and, in the
# same alternation, ferromp's plain call (the row named here): an executor has nothing
# to compare there. The "plain" column gives ferromp's plain time and (x) = with/without.
EXTENSION_ROWS = {
    'Pool map 200k, task_timeout': 'Pool map, 200k tiny tasks',
    'Pool map 200k, progress=True': 'Pool map, 200k tiny tasks',
}


def fmt(kind, v):
    if kind == 'time':
        if v < 1e-6:
            return '%.0f ns' % (v * 1e9)
        if v < 1e-3:
            return '%.1f us' % (v * 1e6)
        return '%.2f ms' % (v * 1e3)
    if kind == 'msgs':
        return '%.0f k/s' % (v / 1e3)
    return '%.0f MB/s' % (v / 1e6)


def _measure(impl, method, title, n, python=None):
    # Each measurement runs in a fresh interpreter that imports only the library under
    # test, as a real program would: with both loaded, each one's children would also
    # run the other's at-fork and exit hooks.
    import subprocess
    out = subprocess.run(
        [python or sys.executable, os.path.abspath(__file__), '--worker', impl, method,
         title, str(n)],
        check=True, stdout=subprocess.PIPE, text=True, timeout=600,
    ).stdout
    return float(out.strip().splitlines()[-1])


def _worker(impl, method, title, n):
    if impl in EXECUTORS:
        import warnings
        warnings.simplefilter('ignore')
        print(repr(executor_workload(impl, method, title, int(n))))
        return
    ctx = importlib.import_module(impl).get_context(method)
    fn = {w[0]: w[1] for w in WORKLOADS}[title]
    print(repr(fn(ctx, int(n))))


def main(argv=None):
    import argparse
    import statistics
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='short demo run')
    ap.add_argument('--repeat', type=int, default=None,
                    help='alternations of stdlib/ferromp per workload')
    ap.add_argument('--methods', default='fork,spawn,forkserver')
    ap.add_argument('--only', default='', help='substring filter on workload names')
    ap.add_argument('--baseline', metavar='PYTHON', default=None,
                    help='an interpreter with another ferromp build to compare against')
    args = ap.parse_args(argv)
    repeat = args.repeat or (2 if args.quick else 5)
    import ferromp
    print('ferromp %s vs multiprocessing (Python %s), %d CPUs, %d repeats, medians'
          % (ferromp.__version__, sys.version.split()[0], os.cpu_count(), repeat))
    print('ratio = ferromp/stdlib for times, stdlib/ferromp for rates: below 1 is better\n')
    if args.baseline:
        executors = []
        extra_cols = ('baseline', 'base ratio', 'vs base')
        print('baseline: ferromp under %s, in the same alternation; vs base = '
              'ferromp/baseline for times, baseline/ferromp for rates\n' % args.baseline)
    else:
        executors = [e for e in EXECUTORS
                     if e == 'cf' or importlib.util.find_spec(e) is not None]
        extra_cols = ('cf', 'loky')
        print('Pool rows also run on ProcessPoolExecutor: cf = concurrent.futures (stdlib '
              'context), loky; (x) = ferromp/that\n')
    header = '%-36s %-11s %14s %14s %7s' % (
        'workload', 'method', 'stdlib', 'ferromp', 'ratio') + ''.join(
        ' %14s' % c if args.baseline else ' %20s' % c for c in extra_cols)
    print(header)
    print('-' * len(header))
    results = []
    for method in args.methods.split(','):
        for title, fn, kind, n_full, n_quick in WORKLOADS:
            if args.only and args.only not in title:
                continue
            if title in ANY_METHOD and method != args.methods.split(',')[0]:
                continue
            if args.baseline and title in EXTENSION_ROWS:
                continue    # another build may not have the extension
            if fn is pool_numpy_rt and importlib.util.find_spec('numpy') is None:
                print('%-36s %-11s %s' % (title, method, 'skipped: numpy is not installed'))
                continue
            n = n_quick if args.quick else n_full
            if fn is start_join and method == 'spawn':
                n = max(2, n // 3)
            names = IMPLS
            if title.startswith('Pool ') and title not in EXTENSION_ROWS:
                names = IMPLS + tuple(executors)
            if title in EXTENSION_ROWS:
                names = IMPLS + ('plain',)
            if args.baseline:
                names = IMPLS + ('baseline',)
            vals = {name: [] for name in names}
            for _ in range(repeat):
                for name in names:
                    if name == 'baseline':
                        vals[name].append(_measure('ferromp', method, title, n,
                                                   args.baseline))
                    elif name == 'plain':
                        vals[name].append(_measure('ferromp', method,
                                                   EXTENSION_ROWS[title], n))
                    else:
                        vals[name].append(_measure(name, method, title, n))
            std = statistics.median(vals['multiprocessing'])
            fer = statistics.median(vals['ferromp'])
            ratio = fer / std if kind == 'time' else std / fer
            extra = {e: statistics.median(vals[e]) for e in names if e in EXECUTORS}
            results.append((title, method, std, fer, ratio, extra))
            if args.baseline:
                base = statistics.median(vals['baseline'])
                base_ratio = base / std if kind == 'time' else std / base
                results[-1][5]['baseline'] = base
                print('%-36s %-11s %14s %14s %7.3f %14s %14.3f %14.3f' % (
                    title, method, fmt(kind, std), fmt(kind, fer), ratio, fmt(kind, base),
                    base_ratio, ratio / base_ratio), flush=True)
                continue
            cols = []
            for e in EXECUTORS:
                v = extra.get(e)
                cols.append('' if v is None else '%s (%.2f)' % (fmt(kind, v), fer / v))
            if 'plain' in vals:
                plain = statistics.median(vals['plain'])
                results[-1][5]['plain'] = plain
                cols = ['plain %s (%.3f)' % (fmt(kind, plain), fer / plain), '']
            print('%-36s %-11s %14s %14s %7.2f %20s %20s' % (
                title, method, fmt(kind, std), fmt(kind, fer), ratio, *cols), flush=True)
    return results


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--worker':
        _worker(*sys.argv[2:6])
    else:
        main()
