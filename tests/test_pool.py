"""Tests for ferromp.pool (Pool, ThreadPool, the result objects), stdlib as oracle.

Every process-level behaviour runs under fork, spawn and forkserver: conftest.py's
``start_method`` fixture is module-scoped, so the tests of one start method run
together and share one ferromp ``Pool(2)`` and one stdlib ``Pool(2)`` (``pools``) for
the calls that leave a pool as they found it. Tests that break, terminate or
reconfigure a pool make their own.

Child functions are module level here, so they pickle by reference; a spawn or
forkserver worker imports this module to find them. Scenarios that need a parent of
their own (Ctrl-C, a parent killed by SIGKILL) run a small script in a subprocess.
"""

import itertools
import multiprocessing
import multiprocessing.pool as std_pool
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

import ferromp
import ferromp.dummy
from ferromp import pool as fpool
from _helpers import pid_gone
from _helpers import wait_for as wait_until

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ferromp.__file__)))

# Pools shared by the tests of one start method; the leftover-children reaper below
# must not kill their workers.
_SHARED = []


# --- child functions ---------------------------------------------------------------

def sqr(x, wait=0.0):
    if wait:
        time.sleep(wait)
    return x * x


def mul(x, y):
    return x * y


def raise_value_error(msg):
    raise ValueError(msg)  # remote marker comment


def identity(x):
    return x


def worker_pid(_=None):
    return os.getpid()


def kill_self(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)
    time.sleep(10)


def exit_now(code):
    os._exit(code)


def kill_self_on(x, bad):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
    return x * x


