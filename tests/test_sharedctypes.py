"""Tests for ferromp.sharedctypes and ferromp.heap, with the stdlib as oracle.

Cross-process behaviour runs under fork, spawn and forkserver (the ``start_method``
fixture of conftest.py). Child targets are module-level functions so they pickle by
reference. The oracle for what a child does to shared objects is the same function
applied, in this process, to the stdlib's objects built from the same arguments.
"""

import ctypes
import multiprocessing
import multiprocessing.heap as std_heap
import multiprocessing.sharedctypes as std_sct
import os
import pickle

import pytest
from _helpers import run_to_completion

import ferromp
from ferromp import heap
from ferromp import sharedctypes

START = 30.0

# One initial value per type code the stdlib accepts.
INITIAL = {
    'c': b'x', 'u': 'y', 'b': -5, 'B': 250, 'h': -300, 'H': 60000, 'i': -70000,
    'I': 4000000000, 'l': -(2 ** 40), 'L': 2 ** 63, 'q': -(2 ** 62), 'Q': 2 ** 64 - 2,
    'f': 1.5, 'd': -2.25,
}


def run(ctx, target, *args):
    run_to_completion(ctx, target, *args, timeout=START)


class Point(ctypes.Structure):
    _fields_ = [('x', ctypes.c_int), ('y', ctypes.c_double)]


#
# What children do. Each is also applied to stdlib objects, in process, as the oracle.
#

def _bump(code, v):
    if code == 'c':
        v.value = b'z'
    elif code == 'u':
        v.value = 'w'
    elif code in 'fd':
        v.value = v.value * 3 + 0.5
    else:
        v.value = v.value // 2 + 1


def change_values(values):
    for code, v in values:
        _bump(code, v)


def change_arrays(arrays):
    for code, a in arrays:
        if code == 'c':
            a[0] = b'q'
            a[1:3] = b'rs'
        elif code == 'u':
            a[0] = 'q'
            a[1:3] = 'rs'
        else:
            a[0] = a[1]
            a[2:4] = a[3:5]
            a[-1] = a[0]


def change_strings(s, raw):
    s.value = b'hello'
    raw.raw = b'ab\x00cd'


def change_sync(v, a, p):
    with v.get_lock():
        v.value += 1
    a[1] = 42
    a[2:4] = [7, 8]
    p.x = 11
    p.y = p.y * 2


def count(v, n):
    for _ in range(n):
        with v.get_lock():
            v.value += 1


def fill_buffer(wrapper, byte):
    mv = wrapper.create_memoryview()
    mv[:] = bytes([byte]) * len(mv)


def hold_lock(v, held, seconds):
    with v.get_lock():
        held.set()
        import time
        time.sleep(seconds)
        v.value = 123


def check_lock_object(v, lock):
    assert v.get_lock() is not None
    assert v.acquire()
    v.release()
    with lock:
        # A plain Lock is not re-entrant: under it, go through get_obj().
        assert not lock.acquire(False)
        v.get_obj().value = 98
    v.value += 1


#
# Tests
#

@pytest.mark.timeout(120)
def test_value_every_typecode_across_processes(start_method):
    ours = [(c, start_method.Value(c, INITIAL[c])) for c in INITIAL]
    theirs = [(c, std_sct.Value(c, INITIAL[c])) for c in INITIAL]
    for (c, v), (_, s) in zip(ours, theirs):
        assert v.value == s.value, c
        assert type(v.get_obj()) is type(s.get_obj()), c
    run(start_method, change_values, ours)
    change_values(theirs)
    for (c, v), (_, s) in zip(ours, theirs):
        assert v.value == s.value, c


@pytest.mark.timeout(120)
def test_array_every_typecode_across_processes(start_method):
    def init(c):
        if c == 'c':
            return b'abcdef'
        if c == 'u':
            return 'abcdef'
        if c in 'fd':
            return [0.5 * i for i in range(6)]
        return list(range(1, 7))

    ours = [(c, start_method.Array(c, init(c))) for c in INITIAL]
    theirs = [(c, std_sct.Array(c, init(c))) for c in INITIAL]
    run(start_method, change_arrays, ours)
    change_arrays(theirs)
    for (c, a), (_, s) in zip(ours, theirs):
        assert a[:] == s[:], c
        assert a[::-1] == s[::-1], c
        assert len(a) == len(s)
        assert list(a) == list(s)


