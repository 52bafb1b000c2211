"""Queues between processes: the stdlib's ``multiprocessing.queues`` API on a
shared-memory ring.

Messages travel through a ring of bytes in one shared segment (``_core.Ring``, see
``src/ring.rs``): a put that finds room copies the pickled message in and returns, a
get that finds one copies it out, with no syscall when nobody sleeps. There is no
pipe underneath.

``Queue.put`` keeps the stdlib's promise that an unbounded queue never blocks its
producer: when the ring is full, the message waits in a per-process buffer and a
feeder thread writes it later, as the stdlib's feeder does. Items a process put stay
in the ring after it exits, so it can be joined before anyone drains them
(cpython#73983).

One deliberate difference: ``put`` pickles in the caller, so an unpicklable object
raises there, with its real traceback, and the queue stays usable. The stdlib pickles
in the feeder thread and drops the object with a message on stderr (cpython#84376).
A subclass that overrides ``_on_queue_feeder_error`` gets that hook called instead,
as in the stdlib.
"""

__all__ = ['Queue', 'SimpleQueue', 'JoinableQueue']

import collections
import os
import threading
import types
import weakref
from queue import Empty, Full  # noqa: F401 (Empty: as the stdlib module has it)

from . import _core
from . import context
from . import reduction
from . import util

_loads = reduction.ForkingPickler.loads
_plain_dumps = reduction._plain_dumps
is_plain = reduction.is_plain
_PROTOCOL = reduction._PROTOCOL

# What Ring.offer did.
_FULL, _WRITTEN, _RESERVED = _core.OFFER_FULL, _core.OFFER_WRITTEN, _core.OFFER_RESERVED
_SEM_VALUE_MAX = 2 ** 31 - 1
# Bytes in each queue's ring. Messages up to half of it are written whole; larger ones
# stream through in chunks while a consumer copies them out.
_RING_BYTES = 4 << 20
# Tells the feeder thread to stop.
_sentinel = object()


class _Collector(list):
    """A write-only file for the pickler that keeps what it is given instead of
    copying it: the pickler hands a large ``bytes``/``bytearray`` payload to
    ``write`` as the object itself, right after the opcode that announces it. It is
    the list of those pieces (built without a Python frame)."""

    __slots__ = ()
    write = list.append


# Opcodes of protocol 5 that announce a payload written right after them: the length
# of their length field, and whether the payload becomes a bytearray when unpickled.
_PAYLOAD_HEADERS = {
    0x42: (4, False),   # BINBYTES: bytes
    0x8e: (8, False),   # BINBYTES8: bytes
    0x96: (8, True),    # BYTEARRAY8: bytearray
}
_NEXT_BUFFER = b'\x97'
_STRINGS = (str, bytes)
_OOB_MIN = 1 << 16
_MAX_PAYLOADS = 60


def _dumps_for_ring(obj):
    """Pickle ``obj`` for a ring: a bytes object, or an envelope tuple ``(inband,
    *payloads)`` whose large payloads travel out of band (the ring writes the
    envelope's header, see ``src/message.rs``), so that each is copied once into the
    ring and once out of it. ``inband`` is exactly ForkingPickler's pickle with each
    large payload's opcode replaced by NEXT_BUFFER; a payload is a ``bytes`` or a
    ``bytearray``, as it is to be rebuilt. A ``str`` or ``bytes`` too long to be plain
    is ``(b'', obj)``: the object itself, out of band."""
    if is_plain(obj):
        return _plain_dumps(obj, _PROTOCOL)
    if type(obj) in _STRINGS:
        # Too long to be plain: it goes out of band whole, unpickled (an envelope with
        # no in-band pickle stands for its one payload).
        return (b'', obj)
    reduction._refresh_table()
    parts = _Collector()
    try:
        reduction._FastPickler(parts, _PROTOCOL).dump(obj)
    except reduction._FALLBACK_ERRORS as e:
        # A lambda, a closure...: by value, all in band.
        return reduction._dumps_by_value(obj, e)
    if len(parts) == 1:
        return parts[0]
    inband = []
    payloads = []
    for part in parts:
        n = len(part) if type(part) is bytes else memoryview(part).nbytes
        if n >= _OOB_MIN and inband and len(payloads) < _MAX_PAYLOADS:
            prev = inband[-1]
            for op, (width, mutable) in _PAYLOAD_HEADERS.items():
                at = len(prev) - 1 - width
                if (at >= 0 and prev[at] == op
                        and int.from_bytes(prev[at + 1:], 'little') == n):
                    inband[-1] = prev[:at] + _NEXT_BUFFER
                    kind = bytearray if mutable else bytes
                    payloads.append(part if type(part) is kind else kind(part))
                    break
            else:
                inband.append(part)
            continue
        inband.append(part)
    if not payloads:
        return b''.join(inband)
    return (b''.join(inband), *payloads)


