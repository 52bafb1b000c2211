"""Tests for ferromp.synchronize and ferromp._multiprocessing, with the stdlib as oracle.

Every cross-process behaviour runs under fork, spawn and forkserver (the
``start_method`` fixture of conftest.py; ``std_ctx`` is the stdlib context of the same
method). Child targets are module-level functions so they pickle by reference; a spawn
or forkserver child imports this module to find them. Shared state that the children
write (counters, flags) lives in a small memfd mapping of the test's own
(``SharedInts``), because ``Value`` is another module's. Children report through exit
codes or a one-way Pipe; none is daemonic.
"""

import errno
import inspect
import mmap
import multiprocessing.synchronize as std_sync
import os
import pickle
import signal
import sys
import threading
import time

import _multiprocessing as std_c
import pytest

import ferromp
from ferromp import _multiprocessing as fm_c
from ferromp import reduction
from ferromp import synchronize

# How long a child may take to start and reach a rendezvous on a loaded 2-core VM.
START = 30.0


def start(ctx, target, *args):
    p = ctx.Process(target=target, args=args)
    p.start()
    return p


def join_ok(*procs, timeout=START):
    for p in procs:
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join(5)
    assert [p.exitcode for p in procs] == [0] * len(procs)


class SharedInts(object):
    """n int64 in a memfd mapped MAP_SHARED: inherited over fork, passed by fd to
    spawn and forkserver children."""

    def __init__(self, n, fd=None):
        if fd is None:
            fd = os.memfd_create('test-synchronize', os.MFD_CLOEXEC)
            os.ftruncate(fd, 8 * n)
        self.fd = fd
        self.n = n
        self.map = mmap.mmap(fd, 8 * n)
        self.a = memoryview(self.map).cast('q')

    def __getitem__(self, i):
        return self.a[i]

    def __setitem__(self, i, v):
        self.a[i] = v

    def __reduce__(self):
        return _rebuild_ints, (reduction.DupFd(self.fd), self.n)


def _rebuild_ints(dupfd, n):
    return SharedInts(n, dupfd.detach())


class AddOne(object):
    """A picklable Barrier action: counts its calls in shared slot ``i``."""

    def __init__(self, ints, i):
        self.ints = ints
        self.i = i

    def __call__(self):
        self.ints[self.i] += 1


def wait_until(pred, timeout=START):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError('condition not reached in %s s' % timeout)
        time.sleep(0.005)


def outcome(fn, *args):
    """What calling ``fn`` does, comparable across ferromp and the stdlib."""
    try:
        return ('ok', fn(*args))
    except Exception as e:
        return (type(e).__name__, str(e))


#
# Child targets
#

def child_count(lock, ints, n, nested):
    for _ in range(n):
        with lock:
            if nested:
                lock.acquire()
            v = ints[0]
            os.sched_yield()          # widen the window a missing lock would expose
            ints[0] = v + 1
            if nested:
                lock.release()


def child_hold(lock, held, go):
    # Take the lock, say so, hold it until told, release it.
    lock.acquire()
    held.release()
    if not go.acquire(timeout=START):
        sys.exit(3)
    lock.release()


def child_rlock_probe(rlock, conn):
    # The parent holds rlock: this process must neither release nor acquire it.
    conn.send(outcome(rlock.release))
    conn.send(rlock.acquire(timeout=0.2))
    conn.send(rlock.acquire(timeout=START))    # the parent releases after reading
    rlock.acquire()
    conn.send(rlock._semlock._count())
    rlock.release()
    rlock.release()
    conn.send(outcome(rlock.release))


def child_release(sem):
    sem.release()


def child_wait_for(cond, ints, ready, target):
    with cond:
        ready.release()
        ok = cond.wait_for(lambda: ints[0] >= target, timeout=START)
        if not ok:
            sys.exit(2)
        ints[1] += 1


