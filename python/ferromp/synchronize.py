"""Locks, semaphores, conditions, events and barriers shared between processes: the
stdlib's ``multiprocessing.synchronize``.

Every primitive rests on ``_core.SemLock``, a futex-based semaphore in a memfd
(``src/sync/``), as the stdlib composes them on ``_multiprocessing.SemLock``:
``Lock``, ``RLock``, ``Semaphore`` and ``BoundedSemaphore`` are one SemLock each (here
subclasses of it, so that their hot methods are native: see ``SemLock``);
``Condition``, ``Event`` and ``Barrier`` are built from those in Python.

Differences from the stdlib, all invisible to code written for it:

* The semaphores have no name: nothing is registered with the resource tracker and
  nothing can leak when a process is killed (a spawn or forkserver context still
  starts the tracker when it makes one, as the stdlib's registration does). A
  SemLock travels to a child being started as its memfd (``reduction.DupFd``), under
  every start method.
* A ``Lock`` or ``RLock`` whose holder process died (SIGKILL, ``os._exit`` while
  holding it) is taken over by the next process that waits for it, instead of
  blocking forever. ``BoundedSemaphore(1)`` keeps the stdlib's behaviour, because a
  bounded semaphore is routinely released by another process than the acquirer
  (``Queue(maxsize=1)`` does that), and a take-over would then turn the later release
  into an over-release.
* ``Barrier`` keeps its two shared counters in a small memfd of its own rather than in
  ``heap.BufferWrapper`` memory.
"""

__all__ = [
    'Lock', 'RLock', 'Semaphore', 'BoundedSemaphore', 'Condition', 'Event'
]

import mmap
import os
import sys
import threading
import time

from . import _core
from . import context
from . import process
from . import reduction
from . import util

# The kinds, numbered as in the stdlib (and as _core.SemLock expects).
RECURSIVE_MUTEX, SEMAPHORE = 0, 1
SEM_VALUE_MAX = _core.SemLock.SEM_VALUE_MAX
sem_unlink = _core.sem_unlink

_FORK_CTX_MSG = (
    'A SemLock created in a fork context is being shared with a process in a spawn '
    'context. This is not supported. Please use the same context to create '
    'multiprocessing objects and Process.'
)


def _reset_after_fork(obj):
    # A forked child holds nothing, whatever its parent held when it forked.
    obj._after_fork()


class SemLock(_core.SemLock):
    """Base of the semaphore-backed primitives: a ``_core.SemLock`` itself.

    The stdlib's SemLock holds a C ``_multiprocessing.SemLock`` in ``_semlock`` and
    re-exports its methods; its ``__enter__`` / ``__exit__`` are Python functions that
    call the C ones. Here the class derives from ``_core.SemLock``, so ``acquire``,
    ``release``, ``__enter__`` and ``__exit__`` are the native methods themselves and
    ``with lock:`` runs no Python frame. ``_semlock`` is the object itself, for code
    written against the stdlib's layout (``lock._semlock._is_mine()``).
    """

    # Whether waiters take the lock over from a dead holder process. Only meaningful
    # for one-unit locks; see the module docstring for why not every one gets it.
    _recover = False

    def __new__(cls, kind, value, maxvalue, *, ctx):
        # Unnamed (name None, unlink True): a memfd needs no name to be shared. The
        # semaphore is made here because the native object cannot exist without one.
        return _core.SemLock.__new__(cls, kind, value, maxvalue, None, True,
                                     recover=cls._recover)

    def __init__(self, kind, value, maxvalue, *, ctx):
        if ctx is None:
            ctx = context._default_context.get_context()
        # The stdlib refuses to hand a fork context's semaphore to a spawned child
        # (its named semaphore is already unlinked then). Ours would work, but code
        # must not come to rely on that, so the same RuntimeError is raised.
        self._is_fork_ctx = ctx.get_start_method() == 'fork'
        if not self._is_fork_ctx:
            # The stdlib registers a spawn/forkserver-context semaphore with the
            # resource tracker, which starts the tracker (or relaunches a dead one,
            # with its warning). Ours has no name to register, but the children it
            # is meant for get the tracker all the same, so start it now too.
            from . import resource_tracker
            resource_tracker.ensure_running()
        util.debug('created semlock with handle %s', self.handle)
        util.register_after_fork(self, _reset_after_fork)

    @property
    def _semlock(self):
        return self

    def __getstate__(self):
        context.assert_spawning(self)
        if self._is_fork_ctx:
            raise RuntimeError(_FORK_CTX_MSG)
        # The memfd goes with the child being started (same number under fork and
        # spawn, an index into the passed fds under forkserver).
        return (reduction.DupFd(self.handle), self.kind, self.maxvalue, self.name)

    def __reduce__(self):
        # Not object's default (it would call __new__ without arguments): the child
        # maps the same semaphore again, in an object of the same class.
        return _rebuild_semlock, (type(self), self.__getstate__())