def _dumps_for_ring_main(obj):
    """``_dumps_for_ring`` for a queue whose readers may be spawn or forkserver
    children of an interactive ``__main__``: what ``__main__`` defines goes by value."""
    data = _dumps_for_ring(obj)
    if reduction._mentions_main(data if type(data) is bytes else data[0]):
        return reduction._dumps_main_by_value(obj) or data
    return data


def _encoder(ctx):
    """How a queue of ``ctx`` pickles what it is given: a queue of a spawn or
    forkserver context, made by an interactive ``__main__``, sends what ``__main__``
    defines by value (its readers cannot import it); otherwise as the stdlib does."""
    if ctx is not None and reduction._main_by_value(context._start_method_of(ctx)):
        return _dumps_for_ring_main
    return _dumps_for_ring


def _is_fork_ctx(ctx):
    return ctx is not None and ctx.get_start_method() == 'fork'


def _check_not_fork_ctx(q):
    # The stdlib's queues hold SemLocks, which refuse to go from a fork context to a
    # spawn or forkserver child; ours hold none, but code must not come to rely on
    # that, so a queue raises the same error (and is as free once rebuilt in a child).
    if getattr(q, '_is_fork_ctx', False):
        from .synchronize import _FORK_CTX_MSG
        raise RuntimeError(_FORK_CTX_MSG)


def _ring_state(ring):
    # The segment and the bell pipe go with the child being started.
    return tuple(reduction.DupFd(fd) for fd in ring.fds)


def _fds_rebuild(state):
    """The fds of a ring's ``_ring_state``, in the process that unpickled it."""
    return [d.detach() for d in state]


def _ring_rebuild(state):
    return _core.Ring.attach(*_fds_rebuild(state))