def child_cond_wait(cond, ready, woken):
    with cond:
        ready.release()
        if not cond.wait(timeout=START):
            sys.exit(2)
    woken.release()


def child_event(ev_in, ev_out, ints):
    if not ev_in.wait(START):
        sys.exit(2)
    ints[0] += 1
    ev_out.set()
    # The parent clears ev_in and then sets it again.
    while ev_in.is_set():
        time.sleep(0.001)
    if not ev_in.wait(START):
        sys.exit(3)
    ints[0] += 1


def child_barrier(barrier, ints, slot):
    # Each party records the index wait() gave it (+1, so 0 means "not yet").
    ints[slot] = barrier.wait() + 1


def child_barrier_abort(barrier, ints):
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        ints[0] += 1
    else:
        sys.exit(2)


def child_barrier_reset(barrier, ints):
    # First round: broken by the parent's reset(); second round: passes.
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        ints[0] += 1
    else:
        sys.exit(2)
    barrier.wait()
    ints[1] += 1


def child_die_holding(lock, held):
    lock.acquire()
    held.release()
    os.kill(os.getpid(), signal.SIGKILL)


def child_start_grandchild(lock, method):
    # A SemLock received by a child must be passable on to another child.
    ctx = ferromp.get_context(method)
    held = ctx.Semaphore(0)
    go = ctx.Semaphore(0)
    p = start(ctx, child_hold, lock, held, go)
    if not held.acquire(timeout=START):
        sys.exit(2)
    if lock.acquire(timeout=0.1):
        sys.exit(3)
    go.release()
    p.join(START)
    if p.exitcode != 0 or not lock.acquire(timeout=START):
        sys.exit(4)
    lock.release()


#
# The native SemLock and the _multiprocessing stand-in
#

@pytest.mark.timeout(30)
def test_c_module_surface():
    public = {n for n in dir(std_c) if not n.startswith('_')}
    assert public <= set(dir(fm_c))
    assert fm_c.flags == std_c.flags
    assert fm_c.SemLock.SEM_VALUE_MAX == std_c.SemLock.SEM_VALUE_MAX
    assert synchronize.SEM_VALUE_MAX == std_sync.SEM_VALUE_MAX
    assert (synchronize.RECURSIVE_MUTEX, synchronize.SEMAPHORE) == \
        (std_sync.RECURSIVE_MUTEX, std_sync.SEMAPHORE)
    for meth in ('acquire', 'release', '__enter__', '__exit__', '_count', '_is_mine',
                 '_get_value', '_is_zero', '_after_fork', '_rebuild', 'handle', 'kind',
                 'maxvalue', 'name'):
        assert hasattr(fm_c.SemLock, meth), meth


@pytest.mark.timeout(30)
def test_c_semlock_matches_stdlib():
    tag = '%d-%d' % (os.getpid(), time.monotonic_ns())

    def script(mod):
        out = []
        s = mod.SemLock(1, 2, 2, '/fmtest-a-' + tag, True)
        out += [s.name, s.kind, s.maxvalue, s.acquire(), s.acquire(0), s._count(),
                s._get_value(), s._is_zero(), s.acquire(False), s.acquire(True, 0),
                s.acquire(timeout=-1), s.release(), s.release(), outcome(s.release),
                s._count(), s._get_value()]
        r = mod.SemLock(0, 1, 1, '/fmtest-b-' + tag, True)
        out += [outcome(r.release), r.acquire(), r.acquire(), r._count(), r._is_mine(),
                r.__enter__(), r.__exit__(None, None, None), r.release(), r.release(),
                outcome(r.release), r._is_mine()]
        out.append(outcome(mod.SemLock, 7, 1, 1, '/fmtest-c-' + tag, True))
        out.append(outcome(mod.SemLock, 1, -1, 1, '/fmtest-d-' + tag, True))
        out.append(outcome(s.acquire, True, 'x')[0])
        # `block` is an int flag: no None, floats or huge ints.
        free = mod.SemLock(1, 1, 1, '/fmtest-f-' + tag, True)
        out.append([outcome(free.acquire, b)[0] for b in (None, 0.5, 2**80, 1, 0)])
        # Named, not unlinked: the name is taken until sem_unlink.
        name = 'fmtest-e-' + tag
        n = mod.SemLock(1, 0, 10, name, False)
        out += [n.name, outcome(mod.SemLock, 1, 0, 1, name, False),
                outcome(mod.sem_unlink, name), outcome(mod.sem_unlink, name),
                outcome(mod.sem_unlink, 'fmtest-never-' + tag)]
        return out

    assert script(fm_c) == script(std_c)


