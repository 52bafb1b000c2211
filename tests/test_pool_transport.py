"""The process pool's transport (issue 5), under fork, spawn and forkserver.

Tasks and results travel through two shared rings, a worker's claim word names the
task it holds, large pickle buffers go
through a per-pool table of shared-memory segments, and an imap over a list, tuple or
range is fed from the consumer's own thread. Results must match the stdlib's (the
oracle) and nothing may be left in /dev/shm.
"""

import collections
import os
import signal
import textwrap
import threading
import time

import numpy
import pytest

from ferromp import pool as fpool
import _helpers
from _helpers import wait_for

BIG = 3 << 20       # bytes: above the spill threshold (1 MiB)


# --- child functions ------------------------------------------------------------------

def identity(x):
    return x


def twice(x):
    return x * 2


def mul(x, y):
    return x * y


def sqr(x, wait=0.0):
    if wait:
        time.sleep(wait)
    return x * x


def make_array(n):
    return numpy.arange(n, dtype="f8")


def kill_self_with(_arg):
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def segfault(_arg=None):
    import ctypes
    import faulthandler
    faulthandler.disable()      # a fork child inherits pytest's: no dump, just the crash
    ctypes.string_at(0)


class MyInt(int):
    pass


class MyFloat(float):
    pass


LISTS = {
    "ints": list(range(-5, 100)),
    "floats": [i / 3 for i in range(100)],
    "big ints": [2 ** 70 + i for i in range(100)],
    "int64 edges": [-(2 ** 63)] * 20 + [2 ** 63 - 1] * 20,
    "bools": [True, False] * 50,
    "ints then a float": list(range(50)) + [1.5],
    "floats then an int": [0.5] * 50 + [1],
    "int subclass": [MyInt(i) for i in range(50)],
    "ints then None": list(range(50)) + [None],
    "short": [1, 2, 3],
}


def make_list(kind):
    return LISTS[kind]


# Lists whose items are all exact ints or all exact floats travel packed (not pickled)
# when they are a map chunk's result: each kind here is mapped item by item.
PACKABLE = dict(LISTS)
PACKABLE.update({
    "int32 edges": [-(2 ** 31), 2 ** 31 - 1, 0, -1] * 10,
    "just past int32": [2 ** 31, -(2 ** 31) - 1] * 10,
    "past int64": [2 ** 63, -(2 ** 63) - 1] * 10,
    "special floats": [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 5e-324] * 5,
    "ints with a bool": [1, 2, True, 3] * 5,
    "floats with a float subclass": [0.5, MyFloat(1.5)] * 5,
})


# Results of these exact types travel natively (not pickled); the others, and long
# strings and bytes, are pickled: each must come back equal and of the same type.
SCALARS = [0, -1, 2 ** 63 - 1, -(2 ** 63), 2 ** 63, -(2 ** 70), True, False, None,
           0.25, float("inf"), -0.0, "", "héllo", "a\udc80b", "x" * (1 << 17), b"",
           b"\x00\xff",
           b"y" * (1 << 17), MyInt(3), MyFloat(2.5), (1, 2)]


def scalar_at(i):
    return SCALARS[i]


def item_of(kind, i):
    return PACKABLE[kind][i]


def pair_item(kind_i):
    return PACKABLE[kind_i[0]][kind_i[1]]


_COUNTER = None


def init_counter(v):
    global _COUNTER
    _COUNTER = v


def count_call(x):
    with _COUNTER.get_lock():
        _COUNTER.value += 1
    return x


def spill_names():
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("fmp-spill-"))


@pytest.fixture(autouse=True)
def _no_spill_leftovers():
    before = spill_names()
    yield
    assert wait_for(lambda: spill_names() == before, 10), spill_names()


# --- large buffers through shared memory ------------------------------------------------