class Queue(object):
    """A FIFO queue shared between processes."""

    # How put pickles (see _encoder); in a child, as the stdlib does.
    _dumps = staticmethod(_dumps_for_ring)

    def __init__(self, maxsize=0, *, ctx):
        if maxsize <= 0:
            maxsize = _SEM_VALUE_MAX
            ring_max = 0
        else:
            ring_max = maxsize
        self._maxsize = maxsize
        self._ring = _core.Ring(_RING_BYTES, ring_max)
        self._is_fork_ctx = _is_fork_ctx(ctx)
        self._dumps = _encoder(ctx)
        self._opid = os.getpid()
        self._ignore_epipe = False
        self._reset()
        util.register_after_fork(self, Queue._after_fork)

    def __getstate__(self):
        context.assert_spawning(self)
        _check_not_fork_ctx(self)
        return (self._ignore_epipe, self._maxsize, _ring_state(self._ring), self._opid)

    def __setstate__(self, state):
        (self._ignore_epipe, self._maxsize, ring, self._opid) = state
        self._ring = _ring_rebuild(ring)
        self._is_fork_ctx = False
        self._reset()

    def _after_fork(self):
        util.debug('Queue._after_fork()')
        self._reset(after_fork=True)

    def _reset(self, after_fork=False):
        if after_fork:
            self._notempty._at_fork_reinit()
        else:
            self._notempty = threading.Condition(threading.Lock())
        # Messages of this process waiting for room in the ring, oldest first. The
        # feeder removes one only after writing it, so while this is non-empty a new
        # put must queue behind it (a thread's puts stay in order).
        self._buffer = collections.deque()
        self._offer_obj = self._ring.offer_obj
        self._get_obj = self._ring.get_obj
        # Stand-ins for the stdlib's pipe ends, for code that closes them (the stdlib
        # ProcessPoolExecutor closes _reader when its workers died).
        self._reader = _QueueReader(self._ring)
        self._writer = _RingEnd(self._ring)
        self._thread = None
        self._jointhread = None
        self._joincancelled = False
        self._closed = False
        self._close = None

    def _unpicklable(self, e, obj):
        # put() could not pickle obj: raise, unless a subclass overrides the feeder
        # error hook, which then gets the error as the stdlib's feeder would give it.
        if type(self)._on_queue_feeder_error is not Queue._on_queue_feeder_error:
            # Bound lookup: the hook may be an instance method (as the stdlib
            # ProcessPoolExecutor's _SafeQueue defines it) or a staticmethod.
            self._on_queue_feeder_error(e, obj)
            return None
        raise e

    def _pickle_for_put(self, obj):
        try:
            return self._dumps(obj)
        except Exception as e:
            return self._unpicklable(e, obj)

    def put(self, obj, block=True, timeout=None):
        """Put ``obj`` on the queue; raises queue.Full if it stays full past the timeout."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if block and timeout is None and not self._buffer:
            # Exact ints, floats, strs, bytes, None and bools travel without pickle.
            done = self._offer_obj(obj)
            if done == _WRITTEN:
                return
            if done == _RESERVED:
                self._feed_later(self._dumps(obj))
                return
        try:
            data = self._dumps(obj)
        except Exception as e:
            data = self._unpicklable(e, obj)
            if data is None:
                return
        done = self._ring.offer(data, block, timeout, not self._buffer)
        if done == _WRITTEN:
            return
        if done == _FULL:
            raise Full
        self._feed_later(data)

    def _feed_later(self, data):
        # A slot is reserved; the ring has no room now (or older messages of this
        # process are still waiting): the feeder thread writes it.
        with self._notempty:
            if self._thread is None:
                self._start_thread()
            self._buffer.append(data)
            self._notempty.notify()

    def get(self, block=True, timeout=None):
        """Remove and return an item; raises queue.Empty when none comes in time."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        return self._get_obj(_loads, block, timeout)

    def qsize(self):
        """Number of items put and not yet taken."""
        return self._ring.qsize()

    def empty(self):
        return self._ring.empty()

    def full(self):
        return self._ring.full()

    def get_nowait(self):
        return self.get(False)

    def put_nowait(self, obj):
        return self.put(obj, False)

    def close(self):
        """No more puts from this process; the feeder writes what it has, then stops."""
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
        # Used by executors whose worker died: drop what this process still buffers.
        with self._notempty:
            self._buffer.clear()
        self.close()
        self.join_thread()

    def _start_thread(self):
        util.debug('Queue._start_thread()')
        self._buffer.clear()
        self._thread = threading.Thread(
            target=Queue._feed,
            args=(self._buffer, self._notempty, self._ring.write_many,
                  self._ring.unreserve, self._on_queue_feeder_error),
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
    def _feed(buffer, notempty, write_many, unreserve, onerror):
        # Writes what is buffered, oldest first, in batches (one GIL-free call each);
        # items leave the buffer only once written, so a put that finds the buffer
        # empty knows everything of this process before it is in the ring.
        while True:
            with notempty:
                while not buffer:
                    notempty.wait()
                batch = list(buffer)
            stop = _sentinel in batch
            if stop:
                batch = batch[:batch.index(_sentinel)]
            written = 0
            while written < len(batch):
                try:
                    written += write_many(batch[written:])
                except Exception as e:
                    if isinstance(e, BrokenPipeError):
                        # This process closed the reading end: nobody will read.
                        return
                    if util.is_exiting():
                        util.info('error in queue thread: %s', e)
                        return
                    # write_many raises only for the first item it was given.
                    unreserve()
                    onerror(e, batch[written])
                    written += 1
            with notempty:
                for _ in range(len(batch) + stop):
                    buffer.popleft()
            if stop:
                return

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

    def put(self, obj, block=True, timeout=None):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        data = self._pickle_for_put(obj)
        if data is None:
            return
        # Reserve a slot, count the task, then write: a consumer can never see the
        # item before it is counted.
        if self._ring.offer(data, block, timeout, False) == _FULL:
            raise Full
        with self._cond:
            self._unfinished_tasks.release()
        if self._buffer or not self._ring.try_write(data):
            self._feed_later(data)

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


def _closed_handle(*args, **kwds):
    raise OSError("handle is closed")


class _RingEnd(object):
    """One end of a SimpleQueue, shaped like the Connection the stdlib keeps there."""

    def __init__(self, ring):
        self._ring = ring

    @property
    def closed(self):
        return self._ring is None

    def _check_closed(self):
        if self._ring is None:
            raise OSError("handle is closed")

    def close(self):
        self._ring = None


class _QueueReader(_RingEnd):
    """``Queue._reader``: closing it means this process will not read again and
    expects nobody to (the other readers are dead), so a feeder thread waiting for
    room gives up instead of blocking the process's exit."""

    def close(self):
        if self._ring is not None:
            self._ring.abandon()
        self._ring = None


class _RingReader(_RingEnd):
    """``SimpleQueue._reader``: readable (for ``wait()`` / ``select()``) while a
    message waits. Its fd is the ring's bell pipe, which the ring keeps in step with
    its contents from the first ``fileno()`` call on."""

    def fileno(self):
        self._check_closed()
        return self._ring.arm_bell()

    def poll(self, timeout=0.0):
        self._check_closed()
        if not self._ring.empty():
            return True
        if timeout is not None and timeout <= 0:
            return False
        from .connection import wait
        return bool(wait([self], timeout))

    def recv_bytes(self, maxlength=None):
        # The stdlib returns the message's pickle: give one of the object taken.
        self._check_closed()
        return reduction._dumps_bytes(self._ring.get_obj(_loads))

    def recv(self):
        self._check_closed()
        return self._ring.get_obj(_loads)


class _RingWriter(_RingEnd):
    """``SimpleQueue._writer``."""

    def send_bytes(self, buf, offset=0, size=None):
        self._check_closed()
        data = bytes(memoryview(buf).cast('B')[offset:None if size is None
                                               else offset + size])
        self._ring.put(data)

    def send(self, obj):
        self._check_closed()
        self._ring.put(_dumps_for_ring(obj))


class SimpleQueue(object):
    """An unbounded queue without a feeder thread: put writes straight to the ring
    (waiting for room if it is full)."""

    _dumps = staticmethod(_dumps_for_ring)

    def __init__(self, *, ctx):
        self._setup(_core.Ring(_RING_BYTES, 0))
        self._is_fork_ctx = _is_fork_ctx(ctx)
        self._dumps = _encoder(ctx)

    def _setup(self, ring):
        self._reader = _RingReader(ring)
        self._writer = _RingWriter(ring)
        self._get = ring.get_obj
        self._put = ring.put
        self._put_obj = ring.put_obj
        self._empty = ring.empty

    def close(self):
        self._reader.close()
        self._writer.close()
        self._get = self._put = self._put_obj = self._empty = _closed_handle

    def empty(self):
        return self._empty()

    def __getstate__(self):
        context.assert_spawning(self)
        _check_not_fork_ctx(self)
        ring = self._reader._ring or self._writer._ring
        if ring is None:
            raise OSError("handle is closed")
        return _ring_state(ring)

    def __setstate__(self, state):
        self._setup(_ring_rebuild(state))
        self._is_fork_ctx = False

    def get(self):
        return self._get(_loads)

    def put(self, obj):
        # Exact ints, floats, strs, bytes, None and bools travel without pickle.
        if not self._put_obj(obj):
            self._put(self._dumps(obj))

    __class_getitem__ = classmethod(types.GenericAlias)