def note_pid_then_sleep(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
    return "slept"


_STATE = None


def set_state(*values):
    global _STATE
    _STATE = values


def get_state(x):
    return (_STATE, x)


def init_raises():
    raise ValueError("initializer failed on purpose")


def init_exits():
    os._exit(5)


def unpicklable_result():
    # A lambda alone would go by value (cloudpickle); not the lock it holds.
    lock = threading.Lock()
    return lambda: lock


def fail_on_load():
    raise RuntimeError("cannot be unpickled here")


class LoadFails:
    """Pickles fine; unpickling it raises RuntimeError (in whichever process)."""

    def __reduce__(self):
        return (fail_on_load, ())


def make_load_fails(_=None):
    return LoadFails()


class Unpicklable:
    def __reduce__(self):
        raise TypeError("this object refuses to be pickled")


class Counted:
    """Counts its live instances in the current process."""
    alive = 0

    def __new__(cls):
        cls.alive += 1
        return object.__new__(cls)

    def __del__(self):
        type(self).alive -= 1


def return_chunk(n):
    return b"r" * n


def count_yields(counter, items):
    """A generator over ``items`` that counts, in the parent, how many it yielded."""
    for x in items:
        counter[0] += 1
        yield x


def raising_generator(total, when):
    for i in range(total):
        if i == when:
            raise KeyError("generator says when")
        yield i


# --- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pools(start_method, std_ctx):
    """(ferromp Pool(2), stdlib Pool(2)) of one start method, for non-destructive calls."""
    fp = start_method.Pool(2)
    sp = std_ctx.Pool(2)
    _SHARED[:] = [fp, sp]
    yield fp, sp
    _SHARED[:] = []
    for p in (fp, sp):
        p.terminate()
        p.join()


@pytest.fixture(autouse=True)
def _reap_leftover_children():
    """Overrides conftest's reaper: kill what a failing test left behind, but not the
    workers of the shared pools (a stdlib worker killed while it waits for a task
    holds its pool's queue lock for ever)."""
    yield
    keep = set()
    for p in _SHARED:
        keep.update(id(w) for w in list(p._pool))
    for mod in (ferromp, multiprocessing):
        for p in mod.active_children():
            if id(p) in keep:
                continue
            try:
                p.kill()
                p.join(5)
            except Exception:
                pass


def run_script(directory, source, *args):
    """Run ``source`` as a script file (so spawn children can re-import its
    functions as ``__mp_main__``) in its own session; return the Popen."""
    path = os.path.join(str(directory), "pool_script.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(source))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, path] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)






def error_of(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:
        return e
    raise AssertionError("no exception raised")


# --- the API, compared with the stdlib -----------------------------------------------------

@pytest.mark.timeout(60)
def test_every_method_matches_stdlib(pools):
    data = list(range(23))
    pairs = list(zip(range(17), range(17, 0, -1)))

    def run(p):
        out = {
            "apply": p.apply(sqr, (5,)),
            "apply_kwds": p.apply(sqr, (), {"x": 3}),
            "apply_async": p.apply_async(mul, (6, 7)).get(30),
            "map": p.map(sqr, data),
            "map_async": p.map_async(sqr, data).get(30),
            "starmap": p.starmap(mul, pairs),
            "starmap_async": p.starmap_async(mul, pairs).get(30),
            "imap": list(p.imap(sqr, data)),
            "imap_unordered": sorted(p.imap_unordered(sqr, data)),
            "map_generator": p.map(sqr, (x for x in data)),
            "empty": (p.map(sqr, []), list(p.imap(sqr, [])),
                      list(p.imap_unordered(sqr, [])), p.map_async(sqr, []).get(30),
                      p.starmap(mul, [])),
        }
        for cs in (1, 2, 5, 100):
            out["map", cs] = p.map(sqr, data, chunksize=cs)
            out["map_async", cs] = p.map_async(sqr, data, chunksize=cs).get(30)
            out["starmap", cs] = p.starmap(mul, pairs, chunksize=cs)
            out["starmap_async", cs] = p.starmap_async(mul, pairs, chunksize=cs).get(30)
            out["imap", cs] = list(p.imap(sqr, data, chunksize=cs))
            out["imap_unordered", cs] = sorted(p.imap_unordered(sqr, data, chunksize=cs))
        return out

    fp, sp = pools
    ours, theirs = run(fp), run(sp)
    assert ours == theirs
    assert ours["map"] == [x * x for x in data]


@pytest.mark.timeout(60)
def test_callbacks_match_stdlib(pools):
    def run(p):
        got = []
        p.apply_async(sqr, (4,), callback=got.append, error_callback=got.append).wait(30)
        p.map_async(int, ["1", "2"], callback=got.append,
                    error_callback=got.append).wait(30)
        p.map_async(int, ["1", "x"], callback=got.append,
                    error_callback=got.append).wait(30)
        p.starmap_async(mul, [(2, 3)], callback=got.append).wait(30)
        p.apply_async(raise_value_error, ("cb",), callback=got.append,
                      error_callback=got.append).wait(30)
        return [(type(x).__name__, x.args if isinstance(x, Exception) else x)
                for x in got]

    fp, sp = pools
    ours = run(fp)
    assert ours == run(sp)
    assert ours[0] == ("int", 16)
    assert ours[2][0] == "ValueError"


@pytest.mark.timeout(60)
def test_exceptions_and_remote_traceback_match_stdlib(pools):
    for p, mod in zip(pools, (fpool, std_pool)):
        e = error_of(p.apply, raise_value_error, ("boom",))
        assert type(e) is ValueError and e.args == ("boom",)
        assert type(e.__cause__) is mod.RemoteTraceback
        assert "raise ValueError(msg)  # remote marker comment" in e.__cause__.tb
        assert "remote marker comment" in str(e.__cause__)

        e = error_of(p.map, raise_value_error, ["a", "b"], 1)
        assert type(e) is ValueError and e.args in (("a",), ("b",))
        assert type(e.__cause__) is mod.RemoteTraceback

        # An exception from the iterable itself is raised as is, without a remote cause.
        e = error_of(p.map, sqr, raising_generator(5, 2), 1)
        assert type(e) is KeyError and e.__cause__ is None

        it = p.imap(sqr, raising_generator(10, 3), 1)
        assert [next(it) for _ in range(3)] == [0, 1, 4]
        assert type(error_of(next, it)) is KeyError

        it = p.imap(sqr, raising_generator(20, 7), 2)
        assert [next(it) for _ in range(6)] == [0, 1, 4, 9, 16, 25]
        assert type(error_of(next, it)) is KeyError

        res = p.apply_async(raise_value_error, ("x",))
        res.wait(30)
        assert res.ready() and not res.successful()


@pytest.mark.timeout(60)
def test_iterable_with_len_that_raises_does_not_hang(pools):
    class LyingIterable:
        def __init__(self):
            self.n = 0

        def __len__(self):
            return 10

        def __iter__(self):
            return self

        def __next__(self):
            self.n += 1
            if self.n > 3:
                raise KeyError("stop here")
            return self.n

    fp, _ = pools
    # The stdlib hangs here (three chunks done, seven never come).
    assert type(error_of(fp.map, sqr, LyingIterable(), 1)) is KeyError
    assert fp.map(sqr, range(3)) == [0, 1, 4]


@pytest.mark.timeout(60)
def test_maybe_encoding_error_matches_stdlib(pools):
    for p, mod in zip(pools, (fpool, std_pool)):
        got = []
        res = p.apply_async(unpicklable_result, error_callback=got.append)
        e = error_of(res.get, 30)
        assert type(e) is mod.MaybeEncodingError
        assert got == [e]
        assert "Error sending result: '<function unpicklable_result.<locals>.<lambda>" \
            in str(e)
        assert e.exc and e.value and repr(e).startswith("<MaybeEncodingError: ")
        # The worker survived it.
        assert p.apply(sqr, (3,)) == 9


@pytest.mark.timeout(60)
def test_get_timeout_wait_ready_successful(pools):
    fp, _ = pools
    res = fp.apply_async(sqr, (7, 1.0))
    t = time.monotonic()
    e = error_of(res.get, 0.1)
    assert isinstance(e, multiprocessing.TimeoutError)
    assert type(e) is ferromp.TimeoutError is multiprocessing.TimeoutError
    assert time.monotonic() - t < 0.9
    assert not res.ready()
    with pytest.raises(ValueError, match="not ready"):
        res.successful()
    assert res.wait(0.01) is None
    assert res.get(30) == 49
    assert res.ready() and res.successful()

    it = fp.imap(sqr, [1.0], 1)
    assert it.next(timeout=30) == 1
    slow = fp.imap(sqr, [2], 1)
    blocker = [fp.apply_async(sqr, (0, 0.5)) for _ in range(2)]
    slow2 = fp.imap_unordered(sqr, [3], 1)
    with pytest.raises(multiprocessing.TimeoutError):
        slow2.next(timeout=0.05)
    assert slow.next(timeout=30) == 4 and slow2.next(timeout=30) == 9
    with pytest.raises(StopIteration):
        slow.next(timeout=1)
    for b in blocker:
        b.get(30)

    mr = fp.map_async(sqr, [1, 2], chunksize=1)
    assert mr.get(30) == [1, 4]


@pytest.mark.timeout(60)
def test_large_arguments_and_results(pools):
    fp, _ = pools
    big = b"a" * (5 * 1024 * 1024 + 3)
    assert fp.apply(identity, (big,)) == big
    assert fp.map(len, [big, big[:10], big]) == [len(big), 10, len(big)]
    assert [len(r) for r in fp.imap(return_chunk, [3_000_000, 5, 200_000])] \
        == [3_000_000, 5, 200_000]


@pytest.mark.timeout(60)
def test_imap_over_generator_is_lazy_and_bounded(start_method):
    with start_method.Pool(2) as p:
        counter = [0]
        it = p.imap(sqr, count_yields(counter, itertools.count()))
        assert [next(it) for _ in range(30)] == [x * x for x in range(30)]
        time.sleep(0.3)
        # An endless generator is read only a bounded way ahead of the consumer.
        assert counter[0] <= 30 + max(64, 8 * p._processes) + 1
        assert [next(it) for _ in range(200)] == [x * x for x in range(30, 230)]
        assert p.map(sqr, [2]) == [4]   # other work is not starved behind it

        counter2 = [0]
        it2 = p.imap_unordered(sqr, count_yields(counter2, range(50)), chunksize=4)
        assert sorted(it2) == [x * x for x in range(50)]
        assert counter2[0] == 50
        # Chunked imap over a generator, in order.
        it3 = p.imap(sqr, (x for x in range(25)), chunksize=4)
        assert list(it3) == [x * x for x in range(25)]


@pytest.mark.timeout(60)
def test_unpicklable_argument_or_function_raises_at_the_call(pools):
    fp, sp = pools
    # The stdlib only reports it through the result; the exception type is the same.
    std_err = error_of(sp.apply_async(sqr, (Unpicklable(),)).get, 30)
    err = error_of(fp.apply_async, sqr, (Unpicklable(),))
    assert type(err) is type(std_err) is TypeError

    assert type(error_of(fp.map, sqr, [1, 2, Unpicklable(), 4], 1)) is TypeError
    assert type(error_of(fp.map_async, sqr, [Unpicklable()])) is TypeError
    assert type(error_of(fp.starmap_async, mul, [(1, Unpicklable())])) is TypeError
    # A lambda alone would go by value (cloudpickle); not the lock it holds.
    lock = threading.Lock()
    local = lambda x: lock  # noqa: E731
    refused = (AttributeError, pickle.PicklingError, TypeError)
    assert isinstance(error_of(fp.apply_async, local, (1,)), refused)
    assert isinstance(error_of(fp.map, local, [1]), refused)
    assert isinstance(error_of(fp.imap, local, [1]), refused)
    # An unpicklable item of an imap fails that item only, as in the stdlib.
    it = fp.imap(identity, [1, Unpicklable(), 3])
    assert next(it) == 1
    assert type(error_of(next, it)) is TypeError
    assert next(it) == 3
    # Nothing of the failed calls lingers, and the pool still works.
    assert fp.map(sqr, range(5)) == [0, 1, 4, 9, 16]
    assert not fp._cache


@pytest.mark.timeout(60)
def test_task_or_result_that_cannot_be_unpickled(pools):
    fp, _ = pools
    # The worker cannot rebuild the task: that task fails, the worker survives.
    pids = set(w.pid for w in fp._pool)
    err = error_of(fp.apply, identity, (LoadFails(),))
    assert type(err) is RuntimeError and "cannot be unpickled here" in str(err)
    # The parent cannot rebuild the result: likewise.
    err = error_of(fp.apply, make_load_fails)
    assert type(err) is RuntimeError
    assert fp.map(sqr, [1, 2]) == [1, 4]
    assert set(w.pid for w in fp._pool) == pids


@pytest.mark.timeout(60)
def test_callback_that_raises_does_not_break_the_pool(pools, capfd):
    fp, _ = pools

    def bad_callback(value):
        raise RuntimeError("callback failed")

    res = fp.apply_async(sqr, (3,), callback=bad_callback)
    assert res.get(30) == 9
    # A callback may submit more work.
    got = []
    done = threading.Event()

    def chain(value):
        fp.apply_async(sqr, (value,), callback=lambda v: (got.append(v), done.set()))

    fp.apply_async(sqr, (2,), callback=chain)
    assert done.wait(30) and got == [16]
    assert fp.apply(sqr, (5,)) == 25
    assert "callback failed" in capfd.readouterr().err


@pytest.mark.timeout(60)
def test_task_and_result_references_are_released(pools):
    import gc
    import weakref
    fp, _ = pools
    with fpool.ThreadPool(2) as tp:
        for p in (fp, tp):
            objs = [Counted() for _ in range(10)]
            refs = [weakref.ref(o) for o in objs]
            assert len(p.map(identity, objs, chunksize=3)) == 10
            assert p.apply_async(identity, (objs[0],)).get(30) is not None
            del objs
            gc.collect()
            assert wait_until(lambda refs=refs: all(r() is None for r in refs), 5)
            # The copies a process pool returned were freed as well.
            assert wait_until(lambda: Counted.alive == 0, 5)


# --- construction and lifetime ----------------------------------------------------------------

@pytest.mark.timeout(60)
def test_validation_matches_stdlib(start_method, std_ctx):
    ours, std = start_method, std_ctx
    for kwargs in ({"processes": 0}, {"processes": -1},
                   {"processes": 1, "maxtasksperchild": 0},
                   {"processes": 1, "maxtasksperchild": -1},
                   {"processes": 1, "maxtasksperchild": 0.5},
                   {"processes": 1, "maxtasksperchild": "12"},
                   {"processes": 1, "initializer": 3}):
        e1 = error_of(ours.Pool, **kwargs)
        e2 = error_of(std.Pool, **kwargs)
        assert (type(e1), str(e1)) == (type(e2), str(e2)), kwargs
    assert str(error_of(ours.Pool, 0)) == "Number of processes must be at least 1"
    assert fpool.__all__ == ["Pool", "ThreadPool"] == std_pool.__all__
    assert (fpool.INIT, fpool.RUN, fpool.CLOSE, fpool.TERMINATE) \
        == (std_pool.INIT, std_pool.RUN, std_pool.CLOSE, std_pool.TERMINATE)
    assert fpool.AsyncResult is fpool.ApplyResult
    assert fpool.TimeoutError is multiprocessing.TimeoutError


@pytest.mark.timeout(60)
def test_lifecycle_matches_stdlib(start_method, std_ctx):
    for ctx, mod in ((start_method, fpool), (std_ctx, std_pool)):
        p = ctx.Pool(2)
        assert p._state == mod.RUN and len(p._pool) == 2 and p._processes == 2
        assert all(w.daemon and "PoolWorker" in w.name for w in p._pool)
        assert repr(p) == "<%s.Pool state=RUN pool_size=2>" % mod.__name__
        with pytest.raises(NotImplementedError):
            pickle.dumps(p)
        with pytest.raises(ValueError, match="Pool is still running"):
            p.join()
        results = [p.apply_async(sqr, (i, 0.05)) for i in range(6)]
        p.close()
        assert p._state == mod.CLOSE
        with pytest.raises(ValueError, match="Pool not running"):
            p.apply_async(sqr, (1,))
        with pytest.raises(ValueError, match="Pool not running"):
            p.map(sqr, [1])
        with pytest.raises(ValueError, match="Pool not running"):
            p.imap(sqr, [1])
        p.join()
        assert [r.get(0) for r in results] == [i * i for i in range(6)]
        assert all(not w.is_alive() for w in p._pool)

        with ctx.Pool(1) as p2:
            assert p2.map(sqr, [3]) == [9]
        assert p2._state == mod.TERMINATE
        with pytest.raises(ValueError):
            with p2:
                pass
        p2.join()


@pytest.mark.timeout(60)
def test_close_join_finishes_imap_and_maxtasks_work(start_method):
    p = start_method.Pool(2, maxtasksperchild=1)
    it = p.imap(sqr, range(6))
    mr = p.map_async(sqr, range(4), chunksize=1)
    p.close()
    p.join()
    assert list(it) == [x * x for x in range(6)] and mr.get(0) == [0, 1, 4, 9]


@pytest.mark.timeout(60)
def test_resource_warning_for_unclosed_pool(start_method):
    p = start_method.Pool(1)
    p.terminate()
    p.join()
    p._state = fpool.RUN
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del p
        import gc
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning)
               and "unclosed running multiprocessing pool" in str(w.message)
               for w in caught)

    # A running pool that is dropped warns and is terminated (its workers go).
    p = start_method.Pool(1)
    pids = [w.pid for w in p._pool]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        del p
        import gc
        gc.collect()
    assert wait_until(lambda: all(pid_gone(x) for x in pids), 10)


@pytest.mark.timeout(60)
def test_maxtasksperchild_churn(start_method):
    p = start_method.Pool(2, maxtasksperchild=2)
    try:
        first = set(w.pid for w in p._pool)
        results = [p.apply_async(worker_pid, (i,)) for i in range(16)]
        pids = [r.get(60) for r in results]
        # Each worker ran at most two tasks.
        assert all(pids.count(x) <= 2 for x in set(pids))
        assert len(set(pids)) >= 8
        assert p.map(sqr, range(10), chunksize=1) == [x * x for x in range(10)]
        p._repopulate_pool()
        assert wait_until(lambda: len(p._pool) == 2
                          and all(w.is_alive() for w in p._pool), 30)
        assert first.isdisjoint(w.pid for w in p._pool)
    finally:
        p.terminate()
        p.join()


@pytest.mark.timeout(60)
def test_initializer_state(start_method, std_ctx):
    for ctx in (start_method, std_ctx):
        with ctx.Pool(2, initializer=set_state, initargs=("ready", 42)) as p:
            assert p.map(get_state, range(4), chunksize=1) \
                == [(("ready", 42), i) for i in range(4)]
            assert p.apply(get_state, (9,)) == (("ready", 42), 9)


# --- robustness ----------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_worker_killed_mid_task_fails_only_that_task_100_runs(start_method):
    # Issue 5: killing a worker mid-task never hangs the pool, 100 runs out of 100.
    start = time.monotonic()
    p = start_method.Pool(2)
    try:
        for i in range(100):
            doomed = p.apply_async(kill_self)
            other = p.apply_async(sqr, (i,))
            err = error_of(doomed.get, 30)
            assert isinstance(err, fpool.WorkerLostError)
            assert isinstance(err, multiprocessing.ProcessError)
            assert err.exitcode == -signal.SIGKILL
            assert ("pid %d" % err.pid) in str(err) and "SIGKILL" in str(err)
            assert other.get(30) == i * i
        assert p.map(sqr, range(8)) == [x * x for x in range(8)]
        # The replacement of the last victim may still be starting (the map above
        # does not need it): wait for it, as the stdlib's _pool also lags.
        assert wait_until(lambda: len(p._pool) == 2, 10)
        assert not p._cache
    finally:
        p.terminate()
        p.join()
    assert time.monotonic() - start < 100


@pytest.mark.timeout(60)
def test_worker_killed_from_outside_and_os_exit(start_method, tmp_path):
    p = start_method.Pool(2)
    try:
        path = str(tmp_path / "pid")
        res = p.apply_async(note_pid_then_sleep, (path,))
        assert wait_until(lambda: os.path.exists(path) and open(path).read(), 30)
        pid = int(open(path).read())
        os.kill(pid, signal.SIGKILL)
        err = error_of(res.get, 30)
        assert isinstance(err, fpool.WorkerLostError)
        assert err.pid == pid and err.exitcode == -signal.SIGKILL
        assert str(pid) in str(err)

        err = error_of(p.apply, exit_now, (7,))
        assert isinstance(err, fpool.WorkerLostError) and err.exitcode == 7
        assert "exit code 7" in str(err)

        # In a map only the chunk the worker held fails; later calls carry on.
        err = error_of(p.starmap, kill_self_on, [(x, 5) for x in range(10)], 1)
        assert isinstance(err, fpool.WorkerLostError)
        assert p.map(sqr, range(4)) == [0, 1, 4, 9]
        mr = p.starmap_async(kill_self_on, [(x, 3) for x in range(6)], chunksize=1)
        assert isinstance(error_of(mr.get, 30), fpool.WorkerLostError)
        it = p.imap(sqr, range(5))
        assert list(it) == [0, 1, 4, 9, 16]
    finally:
        p.terminate()
        p.join()


@pytest.mark.timeout(60)
def test_worker_death_noticed_when_its_sentinel_stays_silent(start_method):
    # A fork worker's sentinel stays silent if a process forked by another thread at
    # the wrong moment inherited its pipe end; the pool must notice the death anyway.
    # Stand-in: a sentinel that never fires.
    p = start_method.Pool(1)
    r, w = os.pipe()
    try:
        assert p.apply(sqr, (2,)) == 4
        with p._engine.lock:
            for slot in p._engine.slots:
                slot.sentinel = r
        t = time.monotonic()
        err = error_of(p.apply, kill_self)
        assert isinstance(err, fpool.WorkerLostError)
        assert err.exitcode == -signal.SIGKILL
        assert time.monotonic() - t < 10
        assert p.apply(sqr, (3,)) == 9
    finally:
        p.terminate()
        p.join()
        os.close(r)
        os.close(w)


@pytest.mark.timeout(60)
def test_terminate_while_tasks_run(start_method, tmp_path):
    p = start_method.Pool(2)
    counter = [0]
    marks = [str(tmp_path / ("task-%d" % i)) for i in range(4)]
    pending = [p.apply_async(note_pid_then_sleep, (m,)) for m in marks]
    pending.append(p.map_async(sqr, [30] * 6, chunksize=1))
    it = p.imap(sqr, count_yields(counter, itertools.count()))
    unordered = p.imap_unordered(sqr, [30] * 4)
    # Both workers are in a long task: each task notes its pid before it sleeps.
    assert wait_until(lambda: sum(os.path.exists(m) and os.path.getsize(m) > 0
                                  for m in marks) >= 2, 30)
    pids = [w.pid for w in p._pool]
    t = time.monotonic()
    p.terminate()
    assert time.monotonic() - t < 5
    for r in pending:
        err = error_of(r.get, 5)
        assert isinstance(err, fpool.PoolTerminatedError)
        assert isinstance(err, multiprocessing.ProcessError)
        assert r.ready()
    assert isinstance(error_of(next, it), fpool.PoolTerminatedError)
    assert isinstance(error_of(next, unordered), fpool.PoolTerminatedError)
    p.join()
    assert all(pid_gone(x) for x in pids)
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply_async(sqr, (1,))


@pytest.mark.timeout(60)
def test_initializer_that_raises_breaks_the_pool_cleanly(start_method, capfd):
    t = time.monotonic()
    p = start_method.Pool(2, initializer=init_raises)
    err = error_of(p.map, sqr, range(10))
    assert isinstance(err, fpool.BrokenPoolError)
    assert isinstance(err, multiprocessing.ProcessError)
    cause = err.__cause__
    assert type(cause) is ValueError and "on purpose" in str(cause)
    assert type(cause.__cause__) is fpool.RemoteTraceback
    assert isinstance(error_of(p.apply_async, sqr, (1,)), fpool.BrokenPoolError)
    assert isinstance(error_of(p.imap, sqr, [1]), fpool.BrokenPoolError)
    p.close()
    p.join()
    assert time.monotonic() - t < 30
    if start_method.get_start_method() != "forkserver":
        # The workers' tracebacks (a forkserver child writes to the stderr the fork
        # server started with, which an earlier test captured).
        assert "on purpose" in capfd.readouterr().err

    # An initializer that kills its process: the cause names the exit code.
    p = start_method.Pool(2, initializer=init_exits)
    err = error_of(p.apply, sqr, (1,))
    assert isinstance(err, fpool.BrokenPoolError)
    assert isinstance(err.__cause__, fpool.WorkerLostError)
    assert err.__cause__.exitcode == 5
    p.terminate()
    p.join()


@pytest.mark.timeout(60)
def test_failing_worker_start_in_constructor_leaks_nothing():
    started = []

    class FailingProcess:
        def __init__(self, **kwargs):
            self.name = "Fake Process"
            self.exitcode = None
            self.state = None
            started.append(self)

        def start(self):
            if len(started) > 2:
                raise OSError("induced start failure")
            self.state = "started"

        def terminate(self):
            self.state = "stopping"

        def join(self):
            if self.state == "stopping":
                self.state = "stopped"

    class FakeContext:
        Process = FailingProcess

    with pytest.raises(OSError, match="induced start failure"):
        fpool.Pool(4, context=FakeContext())
    assert [s.state for s in started] == ["stopped", "stopped", None]


SCRIPT_CTRL_C = """
    import os, signal, sys, time
    import ferromp

    def slow(path):
        open(os.path.join(path, str(os.getpid())), "w").close()
        time.sleep(60)

    if __name__ == "__main__":
        # As in a terminal: a test run started in the background inherits an ignored
        # SIGINT, which would make Ctrl-C a no-op.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ctx = ferromp.get_context(sys.argv[1])
        try:
            with ctx.Pool(2) as p:
                print("pids", *[w.pid for w in p._pool], flush=True)
                p.map(slow, [sys.argv[2]] * 4, chunksize=1)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        print("exiting", flush=True)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("to_group", [False, True], ids=["parent", "group"])
def test_ctrl_c_during_map(start_method_name, tmp_path, to_group):
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = run_script(tmp_path, SCRIPT_CTRL_C, start_method_name, str(marks))
    try:
        pids = [int(x) for x in proc.stdout.readline().split()[1:]]
        assert len(pids) == 2
        assert wait_until(lambda: len(os.listdir(marks)) == 2, 30)
        t = time.monotonic()
        if to_group:
            os.killpg(proc.pid, signal.SIGINT)   # what a terminal's Ctrl-C does
        else:
            os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - t < 10
        assert out.split() == ["interrupted", "exiting"], err
        assert proc.returncode == 0
        assert wait_until(lambda: all(pid_gone(x) for x in pids), 10)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


SCRIPT_ORPHAN = """
    import sys, time
    import ferromp

    if __name__ == "__main__":
        p = ferromp.get_context(sys.argv[1]).Pool(2)
        p.map(abs, range(4))
        print("pids", *[w.pid for w in p._pool], flush=True)
        time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_workers_die_with_their_parent(start_method_name, tmp_path):
    proc = run_script(tmp_path, SCRIPT_ORPHAN, start_method_name)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()[1:]]
        assert len(pids) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert wait_until(lambda: all(pid_gone(x) for x in pids), 5)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