@pytest.mark.timeout(60)
def test_zero_filled_and_sized_by_length():
    for c in INITIAL:
        a = sharedctypes.RawArray(c, 10)
        s = std_sct.RawArray(c, 10)
        assert a[:] == s[:]
        assert type(a) is type(s)
        assert sharedctypes.RawValue(c).value == std_sct.RawValue(c).value


@pytest.mark.timeout(60)
def test_ctypes_types_and_structures():
    v = sharedctypes.Value(ctypes.c_ulonglong, 2 ** 64 - 1)
    assert v.value == 2 ** 64 - 1
    p = sharedctypes.Value(Point, 3, 2.5)
    assert (p.x, p.y) == (3, 2.5)
    assert type(p).__name__ == 'SynchronizedPoint'
    p.x = 5
    assert p.get_obj().x == 5
    a = sharedctypes.RawArray(Point, 2)
    a[1].y = 1.25
    assert a[1].y == 1.25


@pytest.mark.timeout(60)
def test_lock_false_returns_raw_ctypes():
    for c in 'iLd':
        v = sharedctypes.Value(c, INITIAL[c], lock=False)
        s = std_sct.Value(c, INITIAL[c], lock=False)
        assert type(v) is type(s)
        assert not hasattr(v, 'get_lock')
        a = sharedctypes.Array(c, 3, lock=False)
        assert type(a) is type(std_sct.Array(c, 3, lock=False))


@pytest.mark.timeout(60)
def test_errors_match_stdlib():
    def outcome(fn, *args, **kw):
        try:
            fn(*args, **kw)
        except Exception as e:
            return type(e), str(e)
        return 'ok'

    cases = [
        ('Value', ('x', 1), {}),
        ('Value', ('i', 1), {'lock': 'navalue'}),
        ('Array', ('i', 3), {'lock': 'navalue'}),
        ('Value', ('i', 'a'), {}),
        ('Array', ('i', ['a']), {}),
        ('RawArray', ('i', -1), {}),
        ('RawValue', ('z',), {}),
    ]
    for name, args, kw in cases:
        assert outcome(getattr(sharedctypes, name), *args, **kw) == \
            outcome(getattr(std_sct, name), *args, **kw), (name, args, kw)
    # Outside of process start, pickling refuses as the stdlib does.
    from multiprocessing.reduction import ForkingPickler as StdPickler

    from ferromp.reduction import ForkingPickler
    for mod, pickler in ((sharedctypes, ForkingPickler), (std_sct, StdPickler)):
        with pytest.raises(RuntimeError, match='inheritance'):
            pickle.dumps(mod.Value('i', 1))
        with pytest.raises(RuntimeError, match='inheritance'):
            pickler.dumps(mod.RawValue('i', 1))


@pytest.mark.timeout(60)
def test_get_lock_get_obj_and_given_locks(start_method):
    v = start_method.Value('i', 5)
    assert type(v.get_lock()) is type(start_method.RLock())
    assert isinstance(v.get_obj(), ctypes.c_int)
    assert repr(v) == '<Synchronized wrapper for c_int(5)>'
    lock = start_method.Lock()
    v2 = start_method.Value('i', 5, lock=lock)
    assert v2.get_lock() is lock
    a = start_method.Array('i', 3, lock=lock)
    assert a.get_lock() is lock
    assert start_method.Value('i', 1, lock=None).get_lock() is not None
    # A lock of another kind is used as it is.
    import threading
    tl = threading.Lock()
    v3 = sharedctypes.Value('i', 1, lock=tl)
    assert v3.get_lock() is tl
    with v3:
        assert tl.locked()
    v3.value = 4
    assert v3.value == 4 and not tl.locked()
    run(start_method, check_lock_object, v2, lock)
    assert v2.value == 99


@pytest.mark.timeout(60)
def test_synchronized_value_holds_lock_recursively():
    v = sharedctypes.Value('i', 0)
    with v.get_lock():
        v.value += 1  # re-enters the RLock
        with v:
            v.value += 1
    assert v.value == 2
    assert v.acquire()
    v.release()