@pytest.mark.timeout(30)
def test_c_semlock_subclass_and_rebuild():
    # CPython's SemLockTests.test_semlock_subclass, plus _rebuild keeping the subclass.
    class Sub(fm_c.SemLock):
        pass

    name = 'fmtest-sub-%d' % os.getpid()
    s = Sub(1, 0, 10, name, False)
    fm_c.sem_unlink(name)
    r = Sub._rebuild(os.dup(s.handle), 1, 10, None)
    assert type(r) is Sub and r.handle != s.handle
    s.release()
    assert r._get_value() == 1 and r.acquire(False) and s._get_value() == 0
    # The handle is the new object's from the call on: closed also when it fails.
    for bad in ((0, 10), (1, 9), (7, 10)):
        fd = os.dup(s.handle)
        with pytest.raises(ValueError):
            fm_c.SemLock._rebuild(fd, bad[0], bad[1], None)
        with pytest.raises(OSError):
            os.fstat(fd)
    # Not a semaphore, not open, negative: OSError, never a crash.
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(OSError) as e:
        fm_c.SemLock._rebuild(r, 1, 10, None)
    assert e.value.errno == errno.EINVAL
    for fd in (r, -1):
        with pytest.raises(OSError) as e:
            fm_c.SemLock._rebuild(fd, 1, 10, None)
        assert (e.value.errno, e.value.strerror) == (errno.EBADF, os.strerror(errno.EBADF))


@pytest.mark.timeout(30)
def test_recover_flag_follows_the_type(start_method):
    assert start_method.Lock()._semlock.recover
    assert start_method.RLock()._semlock.recover
    assert not start_method.BoundedSemaphore(1)._semlock.recover
    assert not start_method.Semaphore(1)._semlock.recover


#
# Single-process behaviour, stdlib as oracle
#

@pytest.mark.timeout(30)
def test_all_and_names():
    assert synchronize.__all__ == std_sync.__all__
    for name in ('SemLock', 'Barrier', 'sem_unlink', 'SEM_VALUE_MAX'):
        assert hasattr(synchronize, name)
    assert synchronize.Barrier.__mro__[1] is threading.Barrier


@pytest.mark.timeout(30)
def test_lock_semantics_match_stdlib(start_method, std_ctx):
    def script(ctx):
        out = []
        lock = ctx.Lock()
        out += [repr(lock), lock.acquire(), repr(lock), lock.acquire(False),
                lock.acquire(timeout=0), lock.acquire(True, 0.01), lock.release(),
                outcome(lock.release), repr(lock)]
        with lock:
            out.append(repr(lock))
        rlock = ctx.RLock()
        out += [outcome(rlock.release), rlock.acquire(), rlock.acquire(), repr(rlock),
                rlock.release(), rlock.release(), repr(rlock), outcome(rlock.release)]
        sem = ctx.Semaphore(2)
        out += [repr(sem), sem.acquire(), sem.acquire(), sem.acquire(False),
                sem.get_value(), sem.release(), sem.release(), sem.release(),
                sem.get_value(), repr(sem)]
        bsem = ctx.BoundedSemaphore(2)
        out += [repr(bsem), bsem.acquire(), bsem.release(), outcome(bsem.release),
                bsem.get_value(), repr(bsem)]
        one = ctx.BoundedSemaphore()
        out += [one.acquire(), one.acquire(False), one.release(), outcome(one.release)]
        return out

    assert script(start_method) == script(std_ctx)


