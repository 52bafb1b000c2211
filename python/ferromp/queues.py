"""Queues between processes: the stdlib's ``multiprocessing.queues`` API.

This is the first, pipe-based version (issue 4 replaces the transport with a
shared-memory ring): messages travel as frames over a ferromp Pipe, whose reads and
writes run in the Rust core, and cross-process exclusion uses ferromp's futex
semaphores. ``Queue.put`` does not block on the pipe: it hands the pickled message to
a feeder thread, so an unbounded queue never blocks its producer, as in the stdlib.

One deliberate difference: ``put`` pickles in the caller, so an unpicklable object
raises there, with its real traceback, and the queue stays usable. The stdlib pickles
in the feeder thread and drops the object with a message on stderr (cpython#84376).
A subclass that overrides ``_on_queue_feeder_error`` gets that hook called instead,
as in the stdlib.
"""

__all__ = ['Queue', 'SimpleQueue', 'JoinableQueue']

import collections
import errno
import os
import sys
import threading
import time
import types
import weakref
from queue import Empty, Full

from . import connection
from . import context
from . import reduction
from . import util

_dumps = reduction._dumps_bytes
_loads = reduction.ForkingPickler.loads

_SEM_VALUE_MAX = 2 ** 31 - 1
# Tells the feeder thread to flush and stop.
_sentinel = object()


class Queue(object):
    """A FIFO queue shared between processes."""

    def __init__(self, maxsize=0, *, ctx):
        if maxsize <= 0:
            maxsize = _SEM_VALUE_MAX
        self._maxsize = maxsize
        self._reader, self._writer = connection.Pipe(duplex=False)
        self._rlock = ctx.Lock()
        self._opid = os.getpid()
        self._wlock = ctx.Lock()
        self._sem = ctx.BoundedSemaphore(maxsize)
        self._ignore_epipe = False
        self._reset()
        util.register_after_fork(self, Queue._after_fork)

    def __getstate__(self):
        context.assert_spawning(self)
        return (self._ignore_epipe, self._maxsize, self._reader, self._writer,
                self._rlock, self._wlock, self._sem, self._opid)

    def __setstate__(self, state):
        (self._ignore_epipe, self._maxsize, self._reader, self._writer,
         self._rlock, self._wlock, self._sem, self._opid) = state
        self._reset()

    def _after_fork(self):
        util.debug('Queue._after_fork()')
        self._reset(after_fork=True)

    def _reset(self, after_fork=False):
        if after_fork:
            self._notempty._at_fork_reinit()
        else:
            self._notempty = threading.Condition(threading.Lock())
        self._buffer = collections.deque()
        self._thread = None
        self._jointhread = None
        self._joincancelled = False
        self._closed = False
        self._close = None
        self._send_bytes = self._writer.send_bytes
        self._recv_bytes = self._reader.recv_bytes
        self._poll = self._reader.poll

    def _pickle_for_put(self, obj):
        try:
            return _dumps(obj)
        except Exception as e:
            if type(self)._on_queue_feeder_error is not Queue._on_queue_feeder_error:
                # Bound lookup: the hook may be an instance method (as the stdlib
                # ProcessPoolExecutor's _SafeQueue defines it) or a staticmethod.
                self._on_queue_feeder_error(e, obj)
                return None
            raise

    def put(self, obj, block=True, timeout=None):
        """Put ``obj`` on the queue; raises queue.Full if it stays full past the timeout."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        data = self._pickle_for_put(obj)
        if data is None:
            return
        if not self._sem.acquire(block, timeout):
            raise Full
        with self._notempty:
            if self._thread is None:
                self._start_thread()
            self._append(data)
            self._notempty.notify()

    def _append(self, data):
        # Called with _notempty held; JoinableQueue also counts the task.
        self._buffer.append(data)

    def get(self, block=True, timeout=None):
        """Remove and return an item; raises queue.Empty when none comes in time."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if block and timeout is None:
            with self._rlock:
                res = self._recv_bytes()
            self._sem.release()
        else:
            if block:
                deadline = time.monotonic() + timeout
            if not self._rlock.acquire(block, timeout):
                raise Empty
            try:
                if block:
                    timeout = deadline - time.monotonic()
                    if not self._poll(timeout):
                        raise Empty
                elif not self._poll():
                    raise Empty
                res = self._recv_bytes()
                self._sem.release()
            finally:
                self._rlock.release()
        return _loads(res)

    def qsize(self):
        """Approximate number of items in the queue."""
        return self._maxsize - self._sem._semlock._get_value()

    def empty(self):
        return not self._poll()

    def full(self):
        return self._sem._semlock._is_zero()

    def get_nowait(self):
        return self.get(False)

    def put_nowait(self, obj):
        return self.put(obj, False)

    def close(self):
        """No more puts from this process; the feeder flushes what it has, then stops."""
        self._closed = True
        close = self._close
        if close:
            self._close = None
            close()

    def join_thread(self):
        """Wait until the feeder thread has written everything (after close())."""
        util.debug('Queue.join_thread()')
        assert self._closed, "Queue {0!r} not closed".format(self)
        if self._jointhread:
            self._jointhread()

    def cancel_join_thread(self):
        """Let this process exit without waiting for buffered items to be written."""
        util.debug('Queue.cancel_join_thread()')
        self._joincancelled = True
        try:
            self._jointhread.cancel()
        except AttributeError:
            pass

    def _terminate_broken(self):
        # Used by pools whose worker died holding the queue's lock.
        self._reader.close()
        self.close()
        self.join_thread()

    def _start_thread(self):
        util.debug('Queue._start_thread()')
        self._buffer.clear()
        self._thread = threading.Thread(
            target=Queue._feed,
            args=(self._buffer, self._notempty, self._send_bytes, self._wlock,
                  self._reader.close, self._writer.close, self._ignore_epipe,
                  self._on_queue_feeder_error, self._sem),
            name='QueueFeederThread',
            daemon=True,
        )
        try:
            self._thread.start()
        except BaseException:
            self._thread = None
            raise
        if not self._joincancelled:
            self._jointhread = util.Finalize(
                self._thread, Queue._finalize_join,
                [weakref.ref(self._thread)],
                exitpriority=-5,
            )
        self._close = util.Finalize(
            self, Queue._finalize_close,
            [self._buffer, self._notempty],
            exitpriority=10,
        )

    @staticmethod
    def _finalize_join(twr):
        thread = twr()
        if thread is not None:
            thread.join()

    @staticmethod
    def _finalize_close(buffer, notempty):
        with notempty:
            buffer.append(_sentinel)
            notempty.notify()

    @staticmethod
    def _feed(buffer, notempty, send_bytes, writelock, reader_close,
              writer_close, ignore_epipe, onerror, queue_sem):
        while True:
            with notempty:
                while not buffer:
                    notempty.wait()
                batch = list(buffer)
                buffer.clear()
            for data in batch:
                if data is _sentinel:
                    reader_close()
                    writer_close()
                    return
                try:
                    with writelock:
                        send_bytes(data)
                except Exception as e:
                    if ignore_epipe and getattr(e, 'errno', 0) == errno.EPIPE:
                        return
                    if util.is_exiting():
                        util.info('error in queue thread: %s', e)
                        return
                    queue_sem.release()
                    onerror(e, data)

    @staticmethod
    def _on_queue_feeder_error(e, obj):
        """Called when the feeder thread fails to write an item; prints the error.

        Subclasses may override it; an override is also called, instead of raising,
        when ``put`` cannot pickle an item."""
        import traceback
        traceback.print_exc()

    __class_getitem__ = classmethod(types.GenericAlias)