@pytest.mark.timeout(120)
def test_large_buffers_both_ways(start_method):
    a = numpy.arange(BIG // 8, dtype="f8")
    with start_method.Pool(2) as p:
        for _ in range(4):
            b = p.apply(twice, (a,))
            assert b.dtype == a.dtype and (b == a * 2).all()
        # The result lives in a pool segment: writable, and still valid after more
        # transfers reuse other segments.
        b[0] = -1.0
        assert b[0] == -1.0
        c = a[::2]                      # not contiguous: pickled in band
        assert (p.apply(identity, (c,)) == c).all()
        ba = bytearray(os.urandom(BIG))
        out = p.apply(identity, (ba,))
        assert type(out) is bytearray and out == ba
        by = bytes(ba)
        out = p.apply(identity, (by,))
        assert type(out) is bytes and out == by
        two = p.apply(identity, ((a, a[: BIG // 16], ba),))
        assert (two[0] == a).all() and (two[1] == a[: BIG // 16]).all() and two[2] == ba
        p.close()
        p.join()
    # The results outlive the pool and its segment names.
    assert (b[1:] == (a * 2)[1:]).all()


@pytest.mark.timeout(120)
def test_more_large_results_in_flight_than_segments(start_method):
    # 40 results held at once: more than the 32 table entries, so some take the ring.
    n = (BIG // 8) // 2
    with start_method.Pool(2) as p:
        held = [r.get(60) for r in [p.apply_async(make_array, (n + i,)) for i in range(40)]]
        for i, arr in enumerate(held):
            assert arr.shape == (n + i,) and arr[-1] == n + i - 1
        # Freed entries are reused.
        held = None
        for _ in range(3):
            assert p.apply(make_array, (n,))[-1] == n - 1


@pytest.mark.timeout(120)
def test_worker_killed_holding_a_large_task(start_method):
    a = numpy.ones(BIG // 8)
    with start_method.Pool(2) as p:
        r = p.apply_async(kill_self_with, (a,))
        with pytest.raises(fpool.WorkerLostError):
            r.get(60)
        assert (p.apply(twice, (a,)) == 2).all()


@pytest.mark.timeout(120)
def test_worker_segfault_fails_only_its_task(start_method):
    with start_method.Pool(2) as p:
        others = [p.apply_async(sqr, (i, 0.01)) for i in range(10)]
        r = p.apply_async(segfault)
        err = pytest.raises(fpool.WorkerLostError, r.get, 60).value
        assert err.exitcode == -signal.SIGSEGV and "SIGSEGV" in str(err)
        assert [o.get(60) for o in others] == [i * i for i in range(10)]
        assert p.map(sqr, range(30)) == [x * x for x in range(30)]


# --- list results ----------------------------------------------------------------

@pytest.mark.timeout(120)
def test_list_results_keep_their_types(start_method, std_ctx):
    with start_method.Pool(2) as p, std_ctx.Pool(2) as sp:
        for kind in LISTS:
            got = p.apply(make_list, (kind,))
            want = sp.apply(make_list, (kind,))
            assert got == want, kind
            assert [type(x) for x in got] == [type(x) for x in want], kind
        for f in (float, twice, bool):
            assert p.map(f, range(1000)) == sp.map(f, range(1000))
            got = p.map(f, range(1000))
            assert [type(x) for x in got] == [type(x) for x in sp.map(f, range(1000))]


def _same(got, want):
    # repr compares NaN and -0.0 too, and the types must match item by item.
    return ([repr(x) for x in got] == [repr(x) for x in want]
            and [type(x) for x in got] == [type(x) for x in want])


@pytest.mark.timeout(120)
def test_map_chunks_of_numbers_match_stdlib(start_method, std_ctx):
    # Chunks whose results are plain ints or floats come back packed; anything else
    # (a bool, a subclass, an int beyond 64 bits, a mix) is pickled as before.
    with start_method.Pool(2) as p, std_ctx.Pool(2) as sp:
        for kind, items in PACKABLE.items():
            args = [(kind, i) for i in range(len(items))]
            for chunksize in (None, 1, 3, 7, len(args)):
                got = p.starmap(item_of, args, chunksize)
                assert _same(got, sp.starmap(item_of, args, chunksize)), (kind, chunksize)
                got = p.map(pair_item, args, chunksize)
                assert _same(got, items), (kind, chunksize)
            got = p.map_async(pair_item, args, 5).get(60)
            assert _same(got, items), kind
            # imap's chunks are lists on the consumer's side, as in the stdlib.
            assert _same(list(p.imap(pair_item, args, 4)), items), kind
        seen = []
        r = p.map_async(twice, range(1000), 9, callback=seen.append)
        assert r.get(60) == [x * 2 for x in range(1000)]
        assert wait_for(lambda: seen, 10) and seen[0] == [x * 2 for x in range(1000)]


@pytest.mark.timeout(120)
def test_scalar_results_match_stdlib(start_method, std_ctx):
    idx = list(range(len(SCALARS)))
    with start_method.Pool(2) as p, std_ctx.Pool(2) as sp:
        want = sp.map(scalar_at, idx, 1)
        assert _same(p.map(scalar_at, idx, 1), want)
        assert _same(list(p.imap(scalar_at, idx)), want)
        assert _same([p.apply(scalar_at, (i,)) for i in idx], want)


def kill_on_seven(x):
    if x == 7:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
    return x * 2


def pair_or_raise(x):
    if x % 5 == 4:
        raise KeyError(x)
    return (x, x) if x % 3 == 0 else x


@pytest.mark.timeout(120)
def test_calls_run_by_the_core_match_stdlib(start_method, std_ctx):
    # Plain calls with plain results run in the core's serve loop; a tuple result, an
    # exception or a churning worker goes back to the Python loop mid-stream.
    items = list(range(60))
    with start_method.Pool(2) as p, std_ctx.Pool(2) as sp:
        for f in (twice, pair_or_raise):
            got = [p.apply_async(f, (x,)) for x in items]
            want = [sp.apply_async(f, (x,)) for x in items]
            for g, w in zip(got, want):
                g.wait(60)
                w.wait(60)
                assert g.successful() == w.successful()
                if g.successful():
                    assert g.get() == w.get()
                else:
                    assert repr(pytest.raises(KeyError, g.get).value) == repr(
                        pytest.raises(KeyError, w.get).value)
        assert list(p.imap(twice, items)) == [x * 2 for x in items]
        with pytest.raises(KeyError):
            p.map(pair_or_raise, items, 1)
    with start_method.Pool(2, maxtasksperchild=3) as p:
        assert p.map(twice, items, 1) == [x * 2 for x in items]
        assert sorted(p.imap_unordered(twice, items)) == [x * 2 for x in items]


@pytest.mark.timeout(120)
def test_worker_killed_in_a_core_run_call(start_method):
    with start_method.Pool(2) as p:
        r = p.map_async(kill_on_seven, range(20), 1)
        with pytest.raises(fpool.WorkerLostError):
            r.get(60)
        assert p.map(twice, range(50), 1) == [x * 2 for x in range(50)]


@pytest.mark.timeout(120)
def test_bound_builtin_method_sees_its_objects_changes(start_method, std_ctx):
    # A function's pickle is cached, but not a bound builtin method's: it carries its
    # object's state (found by a review helper: dict.get saw the dict's old contents).
    with start_method.Pool(2) as p, std_ctx.Pool(2) as sp:
        got, want = [], []
        for pool, out in ((p, got), (sp, want)):
            d = {1: "a"}
            out.append(pool.apply_async(d.get, (1,)).get(60))
            d[1] = "b"
            out.append(pool.apply_async(d.get, (1,)).get(60))
            out.append(pool.map(d.get, [1, 1, 1]))
            d[1] = "c"
            out.append(list(pool.imap(d.get, [1, 1])))
        assert got == want == ["a", "b", ["b", "b", "b"], ["c", "c"]]


class LenLies:
    """An iterable whose len() is off by ``lie`` from what it yields."""

    def __init__(self, n, lie):
        self.n, self.lie = n, lie

    def __len__(self):
        return self.n + self.lie

    def __iter__(self):
        return iter(range(self.n))


@pytest.mark.timeout(120)
def test_map_over_a_wrong_len(start_method, std_ctx):
    # Chunks are laid out by len(). A chunk past a short len() grows the list, as the
    # stdlib's slice assignment does, and the result waits for every chunk the
    # iterable yielded (the stdlib counts len()'s chunks: with chunksize=1 it returns
    # before the last result, and it hangs when len() is too long). A len() too long
    # leaves the missing tail None.
    want = [x * 2 for x in range(20)]
    with start_method.Pool(2) as p, std_ctx.Pool(2) as sp:
        for lie in (-1, -3):
            for chunksize in (None, 1, 5, 7):
                got = p.map_async(twice, LenLies(20, lie), chunksize).get(60)
                assert got == want, (lie, chunksize)
        # Where the stdlib's count of chunks happens to be right, the two agree.
        assert p.map(twice, LenLies(20, -1), 5) == sp.map(twice, LenLies(20, -1), 5)
        assert p.map(twice, LenLies(20, 2), 5) == want + [None, None]


def test_packed_ring_messages_in_one_process():
    from ferromp import _core
    import pickle
    ring = _core.PoolRing(1 << 16, _core.Segment(64 * 8), 1)
    assert ring.put(5, [1, -2, 3], plain=True)
    assert ring.put(6, [2 ** 40, 1], plain=True)
    assert ring.put(7, [0.5, float("inf")], plain=True)
    for refused in ([], [1, 2.0], [True], [2 ** 64], ["a"]):
        assert not ring.put(8, refused, plain=True)
    def take():
        got = []
        assert ring.take_into(pickle.loads, 1, got.append) == 1
        return got[0]
    tag, ok, packed = take()
    assert (tag, ok, len(packed), packed.tolist()) == (5, True, 3, [1, -2, 3])
    target = ["x"] * 5
    packed.store(target, 2)
    assert target == ["x", "x", 1, -2, 3]
    with pytest.raises(IndexError):
        packed.store(target, 3)
    assert target == ["x", "x", 1, -2, 3]
    assert take()[2].tolist() == [2 ** 40, 1]
    assert take()[2].tolist() == [0.5, float("inf")]
    assert ring.take_into(pickle.loads, 1, [].append) == 0
    # take_into appends what is there, up to its limit, without waiting unless
    # told to.
    assert ring.put(1, "one", plain=True) and ring.put(2, None, plain=True)
    ring.put(3, pickle.dumps((1, 2)))
    assert not ring.put(4, 2 ** 64, plain=True)
    into = collections.deque([(0, True, "before")])
    assert ring.take_into(pickle.loads, 2, into.append) == 2
    assert list(into) == [(0, True, "before"), (1, True, "one"), (2, True, None)]
    into.clear()
    assert ring.take_into(pickle.loads, 9, into.append) == 1
    assert list(into) == [(3, True, (1, 2))]
    assert ring.take_into(pickle.loads, 9, into.append) == 0
    t = time.monotonic()
    assert ring.take_into(pickle.loads, 9, into.append, True, 0.05) == 0
    assert time.monotonic() - t >= 0.04 and len(into) == 1


def test_results_interrupted_while_unpickled_are_kept():
    """A KeyboardInterrupt raised while a result is unpickled: the results taken before
    it are kept, that one comes back as a failure carrying the interrupt, the rest stay
    in the ring, and the interrupt is raised."""
    from ferromp import _core
    import pickle
    ring = _core.PoolRing(1 << 16, _core.Segment(64 * 8), 1)
    for tag, value in ((1, "a"), (2, "b"), (3, "c")):
        ring.put(tag, pickle.dumps(value))

    def loads(data, **kw):
        value = pickle.loads(data, **kw)
        if value == "b":
            raise KeyboardInterrupt("while unpickling b")
        return value
    into = collections.deque()
    with pytest.raises(KeyboardInterrupt, match="while unpickling b"):
        ring.take_into(loads, 9, into.append)
    (t1, ok1, v1), (t2, ok2, v2) = into
    assert (t1, ok1, v1) == (1, True, "a")
    assert (t2, ok2, type(v2)) == (2, False, KeyboardInterrupt)
    into.clear()
    assert ring.take_into(pickle.loads, 9, into.append) == 1
    assert list(into) == [(3, True, "c")]


INTERRUPT_AT_ROUTE = textwrap.dedent("""
    import sys, time
    import ferromp

    def f(x):
        return x

    def interrupt_route(frame, event, arg):
        # The pending-signal check at a function's start is where Ctrl-C lands after
        # the results are taken from the ring and before they are routed.
        if event == "call" and frame.f_code.co_name == "_route" and not fired:
            fired.append(1)
            raise KeyboardInterrupt("before routing")

    fired = []
    if __name__ == "__main__":
        with ferromp.get_context(sys.argv[1]).Pool(2) as p:
            p.map(f, range(10))
            rs = [p.apply_async(f, (i,)) for i in range(2000)]
            sys.settrace(interrupt_route)
            try:
                rs[-1].get(30)
            except KeyboardInterrupt as e:
                print("interrupted:", e, flush=True)
            sys.settrace(None)
            got = [r.get(30) for r in rs]
            print("all results:", got == list(range(2000)), flush=True)
            print("pool answers:", p.apply(f, (7,)), flush=True)
        m = ferromp.get_context(sys.argv[1]).Pool(2)
        it = m.imap(f, range(3000), chunksize=1)
        sys.settrace(interrupt_route)
        fired.clear()
        try:
            for _ in it:
                pass
        except KeyboardInterrupt as e:
            print("interrupted:", e, flush=True)
        sys.settrace(None)
        m.close()
        m.join()
        print("joined", flush=True)
""")


@pytest.mark.timeout(120)
def test_ctrl_c_between_taking_and_routing_loses_no_result(tmp_path, start_method):
    script = tmp_path / "interrupt_route.py"
    script.write_text(INTERRUPT_AT_ROUTE)
    r = _helpers.run_script([str(script), start_method.get_start_method()],
                            cwd=tmp_path, timeout=90)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "interrupted: before routing", "all results: True", "pool answers: 7",
        "interrupted: before routing", "joined"], r.stderr


# --- chunking and submission ------------------------------------------------------------

@pytest.mark.timeout(120)
def test_map_of_sequences_and_iterators_matches_stdlib(start_method, std_ctx):
    sources = [
        lambda: range(1000),
        lambda: list(range(1000)),
        lambda: tuple(range(1000)),
        lambda: (x for x in range(1000)),
        lambda: "abcdef" * 50,
        lambda: range(0),
        lambda: range(5, 700, 7),
    ]
    with start_method.Pool(2) as p, std_ctx.Pool(2) as sp:
        for src in sources:
            for chunksize in (None, 1, 7, 5000):
                assert p.map(twice, src(), chunksize) == sp.map(twice, src(), chunksize)
        # Items the core pickles itself (plain scalars) mixed with others.
        mixed = [0, -1, 255, 65536, 2 ** 31, -(2 ** 63), 2 ** 70, 1.5, float("inf"), "",
                 "é" * 300, b"\0" * 300, None, True, False, [2], (1, 2), MyInt(3),
                 {"k": 1}] * 5
        for src in (mixed, tuple(mixed)):
            got = p.map(identity, src, 1)
            assert got == sp.map(identity, src, 1)
            assert [type(x) for x in got] == [type(x) for x in src]
            assert list(p.imap(identity, src)) == list(src)
            assert sorted(map(repr, p.imap_unordered(identity, src))) == \
                sorted(map(repr, src))
        pairs = [(i, i + 1) for i in range(300)]
        for chunksize in (None, 1, 4):
            assert p.starmap(mul, pairs, chunksize) == sp.starmap(mul, pairs, chunksize)
            # An item that is not a tuple fails the whole starmap, as in the stdlib.
            for pool in (p, sp):
                with pytest.raises(TypeError):
                    pool.starmap(mul, pairs[:3] + [5] + pairs[3:], chunksize)
        r = p.map_async(sqr, range(100), 1, callback=lambda v: None)
        assert r.get(60) == [x * x for x in range(100)]


@pytest.mark.timeout(120)
def test_imap_over_a_list_is_bounded_then_finished_by_close(start_method):
    v = start_method.Value("i", 0)
    items = list(range(5000))
    p = start_method.Pool(2, init_counter, (v,))
    try:
        it = p.imap(count_call, items)
        for k in range(200):
            assert next(it) == k
        time.sleep(0.5)
        # The look-ahead is bounded (max(64, 8 * processes) plus a batch).
        assert v.value <= 200 + 64 + 32
        it2 = p.imap_unordered(count_call, tuple(range(300)))
        assert sorted(it2) == list(range(300))
        p.close()
        p.join()
        # After close(), the feeder ran the rest without a consumer, as the stdlib does.
        assert v.value == 5000 + 300
        assert list(it) == items[200:]
    finally:
        p.terminate()


# --- who collects ------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_callbacks_run_off_the_callers_thread(start_method, std_ctx):
    for ctx in (start_method, std_ctx):
        names = []

        def note(_value, names=names):
            names.append(threading.current_thread().name)

        with ctx.Pool(2) as p:
            r = p.apply_async(sqr, (3,), callback=note)
            assert r.get(60) == 9
            m = p.map_async(sqr, range(10), callback=note)
            assert m.get(60) == [x * x for x in range(10)]
        assert len(names) == 2 and threading.current_thread().name not in names


@pytest.mark.timeout(120)
def test_many_threads_waiting_on_their_own_results(start_method):
    with start_method.Pool(2) as p:
        results = [p.apply_async(sqr, (i, 0.01)) for i in range(40)]
        out = {}

        def wait(i):
            out[i] = results[i].get(60)

        threads = [threading.Thread(target=wait, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert out == {i: i * i for i in range(40)}
        it = p.imap(sqr, range(200))
        got = []
        t = threading.Thread(target=lambda: got.extend(it))
        t.start()
        assert p.map(sqr, range(200), 1) == [x * x for x in range(200)]
        t.join(60)
        assert got == [x * x for x in range(200)]


@pytest.mark.timeout(120)
def test_idle_worker_killed_loses_nothing(start_method):
    with start_method.Pool(2) as p:
        assert p.map(sqr, range(10)) == [x * x for x in range(10)]
        victim = p._pool[0].pid
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: len(p._pool) == 2
                        and victim not in [w.pid for w in p._pool], 30)
        # Queued work is not lost while the other worker is busy either.
        slow = p.apply_async(sqr, (7, 0.5))
        queued = [p.apply_async(sqr, (i,)) for i in range(50)]
        other = [w.pid for w in p._pool]
        os.kill(other[1], signal.SIGKILL)
        done = 0
        for i, r in enumerate(queued):
            try:
                assert r.get(60) == i * i
                done += 1
            except fpool.WorkerLostError:
                pass        # the one task the killed worker held, if any
        assert done >= 49
        try:
            assert slow.get(60) == 49
        except fpool.WorkerLostError:
            assert done == 50
        assert p.map(sqr, range(20)) == [x * x for x in range(20)]