@pytest.mark.timeout(30)
def test_lock_repr_from_a_thread(start_method, std_ctx):
    def script(ctx):
        out = []
        lock, rlock = ctx.Lock(), ctx.RLock()

        def body():
            with lock, rlock:
                out.extend([repr(lock), repr(rlock)])
        t = threading.Thread(target=body, name='T1')
        t.start()
        t.join()
        lock.acquire()

        def other():
            out.append(repr(lock))
        t = threading.Thread(target=other)
        t.start()
        t.join()
        lock.release()
        return out

    assert script(start_method) == script(std_ctx)


@pytest.mark.timeout(30)
def test_condition_and_event_in_one_process(start_method, std_ctx):
    def script(ctx):
        out = []
        cond = ctx.Condition()
        out.append(outcome(cond.wait, 0))
        out.append(outcome(cond.notify))
        with cond:
            out += [cond.wait(0), cond.wait(0.01), cond.wait_for(lambda: 0, 0.01),
                    cond.wait_for(lambda: 5), repr(cond), cond.notify(), cond.notify_all()]
        ev = ctx.Event()
        out += [ev.is_set(), ev.wait(0), ev.wait(0.01), ev.set(), ev.is_set(), ev.wait(),
                ev.wait(0), ev.clear(), ev.is_set(), ev.wait(0.01)]
        out.append(repr(ev).split(' at ')[0] + repr(ev).rsplit(' ', 1)[1])
        return out

    assert script(start_method) == script(std_ctx)


@pytest.mark.timeout(30)
def test_condition_across_threads():
    ctx = ferromp.get_context('fork')
    cond = ctx.Condition(ctx.Lock())
    state = []

    def waiter():
        with cond:
            state.append(cond.wait_for(lambda: len(state) >= 1, timeout=START))

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: cond._sleeping_count.get_value() - cond._woken_count.get_value() == 3)
    with cond:
        state.append('go')
        cond.notify_all()
    for t in threads:
        t.join(START)
    assert state.count(True) == 3
    assert cond._wait_semaphore.get_value() == 0


@pytest.mark.timeout(30)
def test_timeouts(start_method):
    sem = start_method.Semaphore(0)
    # (acquire's arguments, least and most time it may take)
    for args, low, high in (((False,), 0, 0.1), ((False, 5), 0, 0.1), ((True, -1), 0, 0.1),
                            ((True, 0), 0, 0.1), ((True, 0.2), 0.19, 5)):
        t = time.monotonic()
        assert sem.acquire(*args) is False
        took = time.monotonic() - t
        assert low <= took < high, (args, took)
    t = time.monotonic()
    assert sem.acquire(timeout=0.2) is False
    assert time.monotonic() - t >= 0.19
    sem.release()
    assert sem.acquire(timeout=0.2) is True


@pytest.mark.timeout(30)
def test_lock_fast_path_is_native():
    # Lock and RLock are _core.SemLock subclasses: `with lock:` and `lock.acquire()`
    # run the native methods themselves, no Python frame.
    from ferromp import _core
    for lock in (ferromp.Lock(), ferromp.RLock(), ferromp.Semaphore(2),
                 ferromp.BoundedSemaphore(2)):
        assert lock._semlock is lock
        assert lock.acquire.__self__ is lock._semlock
        assert lock.release.__self__ is lock._semlock
        for name in ('acquire', 'release', '__enter__', '__exit__'):
            assert getattr(type(lock), name) is getattr(_core.SemLock, name), name
    assert str(inspect.signature(_core.SemLock.acquire)) == \
        '(self, /, block=True, timeout=None)'