@pytest.mark.timeout(120)
def test_char_arrays_value_and_raw(start_method):
    s = start_method.Array('c', 10)
    raw = start_method.Array(ctypes.c_char, b'0123456789')
    assert type(s).__name__ == 'SynchronizedString'
    run(start_method, change_strings, s, raw)
    oracle_s, oracle_raw = std_sct.Array('c', 10), std_sct.Array('c', b'0123456789')
    change_strings(oracle_s, oracle_raw)
    assert (s.value, s.raw) == (oracle_s.value, oracle_s.raw)
    assert (raw.value, raw.raw) == (oracle_raw.value, oracle_raw.raw)
    assert raw.raw == b'ab\x00cd56789'


@pytest.mark.timeout(120)
def test_copy_and_synchronized(start_method):
    base = sharedctypes.RawValue('d', 1.5)
    dup = sharedctypes.copy(base)
    assert dup.value == 1.5 and ctypes.addressof(dup) != ctypes.addressof(base)
    base.value = 3.0
    assert dup.value == 1.5
    sv = sharedctypes.synchronized(sharedctypes.RawValue('i', 1), ctx=start_method)
    sa = sharedctypes.synchronized(sharedctypes.RawArray('i', 5), ctx=start_method)
    sp = sharedctypes.synchronized(sharedctypes.copy(sharedctypes.RawValue(Point, 2, 4.0)),
                                   ctx=start_method)
    assert type(sa).__name__ == 'SynchronizedArray'
    with pytest.raises(AssertionError, match='already synchronized'):
        sharedctypes.synchronized(sv)
    run(start_method, change_sync, sv, sa, sp)
    assert (sv.value, sa[:], sp.x, sp.y) == (2, [0, 42, 7, 8, 0], 11, 8.0)


