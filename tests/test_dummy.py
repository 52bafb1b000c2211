"""Tests for ferromp.dummy and ferromp.dummy.connection (threads behind the mp API).

The stdlib's multiprocessing.dummy is the oracle for names and reprs. Nothing here
needs the Rust extension; the one test of the real thread pool is skipped when
ferromp.pool cannot be imported.
"""

import array
import multiprocessing.dummy as std_dummy
import multiprocessing.dummy.connection as std_dummy_connection
import queue
import sys
import threading
import time
import types
import weakref

import pytest

from ferromp import dummy
from ferromp.dummy import connection

pytestmark = pytest.mark.timeout(30)


# --- names -----------------------------------------------------------------------------

def test_all_matches_stdlib():
    assert dummy.__all__ == std_dummy.__all__
    assert connection.__all__ == std_dummy_connection.__all__
    for mod in (dummy, connection):
        for name in mod.__all__:
            assert hasattr(mod, name), (mod, name)


def test_other_names_exist():
    for name in ("DummyProcess", "Namespace", "dict", "list", "Array", "Value",
                 "shutdown", "connection"):
        assert hasattr(dummy, name), name
    for name in ("families", "Listener", "Client", "Pipe", "Connection"):
        assert hasattr(connection, name), name


def test_primitives_are_the_threading_and_queue_ones():
    for name in ("Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event",
                 "Barrier"):
        assert getattr(dummy, name) is getattr(threading, name), name
    assert dummy.Queue is queue.Queue
    assert dummy.JoinableQueue is queue.Queue
    assert dummy.Pipe is connection.Pipe
    assert dummy.dict is dict and dummy.list is list


# --- processes as threads --------------------------------------------------------------

def test_process_is_a_thread():
    assert dummy.Process is dummy.DummyProcess
    assert issubclass(dummy.Process, threading.Thread)
    assert dummy.current_process is threading.current_thread
    assert isinstance(threading.main_thread()._children, weakref.WeakKeyDictionary)


def test_process_runs_target_and_reports_exitcode():
    results = []
    go = threading.Event()

    def target(a, b=None):
        go.wait(10)
        results.append((a, b))

    p = dummy.Process(target=target, args=(1,), kwargs={"b": 2}, name="worker")
    assert p.name == "worker"
    assert p.exitcode is None
    p.start()
    assert p.exitcode is None  # still running
    assert p in dummy.active_children()
    go.set()
    p.join()
    assert results == [(1, 2)]
    assert p.exitcode == 0
    assert p not in dummy.active_children()
    assert type(dummy.active_children()) is list


def test_process_default_kwargs():
    seen = []
    p = dummy.Process(target=lambda **kw: seen.append(kw))
    p.start()
    p.join()
    assert seen == [{}]


def test_active_children_forgets_finished_threads():
    p = dummy.Process(target=lambda: None)
    p.start()
    p.join()
    children = dummy.current_process()._children
    children[p] = None  # as if it had not been reaped yet
    assert p not in dummy.active_children()
    assert p not in children


def test_start_from_another_thread_is_refused():
    p = dummy.Process(target=lambda: None)
    errors = []

    def other():
        try:
            p.start()
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1
    assert errors[0].startswith("Parent is %r but current_process is " % (p._parent,))
    assert p.exitcode is None


def test_nested_processes_track_their_own_children():
    seen = {}
    release = threading.Event()

    def outer():
        inner = dummy.Process(target=release.wait, args=(10,))
        inner.start()
        seen["inner_parent"] = inner._parent
        seen["children"] = dummy.active_children()
        release.set()
        inner.join()
        seen["after"] = dummy.active_children()
        seen["inner"] = inner

    p = dummy.Process(target=outer)
    p.start()
    p.join()
    assert seen["inner_parent"] is p
    assert seen["children"] == [seen["inner"]]
    assert seen["after"] == []
    assert seen["inner"] not in dummy.active_children()


def test_start_under_plain_thread_parent():
    # A plain Thread has no children map; starting from it must still work.
    done = []

    def body():
        q = dummy.Process(target=lambda: done.append(1))
        q.start()
        q.join()

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert done == [1]


def test_freeze_support_and_shutdown_do_nothing():
    assert dummy.freeze_support() is None
    assert dummy.shutdown() is None


# --- manager-ish objects ---------------------------------------------------------------

def test_namespace_matches_stdlib():
    kwargs = dict(b=2, a="x", _hidden=3, c=[1])
    ours, theirs = dummy.Namespace(**kwargs), std_dummy.Namespace(**kwargs)
    assert repr(ours) == repr(theirs) == "Namespace(a='x', b=2, c=[1])"
    assert ours._hidden == 3
    ours.d = 4
    assert repr(ours) == "Namespace(a='x', b=2, c=[1], d=4)"
    assert repr(dummy.Namespace()) == "Namespace()"


def test_value():
    v = dummy.Value("i", 3)
    assert v.value == 3
    v.value = 5
    assert v.value == 5
    assert v._typecode == "i"
    assert repr(v) == repr(std_dummy.Value("i", 5)) == "<Value('i', 5)>"
    assert dummy.Value("d", 1.5, lock=False).value == 1.5


def test_array():
    a = dummy.Array("i", [1, 2, 3])
    assert isinstance(a, array.array)
    assert a == array.array("i", [1, 2, 3])
    assert dummy.Array("d", range(2), lock=False).typecode == "d"