@pytest.mark.timeout(30)
def test_acquire_arguments_past_the_fast_path():
    # The native acquire handles (), (True) and (False) itself; everything else goes
    # to the argument-checked path, with the same results.
    lock = ferromp.Lock()
    assert lock.acquire(block=True) is True
    for args, kw in (((False,), {}), ((0,), {}), ((), {'block': False}),
                     ((True, 0.05), {}), ((), {'timeout': 0}), ((1,), {'timeout': -1})):
        assert lock.acquire(*args, **kw) is False, (args, kw)
    for args, kw in (((1, 2, 3), {}), ((), {'foo': 1}), ((None,), {}),
                     ((True, 'x'), {})):
        with pytest.raises(TypeError):
            lock.acquire(*args, **kw)
    lock.release()
    with pytest.raises(ValueError, match='released too many times'):
        lock.release()
    with pytest.raises(ValueError):
        lock.__exit__(None, None, None)
    rlock = ferromp.RLock()
    with pytest.raises(AssertionError, match='not owned'):
        rlock.release()
    assert rlock.__enter__() is True and rlock.acquire(timeout=1)
    assert rlock._count() == 2
    rlock.__exit__()
    rlock.release()
    assert rlock._count() == 0 and rlock._get_value() == 1


#
# Across processes
#

@pytest.mark.timeout(120)
@pytest.mark.parametrize('kind', ['Lock', 'RLock', 'BoundedSemaphore'])
def test_mutual_exclusion(start_method, kind):
    lock = getattr(start_method, kind)()
    ints = SharedInts(1)
    n, procs = 300, 3
    ps = [start(start_method, child_count, lock, ints, n, kind == 'RLock')
          for _ in range(procs)]
    child_count(lock, ints, n, kind == 'RLock')
    join_ok(*ps, timeout=90)
    assert ints[0] == n * (procs + 1)


@pytest.mark.timeout(60)
def test_lock_held_by_another_process(start_method):
    lock = start_method.Lock()
    held, go = start_method.Semaphore(0), start_method.Semaphore(0)
    p = start(start_method, child_hold, lock, held, go)
    assert held.acquire(timeout=START)
    t = time.monotonic()
    assert lock.acquire(timeout=0.3) is False
    assert time.monotonic() - t >= 0.29
    assert lock.acquire(False) is False
    assert repr(lock) == '<Lock(owner=SomeOtherProcess)>'   # the stdlib's text
    go.release()
    assert lock.acquire(timeout=START) is True
    lock.release()
    join_ok(p)


@pytest.mark.timeout(60)
def test_lock_released_by_another_process(start_method):
    # A Lock (unlike an RLock) may be released by a process that never acquired it.
    lock = start_method.Lock()
    lock.acquire()
    join_ok(start(start_method, child_release, lock))
    assert lock.acquire(timeout=START)
    lock.release()
    # And a second release, from anywhere, is an over-release.
    p = start(start_method, child_release, lock)
    p.join(START)
    assert p.exitcode == 1


@pytest.mark.timeout(60)
def test_rlock_ownership_across_processes(start_method):
    rlock = start_method.RLock()
    r, w = start_method.Pipe(duplex=False)
    rlock.acquire()
    rlock.acquire()
    p = start(start_method, child_rlock_probe, rlock, w)
    w.close()
    msg = 'attempt to release recursive lock not owned by thread'
    assert r.poll(START) and r.recv() == ('AssertionError', msg)
    assert r.poll(START) and r.recv() is False
    assert rlock._semlock._count() == 2 and rlock._semlock._is_mine()
    rlock.release()
    rlock.release()
    assert r.poll(START) and r.recv() is True
    assert r.poll(START) and r.recv() == 2
    assert r.poll(START) and r.recv() == ('AssertionError', msg)
    join_ok(p)
    assert rlock.acquire(timeout=START)
    rlock.release()