def _rebuild_semlock(cls, state):
    dupfd, kind, maxvalue, name = state
    # _core.SemLock._rebuild makes an instance of `cls` without running its __init__.
    self = cls._rebuild(dupfd.detach(), kind, maxvalue, name)
    util.debug('recreated blocker with handle %r', self.handle)
    # A rebuilt SemLock may be passed on again, to any kind of child (gh-108520).
    self._is_fork_ctx = False
    util.register_after_fork(self, _reset_after_fork)
    return self


#
# Counting semaphores
#

def _value_for_repr(semlock):
    try:
        return semlock._get_value()
    except Exception:
        return 'unknown'


class Semaphore(SemLock):
    """``threading.Semaphore`` across processes."""

    def __new__(cls, value=1, *args, ctx=None, **kwargs):
        # Extra arguments are for a subclass's __init__ (which checks its own).
        return SemLock.__new__(cls, SEMAPHORE, value, SEM_VALUE_MAX, ctx=ctx)

    def __init__(self, value=1, *, ctx):
        SemLock.__init__(self, SEMAPHORE, value, SEM_VALUE_MAX, ctx=ctx)

    def get_value(self):
        return self._semlock._get_value()

    def __repr__(self):
        return '<%s(value=%s)>' % (type(self).__name__, _value_for_repr(self._semlock))


class BoundedSemaphore(Semaphore):
    """``threading.BoundedSemaphore`` across processes: releasing above the initial
    value raises ValueError."""

    def __new__(cls, value=1, *args, ctx=None, **kwargs):
        return SemLock.__new__(cls, SEMAPHORE, value, value, ctx=ctx)

    def __init__(self, value=1, *, ctx):
        SemLock.__init__(self, SEMAPHORE, value, value, ctx=ctx)

    def __repr__(self):
        return '<%s(value=%s, maxvalue=%s)>' % (
            type(self).__name__, _value_for_repr(self._semlock), self._semlock.maxvalue)


#
# Locks
#

def _holder_name():
    # "Process-1" or "Process-1|Thread-3", as the stdlib's reprs show the owner.
    name = process.current_process().name
    thread = threading.current_thread().name
    if thread != 'MainThread':
        name = '%s|%s' % (name, thread)
    return name


def _owner(semlock):
    # (owner, recursion count) as Lock/RLock reprs show them.
    if semlock._is_mine():
        return _holder_name(), semlock._count()
    if semlock._get_value() == 1:
        return 'None', 0
    if semlock._count() > 0:
        return 'SomeOtherThread', 'nonzero'
    return 'SomeOtherProcess', 'nonzero'


class Lock(SemLock):
    """``threading.Lock`` across processes. Any process may release it."""

    _recover = True

    def __new__(cls, *args, ctx=None, **kwargs):
        # Extra arguments are for a subclass's __init__ (which checks its own).
        return SemLock.__new__(cls, SEMAPHORE, 1, 1, ctx=ctx)

    def __init__(self, *, ctx):
        SemLock.__init__(self, SEMAPHORE, 1, 1, ctx=ctx)

    def __repr__(self):
        try:
            owner = _owner(self._semlock)[0]
        except Exception:
            owner = 'unknown'
        return '<%s(owner=%s)>' % (type(self).__name__, owner)


class RLock(SemLock):
    """``threading.RLock`` across processes: re-entrant, released only by its owner."""

    _recover = True

    def __new__(cls, *args, ctx=None, **kwargs):
        return SemLock.__new__(cls, RECURSIVE_MUTEX, 1, 1, ctx=ctx)

    def __init__(self, *, ctx):
        SemLock.__init__(self, RECURSIVE_MUTEX, 1, 1, ctx=ctx)

    def __repr__(self):
        try:
            owner, count = _owner(self._semlock)
        except Exception:
            owner, count = 'unknown', 'unknown'
        return '<%s(%s, %s)>' % (type(self).__name__, owner, count)


#
# Condition variable
#
# A waiter announces itself on `_sleeping_count`, sleeps on `_wait_semaphore` and, once
# awake (notified or timed out), posts `_woken_count`. notify() first cancels the
# sleepers that timed out since the last notify (each posted `_woken_count` without
# having been handed a wake-up), then hands out up to n wake-ups and waits until that
# many sleepers have acknowledged, so a notify never wakes a thread that started
# waiting after it. The three semaphore names are read by CPython's test suite.
#