@pytest.mark.timeout(180)
def test_counter_four_processes_exact(start_method):
    v = start_method.Value('i', 0)
    n = 2000
    procs = [start_method.Process(target=count, args=(v, n)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    assert v.value == 4 * n


@pytest.mark.timeout(60)
def test_buffer_wrapper_shared_with_child(start_method):
    w = heap.BufferWrapper(10000)
    mv = w.create_memoryview()
    assert len(mv) == 10000 and not mv.readonly
    mv[:] = b'\x00' * 10000
    run(start_method, fill_buffer, w, 7)
    assert bytes(w.create_memoryview()) == b'\x07' * 10000


@pytest.mark.timeout(60)
def test_heap_bookkeeping_like_stdlib():
    for mod in (heap, std_heap):
        h = mod.Heap()
        h._DISCARD_FREE_SPACE_LARGER_THAN = 0
        blocks = [h.malloc(n) for n in (1, 100, 5000, 8, 0, 70000)]
        for (_arena, start, stop) in blocks:
            assert stop - start >= 1 and start % 8 == 0
        assert h._n_mallocs == 6
        for b in blocks[::2] + blocks[1::2]:
            h.free(b)
        assert h._n_frees == 6
        assert not h._arenas and not h._allocated_blocks and not h._len_to_seq
    with pytest.raises(ValueError):
        heap.BufferWrapper(-1)


@pytest.mark.timeout(60)
def test_memory_is_a_memfd_not_a_file():
    before = set(os.listdir('/dev/shm'))
    w = heap.BufferWrapper(100)
    fd = w._state[0][0].fd
    assert os.readlink('/proc/self/fd/%d' % fd).startswith('/memfd:ferromp-segment')
    assert set(os.listdir('/dev/shm')) - before == set()


@pytest.mark.timeout(60)
def test_reexported_from_context():
    assert ferromp.Value is not None
    v = ferromp.Value('i', 3)
    assert isinstance(v, sharedctypes.Synchronized)
    assert isinstance(ferromp.RawArray('i', 2), ctypes.Array)
    assert multiprocessing.Value('i', 3).value == v.value


@pytest.mark.timeout(120)
def test_access_waits_for_a_lock_held_elsewhere(start_method):
    import time
    v = start_method.Value('i', 0)
    a = start_method.Array('i', 3, lock=v.get_lock())
    held = start_method.Event()
    p = start_method.Process(target=hold_lock, args=(v, held, 0.5))
    p.start()
    assert held.wait(START)
    t0 = time.monotonic()
    assert v.value == 123  # blocks until the child lets go
    assert time.monotonic() - t0 > 0.2
    assert a[0] == 0
    p.join(START)
    assert p.exitcode == 0


@pytest.mark.timeout(60)
def test_errors_inside_the_lock_release_it():
    v = sharedctypes.Value('i', 0)
    a = sharedctypes.Array('i', 3)
    with pytest.raises(TypeError):
        v.value = 1.5
    with pytest.raises(IndexError):
        a[5]
    with pytest.raises(TypeError):
        a[0] = 'x'
    lock = v.get_lock()
    assert lock.acquire(False)  # nothing left held
    lock.release()
    assert a.get_lock().acquire(False)
    a.get_lock().release()
    # Error messages are ctypes' own, as in the stdlib.
    s = std_sct.Value('i', 0)
    for obj in (v, s):
        with pytest.raises(TypeError) as info:
            obj.value = 'x'
    assert 'int' in str(info.value)


@pytest.mark.timeout(60)
def test_scalar_stores_convert_as_ctypes_does():
    # Integer and float scalars are read and written by the native cell, not ctypes:
    # wrap-around, rounding to float32, bool, __index__ and the errors must still be
    # ctypes' own.
    class Idx:
        def __index__(self):
            return 7

    values = [0, 5, -3, 2 ** 31, 2 ** 40 + 7, 2 ** 63, -2 ** 63, 2 ** 70 + 1, -1,
              True, Idx(), 1.1, 1e300, 10 ** 400, 'x', None, b'1']
    for code in 'bBhHiIlLqQfd':
        fm, std = sharedctypes.Value(code, 0), std_sct.Value(code, 0)
        for x in values:
            seen = []
            for v in (fm, std):
                try:
                    v.value = x
                    seen.append((type(v.value), v.value))
                except Exception as e:
                    seen.append((type(e), str(e)))
            assert seen[0] == seen[1], (code, x, seen)
    # Other scalar types go through ctypes, under the lock.
    for t, x in ((ctypes.c_bool, 5), (ctypes.c_char, b'z'), (ctypes.c_wchar, 'w')):
        v = sharedctypes.Value(t)
        v.value = x
        assert v.value == std_sct.Value(t, x).value
    v = sharedctypes.Value('i', 3)
    with pytest.raises(AttributeError, match='no deleter'):
        del v.value
    assert v.value == 3
    # Arrays and structures do not grow a `value` attribute.
    assert not hasattr(sharedctypes.Array('i', 2), 'value')


@pytest.mark.timeout(60)
def test_held_rlock_is_reentered_by_the_cell():
    # `with v.get_lock(): v.value += 1` re-enters the RLock through the lock's own
    # bookkeeping: the count goes back to what it was, the lock ends up free.
    v = sharedctypes.Value('d', 0.5)
    lock = v.get_lock()
    with lock:
        v.value += 1
        assert lock._count() == 1 and lock._is_mine()
        a = sharedctypes.Array('i', 3, lock=lock)
        a[1] = 4
        assert a[1] == 4 and lock._count() == 1
    assert lock._count() == 0 and not lock._is_mine()
    assert v.value == 1.5
    # A plain Lock held by this thread is not re-entrant: an access from another
    # thread waits for it, as in the stdlib.
    import threading
    import time
    v = sharedctypes.Value('i', 0, lock=ferromp.Lock())
    got = []
    with v.get_lock():
        t = threading.Thread(target=lambda: got.append(v.value))
        t.start()
        time.sleep(0.2)
        assert got == []
        v.get_obj().value = 9
    t.join(START)
    assert got == [9]


@pytest.mark.timeout(60)
def test_lock_subclass_overriding_acquire_is_called():
    calls = []

    class Counting(type(ferromp.RLock())):
        def acquire(self, *args):
            calls.append('acquire')
            return super().acquire(*args)

        def release(self):
            calls.append('release')
            super().release()

    lock = Counting(ctx=ferromp.get_context())
    v = sharedctypes.Value('i', 1, lock=lock)
    v.value = 2
    assert v.value == 2
    assert calls == ['acquire', 'release'] * 2