@pytest.mark.timeout(60)
def test_semlock_passed_on_to_a_grandchild(start_method, start_method_name):
    lock = start_method.Lock()
    join_ok(start(start_method, child_start_grandchild, lock, start_method_name),
            timeout=2 * START)
    assert lock.acquire(False)
    lock.release()


@pytest.mark.timeout(60)
def test_rlock_after_fork():
    ctx = ferromp.get_context('fork')
    rlock = ctx.RLock()
    rlock.acquire()
    rlock.acquire()
    pid = os.fork()
    if pid == 0:   # pragma: no cover - child
        code = 0
        try:
            from ferromp import util
            util._run_after_forkers()
            sl = rlock._semlock
            if sl._count() != 0 or sl._is_mine() or rlock.acquire(False):
                code = 2
            else:
                try:
                    rlock.release()
                    code = 3
                except AssertionError:
                    pass
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert rlock._semlock._count() == 2
    rlock.release()
    rlock.release()


@pytest.mark.timeout(60)
def test_condition_notify_across_processes(start_method):
    cond = start_method.Condition()
    ready, woken = start_method.Semaphore(0), start_method.Semaphore(0)
    ps = [start(start_method, child_cond_wait, cond, ready, woken) for _ in range(3)]
    for _ in ps:
        assert ready.acquire(timeout=START)
    # Each has released the lock inside wait() once we can take it.
    wait_until(lambda: cond._sleeping_count.get_value()
               - cond._woken_count.get_value() == 3)
    with cond:
        cond.notify()
    assert woken.acquire(timeout=START)
    time.sleep(0.1)
    assert woken.get_value() == 0
    with cond:
        cond.notify(n=1)
    assert woken.acquire(timeout=START)
    with cond:
        cond.notify_all()
    assert woken.acquire(timeout=START)
    join_ok(*ps)
    assert cond._wait_semaphore.get_value() == 0
    with cond:
        cond.notify_all()      # nobody sleeps: returns at once
    assert repr(cond).endswith(', 0)>')


@pytest.mark.timeout(60)
def test_condition_wait_for_across_processes(start_method):
    cond = start_method.Condition(start_method.Lock())
    ints = SharedInts(2)
    ready = start_method.Semaphore(0)
    ps = [start(start_method, child_wait_for, cond, ints, ready, 3) for _ in range(2)]
    for _ in ps:
        assert ready.acquire(timeout=START)
    for _ in range(3):
        time.sleep(0.02)
        with cond:
            ints[0] += 1
            cond.notify_all()
    join_ok(*ps)
    assert ints[1] == 2


@pytest.mark.timeout(60)
def test_condition_wait_timeout(start_method):
    cond = start_method.Condition()
    with cond:
        t = time.monotonic()
        assert cond.wait(0.2) is False
        assert time.monotonic() - t >= 0.19
        t = time.monotonic()
        assert cond.wait_for(lambda: False, timeout=0.2) is False
        assert time.monotonic() - t >= 0.19
        # The lock is held again after a timed-out wait.
        assert cond._lock._semlock._is_mine()
    assert cond._wait_semaphore.get_value() == 0


@pytest.mark.timeout(60)
def test_event_across_processes(start_method):
    ev_in, ev_out = start_method.Event(), start_method.Event()
    ints = SharedInts(1)
    p = start(start_method, child_event, ev_in, ev_out, ints)
    assert ev_out.wait(0.1) is False
    ev_in.set()
    assert ev_out.wait(START) is True
    assert ints[0] == 1
    ev_in.clear()
    assert ev_in.is_set() is False
    time.sleep(0.05)
    ev_in.set()
    join_ok(p)
    assert ints[0] == 2