class Condition(object):
    """``threading.Condition`` across processes (the lock defaults to an ``RLock``)."""

    def __init__(self, lock=None, *, ctx):
        self._lock = lock or ctx.RLock()
        self._sleeping_count = ctx.Semaphore(0)
        self._woken_count = ctx.Semaphore(0)
        self._wait_semaphore = ctx.Semaphore(0)
        self._make_methods()

    def __getstate__(self):
        context.assert_spawning(self)
        return (self._lock, self._sleeping_count, self._woken_count,
                self._wait_semaphore)

    def __setstate__(self, state):
        (self._lock, self._sleeping_count, self._woken_count,
         self._wait_semaphore) = state
        self._make_methods()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *args):
        return self._lock.__exit__(*args)

    def _make_methods(self):
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __repr__(self):
        try:
            waiters = (self._sleeping_count._semlock._get_value()
                       - self._woken_count._semlock._get_value())
        except Exception:
            waiters = 'unknown'
        return '<%s(%s, %s)>' % (type(self).__name__, self._lock, waiters)

    def wait(self, timeout=None):
        """Release the lock, sleep until notified or ``timeout`` seconds passed, take
        the lock back. False on timeout."""
        assert self._lock._semlock._is_mine(), \
            'must acquire() condition before using wait()'
        self._sleeping_count.release()
        # An RLock may be held several times: give all of it up, take all of it back.
        depth = self._lock._semlock._count()
        for _ in range(depth):
            self._lock.release()
        try:
            return self._wait_semaphore.acquire(True, timeout)
        finally:
            self._woken_count.release()
            for _ in range(depth):
                self._lock.acquire()

    def notify(self, n=1):
        """Wake up to ``n`` of the processes or threads waiting on this condition."""
        assert self._lock._semlock._is_mine(), 'lock is not owned'
        assert not self._wait_semaphore.acquire(False), \
            'notify: Should not have been able to acquire _wait_semaphore'

        while self._woken_count.acquire(False):
            res = self._sleeping_count.acquire(False)
            assert res, ('notify: Bug in sleeping_count.acquire'
                         '- res should not be False')

        handed = 0
        while handed < n and self._sleeping_count.acquire(False):
            self._wait_semaphore.release()
            handed += 1
        if handed:
            for _ in range(handed):
                self._woken_count.acquire()
            # A sleeper may have timed out instead of taking its wake-up: drop those.
            while self._wait_semaphore.acquire(False):
                pass

    def notify_all(self):
        """Wake every process or thread waiting on this condition."""
        self.notify(n=sys.maxsize)

    def wait_for(self, predicate, timeout=None):
        """Wait until ``predicate()`` is true or ``timeout`` seconds passed; returns the
        last value of ``predicate()``."""
        result = predicate()
        if result:
            return result
        endtime = None if timeout is None else time.monotonic() + timeout
        waittime = None
        while not result:
            if endtime is not None:
                waittime = endtime - time.monotonic()
                if waittime <= 0:
                    break
            self.wait(waittime)
            result = predicate()
        return result


#
# Event
#

class Event(object):
    """``threading.Event`` across processes: the flag is a Semaphore holding 0 or 1."""

    def __init__(self, *, ctx):
        self._cond = ctx.Condition(ctx.Lock())
        self._flag = ctx.Semaphore(0)

    def _peek(self):
        # Whether the flag is set, leaving it as it was. The condition's lock is held.
        if self._flag.acquire(False):
            self._flag.release()
            return True
        return False

    def is_set(self):
        with self._cond:
            return self._peek()

    def set(self):
        with self._cond:
            self._flag.acquire(False)
            self._flag.release()
            self._cond.notify_all()

    def clear(self):
        with self._cond:
            self._flag.acquire(False)

    def wait(self, timeout=None):
        """Block until the flag is set or ``timeout`` seconds passed; the flag."""
        with self._cond:
            if not self._peek():
                self._cond.wait(timeout)
            return self._peek()

    def __repr__(self) -> str:
        set_status = 'set' if self.is_set() else 'unset'
        return f"<{type(self).__qualname__} at {id(self):#x} {set_status}>"


#
# Barrier
#

class _SharedInts(object):
    """A few C ints in memory shared with child processes: a memfd mapped MAP_SHARED.

    A forked child inherits the mapping; a spawned one receives the fd (pickling is only
    allowed while a child is being started, like every fd-backed object here)."""

    def __init__(self, n, fd=None):
        size = 4 * n
        if fd is None:
            fd = os.memfd_create('ferromp-barrier', os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
        self._n = n
        self._fd = fd
        util.Finalize(self, os.close, (fd,))
        self._map = mmap.mmap(fd, size)
        self.view = memoryview(self._map).cast('i')

    def __reduce__(self):
        context.assert_spawning(self)
        return _rebuild_shared_ints, (reduction.DupFd(self._fd), self._n)


def _rebuild_shared_ints(dupfd, n):
    return _SharedInts(n, dupfd.detach())


class Barrier(threading.Barrier):
    """``threading.Barrier`` across processes: the lock and waits are a ``Condition``,
    the fill count and state live in shared memory."""

    def __init__(self, parties, action=None, timeout=None, *, ctx):
        shared = _SharedInts(2)
        cond = ctx.Condition()
        self.__setstate__((parties, action, timeout, cond, shared))
        self._state = 0
        self._count = 0

    def __setstate__(self, state):
        (self._parties, self._action, self._timeout,
         self._cond, self._shared) = state
        self._array = self._shared.view

    def __getstate__(self):
        return (self._parties, self._action, self._timeout,
                self._cond, self._shared)

    # threading.Barrier keeps these two as plain attributes; here they are shared.
    @property
    def _state(self):
        return self._array[0]

    @_state.setter
    def _state(self, value):
        self._array[0] = value

    @property
    def _count(self):
        return self._array[1]

    @_count.setter
    def _count(self, value):
        self._array[1] = value