class JoinableQueue(Queue):
    """A Queue with task_done() / join() accounting."""

    def __init__(self, maxsize=0, *, ctx):
        Queue.__init__(self, maxsize, ctx=ctx)
        self._unfinished_tasks = ctx.Semaphore(0)
        self._cond = ctx.Condition()

    def __getstate__(self):
        return Queue.__getstate__(self) + (self._cond, self._unfinished_tasks)

    def __setstate__(self, state):
        Queue.__setstate__(self, state[:-2])
        self._cond, self._unfinished_tasks = state[-2:]

    def _append(self, data):
        with self._cond:
            self._buffer.append(data)
            self._unfinished_tasks.release()

    def task_done(self):
        """Mark one fetched item as processed."""
        with self._cond:
            if not self._unfinished_tasks.acquire(False):
                raise ValueError('task_done() called too many times')
            if self._unfinished_tasks._semlock._is_zero():
                self._cond.notify_all()

    def join(self):
        """Wait until every item put has been marked done."""
        with self._cond:
            if not self._unfinished_tasks._semlock._is_zero():
                self._cond.wait()


class SimpleQueue(object):
    """An unbounded queue without a feeder thread: put writes straight to the pipe."""

    def __init__(self, *, ctx):
        self._reader, self._writer = connection.Pipe(duplex=False)
        self._rlock = ctx.Lock()
        self._poll = self._reader.poll
        self._wlock = None if sys.platform == 'win32' else ctx.Lock()

    def close(self):
        self._reader.close()
        self._writer.close()

    def empty(self):
        return not self._poll()

    def __getstate__(self):
        context.assert_spawning(self)
        return (self._reader, self._writer, self._rlock, self._wlock)

    def __setstate__(self, state):
        (self._reader, self._writer, self._rlock, self._wlock) = state
        self._poll = self._reader.poll

    def get(self):
        with self._rlock:
            res = self._reader.recv_bytes()
        return _loads(res)

    def put(self, obj):
        data = _dumps(obj)
        if self._wlock is None:
            self._writer.send_bytes(data)
        else:
            with self._wlock:
                self._writer.send_bytes(data)

    __class_getitem__ = classmethod(types.GenericAlias)