@pytest.mark.timeout(90)
def test_barrier_across_processes(start_method):
    ints = SharedInts(4)
    barrier = start_method.Barrier(3, action=AddOne(ints, 0), timeout=START)
    assert (barrier.parties, barrier.n_waiting, barrier.broken) == (3, 0, False)
    for _ in range(2):      # two rounds: the barrier is reusable
        ints[1] = ints[2] = 0
        ps = [start(start_method, child_barrier, barrier, ints, slot) for slot in (1, 2)]
        wait_until(lambda: barrier.n_waiting == 2)
        mine = barrier.wait()
        join_ok(*ps)
        assert sorted([mine, ints[1] - 1, ints[2] - 1]) == [0, 1, 2]
    assert ints[0] == 2          # the action ran once per round
    assert (barrier.n_waiting, barrier.broken) == (0, False)


@pytest.mark.timeout(90)
def test_barrier_abort_reset_timeout(start_method):
    ints = SharedInts(2)
    barrier = start_method.Barrier(3)
    ps = [start(start_method, child_barrier_abort, barrier, ints) for _ in range(2)]
    wait_until(lambda: barrier.n_waiting == 2)
    barrier.abort()
    join_ok(*ps)
    assert ints[0] == 2 and barrier.broken
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait()
    barrier.reset()
    assert not barrier.broken

    ints[0] = 0
    ps = [start(start_method, child_barrier_reset, barrier, ints) for _ in range(2)]
    wait_until(lambda: barrier.n_waiting == 2)
    barrier.reset()
    wait_until(lambda: ints[0] == 2)
    barrier.wait(START)
    join_ok(*ps)
    assert ints[1] == 2 and not barrier.broken

    # Nobody else comes: the wait times out and breaks the barrier for everyone.
    t = time.monotonic()
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(0.2)
    assert time.monotonic() - t >= 0.19
    assert barrier.broken
    assert threading.BrokenBarrierError is synchronize.threading.BrokenBarrierError


@pytest.mark.timeout(60)
def test_barrier_default_timeout(start_method):
    barrier = start_method.Barrier(2, timeout=0.2)
    t = time.monotonic()
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait()
    assert time.monotonic() - t >= 0.19
    single = start_method.Barrier(1)
    assert single.wait() == 0 and single.wait() == 0


#
# Robustness
#

@pytest.mark.timeout(60)
@pytest.mark.parametrize('kind', ['Lock', 'RLock'])
def test_dead_holder_is_recovered(start_method, kind):
    lock = getattr(start_method, kind)()
    held = start_method.Semaphore(0)
    p = start(start_method, child_die_holding, lock, held)
    assert held.acquire(timeout=START)
    p.join(START)
    assert p.exitcode == -signal.SIGKILL
    t = time.monotonic()
    # The stdlib would wait out the whole timeout and return False.
    assert lock.acquire(timeout=10) is True
    assert time.monotonic() - t < 5
    assert lock._semlock._is_mine()
    lock.release()
    assert lock.acquire(False)
    lock.release()


@pytest.mark.timeout(60)
def test_dead_holder_of_bounded_semaphore_is_not_recovered(start_method):
    # BoundedSemaphore(1) is released by other processes by design (Queue's hand-off),
    # so it waits like the stdlib's: the timeout ends the wait.
    sem = start_method.BoundedSemaphore(1)
    held = start_method.Semaphore(0)
    p = start(start_method, child_die_holding, sem, held)
    assert held.acquire(timeout=START)
    p.join(START)
    t = time.monotonic()
    assert sem.acquire(timeout=0.3) is False
    assert time.monotonic() - t >= 0.29
    sem.release()          # the hand-off a peer would do
    assert sem.acquire(False)


@pytest.mark.timeout(30)
@pytest.mark.parametrize('kind', ['Lock', 'RLock', 'Semaphore', 'BoundedSemaphore',
                                  'Condition', 'Event', 'Barrier'])
def test_pickling_outside_process_start(start_method, std_ctx, kind):
    args = (2,) if kind == 'Barrier' else ()

    def err(ctx):
        with pytest.raises(RuntimeError) as e:
            pickle.dumps(getattr(ctx, kind)(*args))
        return str(e.value)

    msg = err(start_method)
    assert msg == err(std_ctx)
    assert msg.endswith('objects should only be shared between processes '
                        'through inheritance')
    if kind == 'Lock':
        assert msg == ('Lock objects should only be shared between processes '
                       'through inheritance')