@pytest.mark.timeout(60)
def test_pool_is_not_usable_in_a_forked_child():
    # Only a forked child inherits the pool object; it must not hang on it.
    fork = ferromp.get_context("fork")
    with fork.Pool(1) as p:
        r, w = ferromp.Pipe(duplex=False)
        child = fork.Process(target=_use_inherited_pool, args=(p, w))
        child.start()
        assert r.poll(30)
        assert r.recv() == ("ValueError", "Pool not running")
        child.join(30)
        assert child.exitcode == 0
        assert p.apply(sqr, (2,)) == 4


def _use_inherited_pool(p, conn):
    try:
        p.apply_async(sqr, (1,))
    except Exception as e:
        conn.send((type(e).__name__, str(e)))
    else:
        conn.send("no error")
    p.terminate()   # a no-op here: the workers are the parent's


# --- thread pools ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_threadpool_matches_stdlib():
    def run(pool_cls):
        with pool_cls(3, initializer=set_state, initargs=("t",)) as p:
            local = lambda x: x + 1  # noqa: E731  (threads need no pickling)
            got = []
            out = [
                p.map(local, range(10)),
                p.map(sqr, range(10), chunksize=3),
                p.starmap(mul, [(1, 2), (3, 4)]),
                list(p.imap(sqr, range(5))),
                sorted(p.imap_unordered(sqr, range(5), 2)),
                p.apply(get_state, (1,)),
                p.apply_async(sqr, (3,), callback=got.append).get(30),
                p.map_async(sqr, [1, 2], callback=got.append).get(30),
            ]
            e = error_of(p.apply, raise_value_error, ("thread",))
            out.append((type(e), e.args, e.__cause__))   # no RemoteTraceback for threads
            out.append(got)
            assert repr(p).endswith(".ThreadPool state=RUN pool_size=3>")
        return out

    assert run(fpool.ThreadPool) == run(std_pool.ThreadPool)
    p = ferromp.dummy.Pool(2)
    assert isinstance(p, fpool.ThreadPool)
    assert p.map(sqr, [2, 3]) == [4, 9]
    p.close()
    p.join()


@pytest.mark.timeout(30)
def test_threadpool_terminate_does_not_wait_for_busy_threads():
    p = fpool.ThreadPool(2)
    ev = threading.Event()
    started = threading.Semaphore(0)

    def busy_task():
        started.release()
        return ev.wait(20)
    busy = [p.apply_async(busy_task) for _ in range(2)]
    queued = p.map_async(sqr, range(10), chunksize=1)
    # Both threads are in their task.
    for _ in busy:
        assert started.acquire(timeout=10)
    t = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - t < 5
    for r in busy + [queued]:
        assert isinstance(error_of(r.get, 1), fpool.PoolTerminatedError)
    ev.set()