def test_manager_is_the_module():
    m = dummy.Manager()
    assert m is dummy
    assert m.dict(a=1) == {"a": 1}
    assert m.list("ab") == ["a", "b"]
    assert isinstance(m.Namespace(x=1), dummy.Namespace)


def test_pool_is_a_lazily_imported_thread_pool(monkeypatch):
    made = []

    class FakeThreadPool:
        def __init__(self, *args):
            made.append(args)

    fake = types.ModuleType("ferromp.pool")
    fake.ThreadPool = FakeThreadPool
    monkeypatch.setitem(sys.modules, "ferromp.pool", fake)
    import ferromp
    monkeypatch.setattr(ferromp, "pool", fake, raising=False)

    def init(x):
        pass

    assert isinstance(dummy.Pool(), FakeThreadPool)
    assert isinstance(dummy.Pool(3, init, (1,)), FakeThreadPool)
    assert made == [(None, None, ()), (3, init, (1,))]


def _real_pool_available():
    try:
        from ferromp.pool import ThreadPool  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _real_pool_available(), reason="ferromp.pool not importable yet")
def test_pool_maps_in_threads():
    try:
        pool = dummy.Pool(2)
    except NotImplementedError as e:
        # ferromp._pending placeholder: the pool's issue has not landed yet.
        pytest.skip(str(e))
    try:
        assert pool.map(abs, [-1, -2, 3]) == [1, 2, 3]
    finally:
        pool.close()
        pool.join()


# --- connection ------------------------------------------------------------------------

def test_families():
    assert connection.families == std_dummy_connection.families == [None]


def test_pipe_is_duplex_and_passes_objects_by_reference():
    a, b = dummy.Pipe()
    payload = {"k": [1, 2]}
    a.send(payload)
    assert b.recv() is payload
    b.send_bytes(b"bytes back")
    assert a.recv_bytes() == b"bytes back"
    a, b = dummy.Pipe(duplex=False)
    b.send(1)
    assert a.recv() == 1


def test_poll():
    a, b = connection.Pipe()
    assert not b.poll()
    assert not b.poll(-1)
    start = time.monotonic()
    assert not b.poll(0.1)
    assert time.monotonic() - start >= 0.09
    a.send("x")
    assert b.poll()
    assert b.poll(0)  # polling does not consume
    assert b.recv() == "x"
    assert not b.poll()


def test_poll_wakes_on_send():
    a, b = connection.Pipe()
    t = threading.Timer(0.05, a.send, args=("late",))
    t.start()
    try:
        start = time.monotonic()
        assert b.poll(10)
        assert time.monotonic() - start < 5
        assert b.recv() == "late"
    finally:
        t.join()


def test_poll_none_waits_for_a_message():
    a, b = connection.Pipe()
    t = threading.Timer(0.05, a.send, args=("x",))
    t.start()
    try:
        assert b.poll(None) is True
    finally:
        t.join()


def test_connection_context_manager_and_close():
    a, b = connection.Pipe()
    with a as entered:
        assert entered is a
    assert a.close() is None
    a.send(1)  # closing a queue-backed connection is a no-op, as in the stdlib
    assert b.recv() == 1


def test_listener_and_client():
    with connection.Listener() as listener:
        accepted = []
        t = threading.Thread(target=lambda: accepted.append(listener.accept()))
        t.start()
        client = connection.Client(listener.address)
        t.join()
        (server,) = accepted
        client.send("ping")
        assert server.recv() == "ping"
        server.send("pong")
        assert client.recv() == "pong"
        assert server.poll() is False
    assert listener.address is None


def test_listener_ignores_address_and_family():
    listener = connection.Listener(address=("localhost", 0), family="AF_INET", backlog=2)
    assert isinstance(listener.address, queue.Queue)
    assert listener.address.maxsize == 2
    listener.close()
    assert listener.address is None


def _init_once_then_fail(counter, lock, busy):
    with lock:
        counter[0] += 1
        first = counter[0] == 1
    if not first:
        # Fail only once the first thread runs a task, so the pool turns broken then.
        busy.wait(20)
        raise RuntimeError('this initializer works only once')


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings('ignore::pytest.PytestUnhandledThreadExceptionWarning')
def test_threadpool_broken_with_a_live_thread_still_closes_and_joins():
    # The first thread's initializer works, every later one fails: the pool turns
    # broken while that thread runs a task, and the thread must still get its stop
    # message once the task is done (the engine's turns must not swallow it).
    from ferromp.pool import ThreadPool, BrokenPoolError
    counter, lock = [0], threading.Lock()
    started, release = threading.Event(), threading.Event()

    def busy():
        started.set()
        release.wait(20)
        return 'done'
    pool = ThreadPool(2, initializer=_init_once_then_fail,
                      initargs=(counter, lock, started))
    r = pool.apply_async(busy)
    assert started.wait(20)
    deadline = time.monotonic() + 20
    while pool._engine.broken is None:
        assert time.monotonic() < deadline, 'the pool never turned broken'
        time.sleep(0.01)
    with pytest.raises(BrokenPoolError):
        pool.apply(abs, (-1,))
    for _ in range(20):         # engine turns while the thread is busy
        pool._engine.wake()
        time.sleep(0.005)
    release.set()
    assert r.get(20) == 'done'
    pool.close()
    pool.join()
    assert not any(t.is_alive() for t in pool._pool)