@pytest.mark.timeout(60)
def test_fork_context_lock_refused_by_spawned_child(non_fork_start_method):
    lock = ferromp.get_context('fork').Lock()
    p = non_fork_start_method.Process(target=child_release, args=(lock,))
    with pytest.raises(RuntimeError, match='A SemLock created in a fork context'):
        p.start()


def _interrupt_main_after(delay):
    main = threading.main_thread().ident

    def fire():
        time.sleep(delay)
        signal.pthread_kill(main, signal.SIGINT)
    t = threading.Thread(target=fire)
    t.start()
    return t


@pytest.mark.timeout(30)
@pytest.mark.parametrize('kind', ['Lock', 'RLock', 'Semaphore'])
def test_ctrl_c_that_misses_the_sleep_is_still_seen(kind):
    # A signal that arrives while the waiter is not inside the futex call (here: one
    # delivered to another thread) only sets Python's flag; the wait must still notice
    # it (at the end of its current sleep slice) instead of sleeping on forever.
    ctx = ferromp.get_context('fork')
    lock = getattr(ctx, kind)(0) if kind == 'Semaphore' else getattr(ctx, kind)()
    if kind != 'Semaphore':
        threading.Thread(target=lock.acquire).start()
        while lock._get_value():
            time.sleep(0.01)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)

    def fire():
        time.sleep(0.3)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    try:
        t = threading.Thread(target=fire)
        t.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            lock.acquire()
        assert time.monotonic() - t0 < 5
        t.join()
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.timeout(60)
@pytest.mark.parametrize('what', ['lock', 'lock-with', 'value', 'semaphore-timeout',
                                  'condition', 'event'])
def test_ctrl_c_interrupts_a_blocked_wait(what):
    ctx = ferromp.get_context('fork')
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if what == 'lock':
            lock = ctx.Lock()
            lock.acquire()
            block = lock.acquire
        elif what == 'lock-with':
            lock = ctx.RLock()
            # Held by another thread: `with` blocks in the native __enter__.
            threading.Thread(target=lock.acquire).start()
            while lock._get_value():
                time.sleep(0.01)

            def block():
                with lock:
                    pass
        elif what == 'value':
            v = ctx.Value('i', 0, lock=ctx.Lock())
            v.get_lock().acquire()
            block = lambda: v.value
        elif what == 'semaphore-timeout':
            block = lambda: ctx.Semaphore(0).acquire(timeout=30)
        elif what == 'condition':
            cond = ctx.Condition()
            cond.acquire()
            block = cond.wait
        else:
            block = ctx.Event().wait
        t0 = time.monotonic()
        timer = _interrupt_main_after(0.3)
        with pytest.raises(KeyboardInterrupt):
            block()
        timer.join()
        assert time.monotonic() - t0 < 10
        if what == 'condition':
            # wait() took the lock back on its way out, as threading's does.
            assert cond._lock._semlock._is_mine()
            cond.release()
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.timeout(60)
def test_signal_handler_that_returns_resumes_the_wait():
    # EINTR with a handler that does not raise: the wait goes on to its deadline.
    hits = []
    old = signal.signal(signal.SIGUSR1, lambda *a: hits.append(1))
    try:
        sem = ferromp.Semaphore(0)
        main = threading.main_thread().ident
        timer = threading.Timer(0.1, signal.pthread_kill, (main, signal.SIGUSR1))
        timer.start()
        t = time.monotonic()
        assert sem.acquire(timeout=0.5) is False
        assert time.monotonic() - t >= 0.49
        timer.join()
        assert hits == [1]
    finally:
        signal.signal(signal.SIGUSR1, old)
