"""Process and thread pools: the stdlib's ``multiprocessing.pool`` API.

It keeps the stdlib's public and semi-private names (``Pool``, ``ThreadPool``,
``ApplyResult``/``AsyncResult``, ``MapResult``, ``IMapIterator``,
``IMapUnorderedIterator``, ``RemoteTraceback``, ``MaybeEncodingError``, ``worker``,
``_pool``, ``_state``, ``_processes``, ``_cache``, ``_repopulate_pool()``, the state
constants), its semantics and its messages, and adds one guarantee the stdlib lacks: a
pool never hangs. Every wait ends with a result or an exception.

How it is built (``docs/architecture.md``, "Pool", has the reasons)
=====================================================================

The front (``Pool``, ``ThreadPool``, the result classes) turns every call into tasks of
one shape, "``func(item)`` (or ``func(*item)``) for each item of a sequence, as tasks
``i0, i0 + 1, ...`` of a job", and hands them to its engine's ``submit``:

* ``apply_async(f, args)``: one task, ``f(*args)``;
* ``map``: one task per chunk, ``_map_chunk((f, chunk))``, or, with ``chunksize=1``,
  ``f(item)`` per item;
* ``imap``: the same, a burst at a time, fed as the caller consumes.

Two engines carry the tasks:

``_ProcessEngine`` (``Pool``)
    Two shared-memory rings of the core (``_core.PoolRing``): callers write tasks into
    the task ring, any idle worker takes the next, results come back through the
    result ring. Each task carries a number (its tag); ``inflight`` maps it to its
    ``(job, index)``. A worker's claim word names the task it holds, so a worker that
    dies fails exactly that task. The caller waiting for a result reads the result ring
    itself (``wait_for``); the engine's thread starts and replaces workers, gives death
    verdicts, runs callbacks and collects the results nobody waits for. Plain tasks and
    results skip the pickler (``_core.PoolRing``: native calls, scalars, packed lists
    of numbers); large pickle buffers travel through recycled shared memory
    (``_spill``).

``_ThreadEngine`` (``ThreadPool``)
    The worker threads take tasks from one shared inbox and post results to an outbox
    that the engine's thread reads, as the stdlib schedules.

Every worker, thread or process, runs ``_work``: take a task, run it, post the result.
Process workers take and post through the rings (``_RingSide``), and the core runs the
plain calls itself (``PoolRing.serve``) until one needs Python; thread workers and the
stdlib-compatible ``worker()`` take and post through queues (``_QueueSide``).

Pickling happens in the caller: ``apply_async``, ``map_async`` and ``starmap_async``
pickle their tasks in the calling thread, so an unpicklable function or argument raises
there, at the call. ``imap`` checks its function at the call and pickles items as it
feeds them; an item that fails to pickle fails that item's result (as in the stdlib).

Errors of our own
    All derive from the stdlib's ``multiprocessing.ProcessError``:

    * ``PoolError(ProcessError)``: the common base.
    * ``WorkerLostError(PoolError)``: the worker running the task died (SIGKILL, OOM
      killer, ``os._exit``, a segfault, ``sys.exit`` inside the task). The message
      names the worker's pid and exit code; ``.pid`` and ``.exitcode`` hold them.
      Only that task fails; the worker is replaced and the pool carries on.
    * ``PoolTerminatedError(PoolError)``: ``terminate()`` (or leaving a ``with``
      block) came before the task finished. Every result still pending raises it.
    * ``BrokenPoolError(PoolError)``: new workers keep failing to start (the
      initializer raises, or the child dies before it reports ready)
      ``max(3, processes)`` times in a row. Tasks no live worker holds fail with it,
      new calls raise it, and no more workers are started; tasks already running on
      live workers finish normally. Its ``__cause__`` is the last failure.

    They are created on first use (module ``__getattr__``), like the stdlib exception
    classes in ``ferromp.context``, so a pool worker never imports the stdlib package.

Other decisions
    * ``terminate()`` sends SIGTERM, waits up to a second, then SIGKILLs stragglers;
      a ThreadPool's busy threads are abandoned (they exit once their current task
      returns) and ``join()`` does not wait for them.
    * An exception raised by a callback is printed to stderr; the result is still
      set and the pool keeps working (in the stdlib it kills the result handler).
    * A task that cannot be unpickled in the worker (or a result in the parent)
      fails with the unpickling error instead of killing the worker (or the pool).
    * A pool belongs to the process that created it; in a forked child it reports
      "Pool not running" instead of hanging on its parent's threads.
"""

__all__ = ['Pool', 'ThreadPool']

import collections
import itertools
import os
import queue
import select
import signal
import sys
import threading
import time
import types
import warnings

from . import _core
from . import _spill
from . import connection
from . import context as _context
from . import queues
from . import reduction
from . import util

#
# Pool states, as the stdlib spells them
#

INIT = "INIT"
RUN = "RUN"
CLOSE = "CLOSE"
TERMINATE = "TERMINATE"

job_counter = itertools.count()

_dumps = reduction._dumps_bytes
_loads = reduction.ForkingPickler.loads
_is_plain = reduction.is_plain
_plain_dumps = reduction._plain_dumps
_SEQUENCES = (list, tuple, range)


def mapstar(args):
    """Run one chunk of a map: ``args`` is ``(func, items)``."""
    func, items = args
    return [func(item) for item in items]


def starmapstar(args):
    """Run one chunk of a starmap: ``args`` is ``(func, argument_tuples)``."""
    func, items = args
    return [func(*item) for item in items]


# map and starmap send their chunks through these two, which tell a process worker
# that the chunk's result goes to a MapResult: a list of plain numbers may then travel
# packed (see ``_core.Packed``), not pickled. (imap's chunks use mapstar: an
# IMapIterator hands the list itself to the caller.)
def _map_chunk(args):
    return mapstar(args)


def _starmap_chunk(args):
    return starmapstar(args)


_CHUNK_RUNNERS = {mapstar: _map_chunk, starmapstar: _starmap_chunk}
_Packed = _core.Packed

# With a task_timeout, a chunk's runner says which of its calls is running: it stores
# the item's index into the worker's progress word (see _Channel) before each call, so
# that the parent can time each call of the chunk, not the chunk as a whole.
_progress_word = None   # (claims segment, word index), in a process pool worker


def _counted(items):
    if _progress_word is None:
        return items
    return _core.Counted(items, *_progress_word)


def _timed_mapstar(args):
    func, items = args
    return [func(item) for item in _counted(items)]


def _timed_map_chunk(args):
    return _timed_mapstar(args)


def _timed_starmap_chunk(args):
    func, items = args
    return [func(*item) for item in _counted(items)]


_TIMED_CHUNK_RUNNERS = {mapstar: _timed_map_chunk, starmapstar: _timed_starmap_chunk}


#
# Carrying a worker's traceback to the parent
#

class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker; set as the
    ``__cause__`` of the exception re-raised in the parent, so both tracebacks print."""

    def __init__(self, tb):
        self.tb = tb

    def __str__(self):
        return self.tb


class ExceptionWithTraceback:
    """An exception plus its formatted traceback, pickled so that the parent gets the
    exception back with a RemoteTraceback as its cause."""

    def __init__(self, exc, tb):
        import traceback  # only on an error: a spawned worker starts ~3 ms sooner
        text = ''.join(traceback.format_exception(type(exc), exc, tb))
        self.exc = exc
        self.tb = '\n"""\n' + text + '"""'

    def __reduce__(self):
        return rebuild_exc, (self.exc, self.tb)


def rebuild_exc(exc, tb):
    exc.__cause__ = RemoteTraceback(tb)
    return exc


class MaybeEncodingError(Exception):
    """A worker's result (or exception) could not be pickled for the trip back; this
    carries the reprs of the value and of the pickling error instead."""

    def __init__(self, exc, value):
        self.exc = repr(exc)
        self.value = repr(value)
        super().__init__(self.exc, self.value)

    def __str__(self):
        return "Error sending result: '%s'. Reason: '%s'" % (self.value, self.exc)

    def __repr__(self):
        return "<%s: %s>" % (type(self).__name__, self)


#
# Our own exception classes, created on first use (see the module docstring)
#

_ERROR_SPECS = {
    'PoolError': (None, "Base class of the errors a ferromp pool raises itself."),
    'WorkerLostError': ('PoolError',
                        "The worker process running the task died before finishing it."),
    'PoolTerminatedError': ('PoolError',
                            "The pool was terminated before the task finished."),
    'BrokenPoolError': ('PoolError',
                        "Workers keep failing to start: the pool cannot run tasks."),
    'TaskTimeoutError': ('PoolError',
                         "A call ran past its task_timeout: its worker (and every process "
                         "the call started) was stopped. Also a multiprocessing."
                         "TimeoutError and a TimeoutError."),
}
_error_lock = threading.RLock()


def _timeout_error_new(cls, message='', *args, **kwds):
    return TimeoutError.__new__(cls, message)


def _pool_error_init(self, message, pid=None, exitcode=None):
    Exception.__init__(self, message)
    self.pid = pid
    self.exitcode = exitcode


def _error_class(name):
    cls = globals().get(name)
    if cls is not None:
        return cls
    with _error_lock:
        cls = globals().get(name)
        if cls is None:
            parent, doc = _ERROR_SPECS[name]
            base = _context.ProcessError if parent is None else _error_class(parent)
            namespace = {'__module__': __name__, '__qualname__': name, '__doc__': doc}
            if parent is None:
                namespace['__init__'] = _pool_error_init
            bases = (base,)
            if name == 'TaskTimeoutError':
                # except multiprocessing.TimeoutError / except TimeoutError catch it.
                # (OSError's __new__ would read (message, pid, exitcode) as (errno,
                # strerror, filename): it gets the message alone.)
                bases += (_context.TimeoutError, TimeoutError)
                namespace['__new__'] = _timeout_error_new
            cls = type(name, bases, namespace)
            globals()[name] = cls
    return cls


def __getattr__(name):
    if name in _ERROR_SPECS:
        return _error_class(name)
    if name == 'TimeoutError':
        # The stdlib's pool module re-exports multiprocessing.TimeoutError.
        return _context.TimeoutError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _exit_description(code):
    if code is not None and code < 0:
        try:
            return '%d (%s)' % (code, signal.Signals(-code).name)
        except ValueError:
            pass
    return str(code)


def _report_error(what='a ferromp pool callback'):
    try:
        import traceback
        sys.stderr.write('Exception in %s:\n' % what)
        traceback.print_exc()
    except Exception:
        pass


def _identity(obj):
    return obj


def _helper_reraises_exception(ex):
    'Pickle-able helper function that re-raises its argument (kept for the stdlib name).'
    raise ex


#
# The task protocol of process pools
#
# Tasks go to the workers through one shared ring (``_core.PoolRing``) and results come
# back through another. Each message is tagged with a task number; a worker's take
# stores that number into the worker's claim word before the ring lets go of the
# message, and its post clears the word once the result is in the result ring, so the
# parent always knows which task a dead worker held.
#

_TASK_RING_BYTES = 4 << 20
_RESULT_RING_BYTES = 4 << 20
_FAIL = 1 << 63             # result tag bit: the task raised (the value is the exception)
_CTL = 1 << 62              # result tag bit: a control message, kind << 40 | worker id
_SEQ_MASK = _CTL - 1
_WID_MASK = (1 << 40) - 1
_STOP_TAG = 0               # task tag: exit (task numbers start at _BLOCK)
_CTL_READY = 1              # the initializer has run
_CTL_INIT_FAILED = 2        # the initializer raised (the value is the exception)
_CTL_NUDGE = 3              # from the parent itself: a reader should look again
# Why a worker exits on its own, written into its started word (see _Channel) as it
# goes: the parent reads it when the worker is gone (Pool.stats()).
_RETIRED_MEMORY = 'memory'      # resident memory above max_memory_per_child
_RETIRED_MAXTASKS = 'maxtasks'  # maxtasksperchild tasks done
_RETIRED_CODES = {_RETIRED_MEMORY: (1 << 63) | 1, _RETIRED_MAXTASKS: (1 << 63) | 2}
_RETIRED_BY_CODE = {code: why for why, code in _RETIRED_CODES.items()}
_TAKE_BATCH = 64            # results taken from the ring per core call
_NONE_PICKLE = _dumps(None)
_SERVE_FOREVER = 1 << 62


def _ctl_tag(kind, wid):
    return _CTL | (kind << 40) | wid

# Task numbers are handed out in blocks of _BLOCK consecutive numbers, one block per
# batch that a submit writes (a batch of native calls needs consecutive tags).
_BLOCK_BITS = 8
_BLOCK = 1 << _BLOCK_BITS
# Tasks pickled per batch (one ring write and one wake-up each); the first batch of a
# long submit goes out once pickling has taken _FIRST_BATCH_TIME, so a worker starts
# while the caller pickles on.
_BATCH = 64
_FIRST_BATCH_TIME = 2e-4
# How long a collecting caller blocks on the result ring before it looks around again
# (deaths and terminate() also nudge it at once; this only bounds a missed nudge).
_COLLECT_SLICE = 0.1
# task_timeout: how often the engine's thread looks at the calls the workers are in, and
# how long a worker stopped for a timeout has after SIGTERM before SIGKILL.
_TIMEOUT_TICK = 0.01
_KILL_GRACE = 0.5
# How often the engine's thread collects results nobody waits for (callbacks, ready()),
# and how often while callers collect themselves (then the tick would only take the GIL
# and a CPU from them; a result with a callback is handed over at once anyway).
_BACKGROUND_TICK = 0.002
_QUIET_TICK = 0.05

# Plain functions pickle by reference (module and name): their pickle is computed once
# per function and cached on both sides, so a task carries the function as a short
# bytes object that the worker looks up instead of unpickling.
_FUNC_TYPES = (types.FunctionType, types.BuiltinFunctionType)
_FUNC_CACHE_MAX = 256


class _FuncCache(dict):
    """function -> its pickle (parent side), pickle -> function (worker side)."""

    # A lambda or a closure pickles by value (reduction._dumps_by_value); see
    # _MainChannel for what an interactive __main__ defines.
    dumps = staticmethod(_dumps)

    def parent_key(self, func):
        data = self.get(func) if type(func) in _FUNC_TYPES else None
        if data is not None:
            return data
        if type(func) not in _FUNC_TYPES or not isinstance(
                getattr(func, '__self__', None), (types.ModuleType, type(None))):
            # A bound builtin method (dict.get of one dict...) pickles its object's
            # state, which may change: pickled afresh each time.
            return func
        return self._remember(func, self.dumps(func))

    def worker_func(self, key):
        if type(key) is not bytes:
            return key
        func = self.get(key)
        return func if func is not None else self._remember(key, _loads(key))

    def _remember(self, key, value):
        if len(self) >= _FUNC_CACHE_MAX:
            self.clear()
        self[key] = value
        return value


class _Channel:
    """The rings and claim words a process pool shares with its workers. For worker
    slot ``s``, word ``s`` of ``claims`` is its claim (the tag of the task it holds),
    word ``nslots + s`` its progress (the index of the call it is in, when it runs a
    timed chunk), word ``2 * nslots + s`` the tag of the task whose call has begun (the
    task's arguments and function are unpickled and found by then), and the
    five words from ``3 * nslots + 5 * s`` on its counters, kept by the core
    (``Pool.stats()``)."""

    def __init__(self, nslots):
        self.nslots = nslots
        self.claims = _core.Segment(64 * 8 * nslots)
        self.tasks = _core.PoolRing(_TASK_RING_BYTES, self.claims, nslots)
        self.results = _core.PoolRing(_RESULT_RING_BYTES, self.claims, nslots)
        self.spill = _spill.Table()
        _spill.register(self.spill)

    def __getstate__(self):
        _context.assert_spawning(self)
        return (queues._ring_state(self.tasks), queues._ring_state(self.results),
                reduction.DupFd(self.claims.fd), self.spill, self.nslots)

    def __setstate__(self, state):
        tasks, results, claims, self.spill, self.nslots = state
        self.claims = _core.Segment.from_fd(claims.detach())
        self.tasks = _core.PoolRing.attach(*queues._fds_rebuild(tasks), self.claims,
                                           self.nslots)
        self.results = _core.PoolRing.attach(*queues._fds_rebuild(results), self.claims,
                                             self.nslots)

    def progress_word(self, slot):
        return self.nslots + slot

    def started_word(self, slot):
        return 2 * self.nslots + slot

    def counters(self, slot):
        """Worker slot ``slot``'s counters: tasks answered, seconds busy, bytes of
        arguments and of results (see ``src/py/pool.rs``)."""
        base = 3 * self.nslots + 5 * slot
        load = self.claims.load_word
        return load(base), load(base + 1) / 1e9, load(base + 2), load(base + 3)

    def reset_slot(self, slot):
        """Clears slot ``slot``'s words for a new worker: claim, started, counters."""
        store = self.claims.store_word
        store(slot, 0)
        store(self.started_word(slot), 0)
        base = 3 * self.nslots + 5 * slot
        for k in range(5):
            store(base + k, 0)

    def dumps(self, obj, by_value=True):
        """A task's or result's pickle: plain objects by the plain pickler; large
        pickle buffers (numpy arrays...) through shared memory (see _spill). A result
        (``by_value`` false) that holds a lambda fails as in the stdlib (the worker
        sends a MaybeEncodingError): only what the caller sends goes by value."""
        if _is_plain(obj):
            return _plain_dumps(obj, 5)
        return _spill.dumps(obj, queues._dumps_for_ring, self.spill, by_value)

    def encode_task(self, fkey, args, kwds):
        if not kwds:
            # The plain pickler is about twice as fast for the common task whose
            # arguments are a few scalars.
            for a in args:
                if not _is_plain(a):
                    break
            else:
                try:
                    return _plain_dumps((fkey, args, None), 5)
                except reduction._FALLBACK_ERRORS as e:
                    # The function is a lambda, a local class...: by value.
                    return reduction._dumps_by_value((fkey, args, None), e)
        # (A tuple is never plain: straight to the general pickler.)
        return _spill.dumps((fkey, args, kwds or None), queues._dumps_for_ring, self.spill)


class _MainChannel(_Channel):
    """The channel of a spawn or forkserver pool started by an interactive
    ``__main__``, whose workers cannot import what ``__main__`` defines: tasks that
    refer to it send it by value (``reduction._main_by_value``)."""

    def encode_task(self, fkey, args, kwds):
        data = _Channel.encode_task(self, fkey, args, kwds)
        inband = data if type(data) is bytes else data[0]
        # The function's key went by value already: only a mention of __main__ outside
        # it (in the arguments) needs the second pickle.
        known = fkey.count(b'__main__') if type(fkey) is bytes else 0
        if inband.count(b'__main__') > known:
            return reduction._dumps_main_by_value((fkey, args, kwds or None)) or data
        return data


#
# The worker side: one loop, two ways to take tasks and post results
#

# What a side's take() found (see _work).
_TASK = 'task'      # a task to run: (func, args, kwds)
_BAD = 'bad'        # a task that could not be rebuilt here: the exception
_RESULT = 'result'  # the core ran the task: its result, to post the general way
_ERROR = 'error'    # the core ran the task and it raised: the exception
_LIMIT = 'limit'    # the core ran tasks up to the limit it was given
_STOP = 'stop'      # the parent says stop

# A queue worker's control messages, as (None, kind, payload); results are (job, i,
# result).
_READY = 'ready'              # the initializer has run: the worker takes tasks now
_INIT_FAILED = 'init-failed'  # the initializer raised (payload: (False, exception))
_BAD_TASK = 'bad-task'        # the task could not be unpickled (payload: (False, exc))
_EXITED = 'exited'            # a thread worker's last message (payload: its task)



def _unencodable(exc, value):
    """The MaybeEncodingError a worker sends when ``value`` cannot be pickled."""
    try:
        wrapped = MaybeEncodingError(exc, value)
    except Exception as e2:  # even repr() of the value failed
        wrapped = MaybeEncodingError(exc, '<unrepresentable %s>' % type(e2).__name__)
    util.debug("Possible encoding error while sending result: %s" % wrapped)
    return wrapped


def _rss_reader():
    """A function that returns this process's resident memory in bytes (Linux's
    /proc/self/statm, read through a descriptor kept open: about a microsecond)."""
    fd = os.open('/proc/self/statm', os.O_RDONLY | os.O_CLOEXEC)
    page = os.sysconf('SC_PAGE_SIZE')

    def rss():
        return int(os.pread(fd, 128, 0).split()[1]) * page
    return rss


def _work(side, initializer, initargs, maxtasks, wrap_exception, max_memory=None):
    """The body of every pool worker: run the initializer, then take a task, run it,
    post its result, until told to stop or ``maxtasks`` tasks are done, or (with
    ``max_memory``) until its resident memory is above that many bytes after a task."""
    if maxtasks is not None and not (isinstance(maxtasks, int) and maxtasks >= 1):
        raise AssertionError("Maxtasks {!r} is not valid".format(maxtasks))

    def wrap(exc):
        if wrap_exception:
            return ExceptionWithTraceback(exc, exc.__traceback__)
        return exc

    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as e:
            try:
                side.init_failed(wrap(e))
            except Exception:
                pass
            raise
    if not side.ready():
        return

    completed = 0
    take = side.take
    post = side.post
    rss = _rss_reader() if max_memory is not None else None
    while maxtasks is None or completed < maxtasks:
        # (With a memory cap, the core hands back after each task: it is checked.)
        limit = 1 if rss is not None else None if maxtasks is None else maxtasks - completed
        try:
            done, what, tag, obj = take(limit)
        except (EOFError, OSError):
            util.debug('worker got EOFError or OSError -- exiting')
            break
        completed += done
        if what is _LIMIT:
            if rss is not None and rss() > max_memory:
                util.debug('worker exiting: resident memory above max_memory_per_child')
                side.retire(_RETIRED_MEMORY)
                break
            continue
        if what is _STOP:
            util.debug('worker got sentinel -- exiting')
            break
        ok = True
        func = args = None
        if what is _TASK:
            func, args, kwds = obj
            obj = None
            try:
                value = func(*args, **kwds) if kwds else func(*args)
            except Exception as e:
                value = wrap(e)
                ok = False
            kwds = None
        elif what is _RESULT:
            value = obj
        else:
            # _BAD: the task cannot be rebuilt here (its function is not importable
            # in this process, say): that task fails, the worker carries on.
            # _ERROR: the function the core called raised.
            value = wrap(obj)
            ok = False
        obj = None
        completed += 1
        try:
            post(tag, ok, value, func, maxtasks is None or completed < maxtasks,
                 what is _RESULT, args)
        except OSError:
            util.debug('worker could not send its result -- exiting')
            break
        # Drop references now rather than when the next task arrives.
        value = func = args = None
        if rss is not None and rss() > max_memory:
            util.debug('worker exiting: resident memory above max_memory_per_child')
            side.retire(_RETIRED_MEMORY)
            break
    else:
        side.retire(_RETIRED_MAXTASKS)
    util.debug('worker exiting after %d tasks' % completed)


class _QueueSide:
    """Tasks ``(job, i, func, args, kwds)`` from a queue (None means stop), results
    ``(job, i, (ok, value))`` to another: a thread worker's inbox and the pool's
    outbox, or the Connections a caller of ``worker()`` gives, as in the stdlib."""

    running = None      # the (job, i) of the task being run

    def __init__(self, inqueue, outqueue):
        self.get = inqueue.recv if hasattr(inqueue, 'recv') else inqueue.get
        if hasattr(outqueue, 'send_bytes'):
            # Pickle first, write second: a result that cannot be pickled writes nothing.
            self.encode, self.write = _dumps, outqueue.send_bytes
        else:
            self.encode, self.write = _identity, outqueue.put

    def init_failed(self, exc):
        self.post(None, False, exc, kind=_INIT_FAILED)

    def retire(self, why):
        pass

    def ready(self):
        try:
            self.write(self.encode((None, _READY, None)))
        except OSError:
            return False
        return True

    def take(self, limit):
        try:
            task = self.get()
        except (EOFError, OSError):
            raise
        except Exception as e:
            return 0, _BAD, None, e
        if task is None:
            return 0, _STOP, None, None
        job, i, func, args, kwds = task
        self.running = (job, i)
        return 0, _TASK, self.running, (func, args, kwds)

    def post(self, tag, ok, value, func=None, more=True, general=False, args=None,
             kind=_BAD_TASK):
        self.running = None
        # tag None: the task could not be rebuilt, so its (job, i) is unknown here;
        # the pool knows which task this worker holds.
        job, i = tag if tag is not None else (None, kind)
        try:
            data = self.encode((job, i, (ok, value)))
        except Exception as e:
            data = self.encode((job, i, (False, _unencodable(e, value))))
        self.write(data)


def worker(inqueue, outqueue, initializer=None, initargs=(), maxtasks=None,
           wrap_exception=False):
    """The body of a pool worker, the stdlib's way: tasks ``(job, i, func, args,
    kwds)`` from ``inqueue`` (None means stop), ``(job, i, (success, value))`` to
    ``outqueue`` (queues or Connections). Thread pools run it; process pools run
    ``_ring_worker``."""
    _work(_QueueSide(inqueue, outqueue), initializer, initargs, maxtasks, wrap_exception)


class _ThreadSide(_QueueSide):
    """A thread worker's side: the queue side, counting its tasks and busy time (what
    ``Pool.stats()`` reports; there are no bytes: nothing is pickled)."""

    tasks = 0
    busy = 0.0
    started = None

    def take(self, limit):
        taken = _QueueSide.take(self, limit)
        self.started = time.monotonic()
        return taken

    def post(self, tag, *args, **kwds):
        # Counted before the result goes: whoever has the result sees the count.
        if tag is not None and self.started is not None:
            self.tasks += 1
            self.busy += time.monotonic() - self.started
            self.started = None
        _QueueSide.post(self, tag, *args, **kwds)


def _thread_worker(inbox, outbox, slot, wake, initializer, initargs):
    side = slot.side = _ThreadSide(inbox, outbox)

    def write(msg):
        # To the pool's outbox, tagged with the worker's slot.
        outbox.put((slot, msg))
        wake()
    side.write = write
    try:
        _work(side, initializer, initargs, None, False)
    finally:
        # Its last word: the task it was running when it exited (SystemExit...), if any.
        write((None, _EXITED, side.running))


class _RingSide:
    """A process worker's ends of the pool's rings (see ``_Channel``)."""

    def __init__(self, channel, slot, wid):
        self.channel = channel
        self.slot = slot
        self.wid = wid
        tasks = channel.tasks
        self.funcs = _FuncCache()
        self.started = channel.started_word(slot)
        self.store_word = channel.claims.store_word
        self.serve_args = (channel.results, self.funcs, _loads, slot)
        self.serve = tasks.serve
        self.hold = tasks

    def init_failed(self, exc):
        try:
            data = _dumps(exc)
        except Exception:
            data = _dumps(RuntimeError('the pool initializer raised %r' % (exc,)))
        self.channel.results.put(_ctl_tag(_CTL_INIT_FAILED, self.wid), data)

    def ready(self):
        self.channel.results.put(_ctl_tag(_CTL_READY, self.wid), _NONE_PICKLE)
        return True

    def retire(self, why):
        # The worker exits on its own: the parent counts why (Pool.stats()).
        self.store_word(self.started, _RETIRED_CODES[why])

    def take(self, limit):
        # The core runs the plain calls itself and comes back for anything else.
        done, end, tag, ok, value = self.serve(
            *self.serve_args, _SERVE_FOREVER if limit is None else limit)
        if end == _SERVED_TASK:
            if tag == _STOP_TAG:
                return done, _STOP, None, None
            if not ok:
                return done, _BAD, tag, value
            fkey, args, kwds = value
            funcs = self.funcs
            try:
                func = funcs[fkey]
            except (KeyError, TypeError):
                try:
                    func = funcs.worker_func(fkey)
                except Exception as e:
                    return done, _BAD, tag, e
            # The call begins: from here on it is timed (see task_timeout).
            self.store_word(self.started, tag)
            return done, _TASK, tag, (func, args, kwds)
        if end == _SERVED_LIMIT:
            return done, _LIMIT, None, None
        return done, _RESULT if end == _SERVED_RESULT else _ERROR, tag, value

    def post(self, tag, ok, value, func=None, more=True, general=False, args=None):
        results = self.channel.results
        if not ok:
            tag |= _FAIL
        # We wait for the next task right after the put: the parent need not wake an
        # idle sibling for it.
        hold = self.hold if more else None
        # Plain scalars and map chunks' lists of plain numbers go without the pickler
        # (the core tried already when it ran the task itself: general).
        packs = type(value) is list and func in _PACKING_RUNNERS
        if (packs or (not general and _is_plain(value))) and results.put(
                tag, value, self.slot, hold, plain=True):
            return
        try:
            data = self.channel.dumps(value, False)
        except Exception as e:
            data = None
            # A result the standard pickler refuses goes back by value only when the
            # task's own code came by value; otherwise it fails as in the stdlib.
            if isinstance(e, reduction._FALLBACK_ERRORS) and _came_by_value(func, args):
                try:
                    data = self.channel.dumps(value)
                except Exception as e2:
                    e = e2
            if data is None:
                data = _dumps(_unencodable(e, value))
                tag |= _FAIL
        value = None
        results.put(tag, data, self.slot, hold)


_PACKING_RUNNERS = frozenset(_CHUNK_RUNNERS.values()) | frozenset(
    _TIMED_CHUNK_RUNNERS.values())
_RUNNERS = _PACKING_RUNNERS | {mapstar, starmapstar, _timed_mapstar}


def _came_by_value(func, args):
    """Whether a task's code (its function, or the function a chunk runner maps) came
    by value: it is not what its module holds under its name (a lambda, a closure, a
    class or function of an interactive ``__main__``)."""
    if func in _RUNNERS and args and type(args[0]) is tuple and args[0]:
        func = args[0][0]
    func = getattr(func, 'func', func)     # functools.partial
    obj = sys.modules.get(getattr(func, '__module__', None) or '')
    for part in (getattr(func, '__qualname__', None) or '?').split('.'):
        obj = getattr(obj, part, None)
    return obj is not func
_SERVED_TASK = _core.SERVE_TASK
_SERVED_LIMIT = _core.SERVE_LIMIT
_SERVED_RESULT = _core.SERVE_RESULT


def _ring_worker(channel, slot, wid, initializer=None, initargs=(), maxtasks=None,
                 wrap_exception=True, max_memory=None):
    """The body of a process pool worker."""
    global _progress_word
    # Its own process group: a call that runs past its task_timeout is stopped with
    # every process it started (the parent signals the group).
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    _progress_word = (channel.claims, channel.progress_word(slot))
    _work(_RingSide(channel, slot, wid), initializer, initargs, maxtasks, wrap_exception,
          max_memory)


#
# The parent's side of one worker
#

class _Slot:
    """One worker and what the parent knows about it."""

    def __init__(self, proc):
        self.proc = proc
        self.ready = False      # its initializer has completed
        self.stopping = False   # it has been told to stop
        self.init_error = None  # what its initializer raised
        self.retired = None     # why it exits on its own (_RETIRED_MEMORY...)

    def describe(self):
        name = getattr(self.proc, 'name', '?')
        pid = getattr(self.proc, 'pid', None)
        return 'pool worker %s (pid %s)' % (name, pid)

    def loss(self, exitcode):
        """The message of the WorkerLostError for the task this worker held."""
        return '%s died while running this task: exit code %s' % (
            self.describe(), _exit_description(exitcode))


class _ThreadSlot(_Slot):
    """A thread worker."""

    def __init__(self):
        super().__init__(None)

    def describe(self):
        return 'pool worker thread %s' % getattr(self.proc, 'name', '?')

    def loss(self, exitcode):
        return '%s exited while running this task' % self.describe()


class _ProcessSlot(_Slot):
    """A process worker: its claim word's index, its id and its sentinel."""

    def __init__(self, proc, index, wid):
        super().__init__(proc)
        self.index = index
        self.wid = wid
        # task_timeout: ((tag, call), since) of the call it was last seen in; and,
        # once that call ran past its timeout, ((tag, call), timeout) and when the
        # SIGKILL follows the SIGTERM.
        self.watch = None
        self.expired = None
        self.kill_at = None
        try:
            self.sentinel = proc.sentinel
        except (AttributeError, ValueError):
            self.sentinel = None

    def exitcode_after_exit(self):
        # The sentinel fired, so the worker is exiting. (Unless it closed its own
        # fds, the sentinel's among them, and runs on: then it is stopped here.)
        self.proc.join(5)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
        return self.proc.exitcode


class _Feed:
    """An imap in progress: where the feeder is in the caller's iterable."""

    __slots__ = ('result', 'source', 'func', 'chunksize', 'iterator', 'next_index',
                 'blocked', 'inline', 'lock')

    def __init__(self, result, func, source, chunksize, inline=False):
        self.result = result
        self.func = func
        self.source = source
        self.chunksize = chunksize
        self.iterator = None
        self.next_index = 0
        self.blocked = False
        # Fed by the consumer's own thread while the pool runs (see feed_inline).
        self.inline = inline
        self.lock = threading.Lock()


def _deliver(result, i, obj):
    try:
        result._set(i, obj)
    except BaseException:
        _report_error()


#
# The engines: everything a Pool's threads share. An engine holds no reference to the
# Pool object, so an unreferenced Pool can be collected (and then finalized).
#

class _Engine:
    """What both engines share: the workers' lifecycle (start, replace, give up when
    they keep failing to start), imap feeds, the engine's thread and shutdown. The
    engines differ in how tasks reach workers and results come back (``submit``,
    ``wait_for`` and the thread's ``_loop``)."""

    def __init__(self, ctx, Process, processes, pool, cache, initializer, initargs,
                 maxtasks, wrap_exception, max_memory=None):
        self.ctx = ctx
        self.Process = Process
        self.processes = processes
        self.pool = pool            # the Pool's _pool list (worker Process objects)
        self.cache = cache          # the Pool's _cache: job -> result object
        self.initializer = initializer
        self.initargs = initargs
        self.maxtasks = maxtasks
        self.max_memory = max_memory
        self.wrap_exception = wrap_exception
        self.pid = os.getpid()

        self.lock = threading.RLock()
        self.state = RUN
        self.slots = []
        self.broken = None                   # (message, cause) once broken
        self.failed_starts = 0
        self.max_failed_starts = max(3, processes)
        self.retry_at = 0.0
        self.torn_down = False
        self.thread = None

        self.feeds = []
        # Reentrant, like self.lock: a pool finalized by the garbage collector runs
        # terminate() in whatever thread the collection happened, maybe one that
        # holds these.
        self.feed_cond = threading.Condition(threading.RLock())
        self.feeder = None
        self.feeder_in_user_code = False
        # Tasks an imap may run ahead of its consumer while the pool runs.
        self.lookahead = max(64, 8 * processes)
        # The feeder submits at most this many tasks of one imap at a time.
        self.feed_burst = 4 * processes + 16

        self.progressing = set()    # _Progress objects of maps and imaps in flight
        # Pool.stats(): workers replaced, by cause; the counters of those gone.
        self.replaced = dict.fromkeys(('died', 'timed_out', 'memory', 'maxtasks'), 0)
        self.exited = [0, 0.0, 0, 0]
        self.wake_lock = threading.Lock()
        self.wake_pending = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        cache.notifier = self._cache_emptied

    # -- what the front calls (any thread) ----------------------------------------------

    def add_progress(self, progress):
        # (No wake-up: the submit that follows wakes an idle engine's thread, and a
        # busy one sees this within its current tick.)
        self.progressing.add(progress)

    def stats(self):
        """What ``Pool.stats()`` returns (see there)."""
        with self.lock:
            workers = []
            for s in self.slots:
                tasks, busy, args, results = self._counters(s)
                workers.append({'pid': getattr(s.proc, 'pid', None),
                                'name': getattr(s.proc, 'name', None),
                                'tasks': tasks, 'busy_seconds': busy,
                                'arg_bytes': args, 'result_bytes': results})
            tasks, busy, args, results = self.exited
            return {'workers': workers,
                    'exited': {'tasks': tasks, 'busy_seconds': busy, 'arg_bytes': args,
                               'result_bytes': results},
                    'replaced': dict(self.replaced)}

    def _count_exit(self, slot):
        # (with self.lock) A worker is gone: its counts go to the totals, and, if the
        # pool replaces it, its cause is counted.
        for i, v in enumerate(self._counters(slot)):
            if v is not None and self.exited[i] is not None:
                self.exited[i] += v
        if slot.ready and not slot.stopping and self._wants_workers():
            cause = 'timed_out' if getattr(slot, 'expired', None) is not None else (
                slot.retired or 'died')
            self.replaced[cause] = self.replaced.get(cause, 0) + 1

    def _tick_progress(self, timeout):
        # (the engine's thread, each turn) Reports every map's and imap's progress at
        # most every _PROGRESS_PERIOD; returns the wait's timeout, shortened to that
        # period while some are in flight.
        for p in list(self.progressing):
            if p.ended:
                self.progressing.discard(p)
            else:
                p.report()
        if not self.progressing:
            return timeout
        tick = int(_PROGRESS_PERIOD * 1000)
        return tick if timeout is None else min(timeout, tick)

    def submit(self, job, func, items, first=0, unpack=False, kwds=None, feeding=False):
        """Submits ``func(item)`` -- ``func(*item, **kwds)`` if ``unpack`` -- for each
        item of ``items`` (a sequence), as tasks ``first``, ``first + 1``, ... of
        ``job``. An item that ``unpack`` cannot turn into arguments fails its task. An
        item that cannot be pickled raises here, unless ``feeding`` (an imap's feeder,
        which may also submit after close()): then it fails its task."""
        raise NotImplementedError

    def check_func(self, func):
        """Raises here if ``func`` cannot reach a worker."""

    def wait_for(self, ready, timeout, sleep):
        """Waits until ``ready()`` or ``timeout``; ``sleep(t)`` waits for a wake-up."""
        if not ready():
            sleep(timeout)

    def _cache_emptied(self):
        # A closed pool finishes once nothing is left to wait for; a running one
        # has nothing to do then.
        if self.state != RUN:
            self.wake()

    def wake(self):
        if self.wake_pending:
            return
        self.wake_pending = True
        with self.wake_lock:
            if self.wake_w is not None:
                try:
                    os.write(self.wake_w, b'\0')
                except OSError:
                    pass

    def foreign(self):
        """True in a forked child: the pool's threads and workers are the parent's."""
        return os.getpid() != self.pid

    def broken_error(self):
        message, cause = self.broken
        exc = _error_class('BrokenPoolError')(message)
        exc.__cause__ = cause
        return exc

    def _may_submit(self, internal=False):
        if self.state == TERMINATE or (self.state != RUN and not internal):
            raise ValueError("Pool not running")
        if self.broken is not None:
            raise self.broken_error()

    def _fail_task(self, job, i, exc):
        r = self.cache.get(job)
        if r is not None:
            _deliver(r, i, (False, exc))

    def add_feed(self, feed):
        with self.lock:
            self._may_submit()
            if self.feeder is None:
                self.feeder = threading.Thread(target=self._feed_loop, daemon=True,
                                               name='PoolFeeder')
                self.feeder.start()
        with self.feed_cond:
            self.feeds.append(feed)
            self.feed_cond.notify()

    def feed_inline(self, feed):
        """Tops up an inline feed's tasks from the consumer's thread: its source is a
        list, tuple or range, whose iteration cannot block, so the consumer may pull
        it without a hand-off to the feeder thread. Once the pool is closed the feeder
        carries it on (then nobody may be consuming)."""
        if self.state != RUN or not feed.lock.acquire(False):
            return
        try:
            if self.state == RUN and feed in self.feeds:
                self._produce(feed, self._feed_room(feed))
        finally:
            feed.lock.release()

    def taken(self, feed):
        # Called by IMapIterator.next(): the caller took one item of this feed. Wake
        # the feeder (or feed inline) only once half its look-ahead is free again.
        half = self.lookahead // 2
        if feed.inline:
            if feed.next_index - feed.result._taken <= half:
                self.feed_inline(feed)
            # Nothing to do until half the look-ahead is free again.
            feed.result._wake_at = feed.next_index - half
            return
        if feed.blocked and feed.next_index - feed.result._taken <= half:
            feed.blocked = False
            with self.feed_cond:
                self.feed_cond.notify()

    def start_threads(self):
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name='PoolDispatcher')
        self.thread.start()

    def repopulate(self):
        with self.lock:
            for _ in range(self.processes - len(self.pool)):
                self._start_worker()
        self.wake()

    def close(self):
        with self.lock:
            if self.state == RUN:
                self.state = CLOSE
        self.wake()
        with self.feed_cond:
            self.feed_cond.notify_all()

    def terminate(self):
        if self.foreign():
            return
        with self.lock:
            self.state = TERMINATE
        self.wake()
        with self.feed_cond:
            self.feed_cond.notify_all()
        me = threading.current_thread()
        thread = self.thread
        if thread is not None and thread.is_alive():
            if thread is not me:
                thread.join()
            # else: called from a callback; the loop tears down when it returns.
        else:
            self._teardown()
        feeder = self.feeder
        if feeder is not None and feeder is not me and not self.feeder_in_user_code:
            feeder.join(1.0)

    def join_threads(self):
        for t in (self.thread, self.feeder):
            if t is not None:
                t.join()

    def abort_start(self):
        """Undo a constructor that failed while starting workers."""
        self._stop_workers(list(self.slots))
        self.slots.clear()
        self.torn_down = True
        self._close_wake_pipe()

    # -- workers (called with self.lock held) ---------------------------------------

    def _launch(self, target, args):
        w = self.Process(self.ctx, target=target, args=args)
        w.name = w.name.replace('Process', 'PoolWorker')
        w.daemon = True
        w.start()
        return w

    def _wants_workers(self):
        if self.broken is not None or self.state == TERMINATE:
            return False
        return self.state == RUN or bool(self.cache)

    def _maintain(self):
        if not self._wants_workers() or time.monotonic() < self.retry_at:
            return
        while len(self.slots) < self.processes:
            try:
                self._start_worker()
            except Exception as e:
                util.debug('failed to start a pool worker: %r' % e)
                self._failed_start(e)
                self.retry_at = time.monotonic() + 0.05 * self.failed_starts
                return

    def _on_ready(self, slot):
        slot.ready = True
        self.failed_starts = 0
        self.retry_at = 0.0

    def _failed_start(self, cause):
        self.failed_starts += 1
        if self.failed_starts >= self.max_failed_starts and self.broken is None:
            self.broken = (
                'pool workers failed to start %d times in a row (the last failure is '
                'the cause); the pool cannot run tasks' % self.failed_starts, cause)
            util.info('pool broken: %r' % (cause,))
            with self.feed_cond:
                self.feed_cond.notify_all()

    def _not_ready(self, slot, exitcode):
        # A worker that died before it was ready: one more failed start.
        cause = slot.init_error
        if cause is None:
            cause = _error_class('WorkerLostError')(
                '%s exited with code %s before it was ready'
                % (slot.describe(), _exit_description(exitcode)),
                getattr(slot.proc, 'pid', None), exitcode)
        self._failed_start(cause)

    def _lost(self, slot, exitcode, where):
        # The task (job, i) the dead worker held fails with WorkerLostError.
        exc = _error_class('WorkerLostError')(
            slot.loss(exitcode), getattr(slot.proc, 'pid', None), exitcode)
        self._fail_task(where[0], where[1], exc)

    def _forget_slot(self, slot):
        # (with self.lock)
        if slot in self.slots:
            self.slots.remove(slot)
        if slot.proc in self.pool:
            self.pool.remove(slot.proc)

    def _loop_state(self):
        # (with self.lock) Whether the loop is done (closed or broken and no worker
        # left), and the poll timeout (ms) for the next attempt to start workers, if
        # one is due.
        finished = self.state != RUN and not self.slots and (
            not self.cache or self.broken is not None)
        timeout = None
        if self.retry_at and self._wants_workers() and len(self.slots) < self.processes:
            timeout = max(0, int((self.retry_at - time.monotonic()) * 1000))
        return finished, timeout

    # -- the engine's thread --------------------------------------------------------------

    def _run(self):
        failure = None
        try:
            self._loop()
        except BaseException as e:
            failure = e
            _report_error('the ferromp pool dispatcher thread')
        finally:
            self._teardown(failure)

    def _loop(self):
        # Each turn: under the lock, start workers and tend the tasks (``_tend``, which
        # returns what the rest of the turn needs); then, without it, deliver what
        # that decided (``_after_tend``) and wait for the next event (``_wait``).
        while True:
            with self.lock:
                if self.state == TERMINATE:
                    return
                self._maintain()
                tended = self._tend()
                finished, timeout = self._loop_state()
            self._after_tend(tended)
            if finished:
                return      # the teardown fails whatever a broken pool left
            self._wait(timeout, tended)
            tended = None

    def _drain_wake(self):
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        # Cleared after draining, before looking at the queues (see wake()).
        self.wake_pending = False

    # -- shutting down ------------------------------------------------------------------

    def _teardown(self, failure=None):
        with self.lock:
            if self.torn_down:
                return
            self.torn_down = True
            if failure is not None and self.broken is None:
                self.broken = ('the pool dispatcher thread failed: %r' % (failure,), failure)
            slots = list(self.slots)
        self._stop_workers(slots)
        with self.lock:
            for s in slots:
                self._forget_slot(s)
        if self.broken is not None:
            make_exc = self.broken_error
        else:
            def make_exc():
                return _error_class('PoolTerminatedError')(
                    'the pool was terminated before this task completed')
        for r in list(self.cache.values()):
            try:
                r._fail(make_exc())
            except BaseException:
                _report_error()
        with self.feed_cond:
            self.feed_cond.notify_all()
        self._close_wake_pipe()

    def _close_wake_pipe(self):
        with self.wake_lock:
            r, w = self.wake_r, self.wake_w
            self.wake_r = self.wake_w = None
        for fd in (r, w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    # -- the feeder thread (imap) -------------------------------------------------------

    def _feed_loop(self):
        try:
            while True:
                with self.feed_cond:
                    while True:
                        if self.state == TERMINATE or self.torn_down:
                            self.feeds = []
                            return
                        if self.broken is not None:
                            feeds, self.feeds = self.feeds, []
                            break
                        ready = []
                        for f in self.feeds:
                            if f.inline and self.state == RUN:
                                continue
                            f.blocked = self._feed_room(f) <= 0
                            if not f.blocked:
                                ready.append(f)
                        if ready and self._queue_room() > 0:
                            break
                        if not ready and not self.feeds and self.state != RUN:
                            return
                        self.feed_cond.wait(1.0)
                if self.broken is not None:
                    for f in feeds:
                        _deliver(f.result, f.next_index, (False, self.broken_error()))
                        f.result._set_length(f.next_index + 1)
                    continue
                for f in ready:
                    with f.lock:
                        self._produce(f)
                ready = f = None
        except BaseException:
            _report_error('the ferromp pool feeder thread')
            with self.feed_cond:
                feeds, self.feeds = self.feeds, []
            for f in feeds:
                f.result._fail(_error_class('PoolError')('the pool feeder thread failed'))

    def _queue_room(self):
        # How many more tasks the feeder may queue now (the thread engine bounds its
        # inbox; the process engine's task ring absorbs them).
        return self.lookahead

    def _feed_room(self, f):
        # How many more tasks this imap may have in flight: bounded by what the caller
        # has consumed while the pool runs; unbounded once it is closed, so that
        # close(); join() finishes the work, as in the stdlib.
        if self.state != RUN:
            return self.feed_burst
        return self.lookahead - (f.next_index - f.result._taken)

    def _produce(self, f, limit=None):
        # Pulls a burst of items (or chunks) from one feed and submits them: short, so
        # that feeds take turns. (An inline feed is given its limit: all its room.)
        if limit is None:
            limit = min(self._feed_room(f), self.feed_burst)
        limit = min(limit, self._queue_room())
        if limit <= 0 or self.state == TERMINATE:
            return
        idx = f.next_index
        items = []
        ended = False
        error = None
        self.feeder_in_user_code = True
        try:
            if f.inline and f.chunksize == 1:
                # A list, tuple or range: a slice of it (a range's is a range).
                items = f.source[idx:idx + limit]
                ended = idx + len(items) >= len(f.source)
            elif f.iterator is None:
                if f.chunksize == 1:
                    f.iterator = iter(f.source)
                else:
                    f.iterator = Pool._get_tasks(f.func, f.source, f.chunksize)
            if f.iterator is not None:
                next_item = f.iterator.__next__
                for _ in range(limit):
                    items.append(next_item())
        except StopIteration:
            ended = True
        except Exception as e:
            error = e
        finally:
            self.feeder_in_user_code = False
        f.next_index = idx + len(items)
        if items:
            func = f.func if f.chunksize == 1 else mapstar
            chunks = f.result._timed_chunks
            if chunks is not None:
                # Timed chunks: each call is timed; kept to run again after a timeout.
                func = _timed_mapstar
                for i, (g, chunk) in enumerate(items, idx):
                    chunks[i] = (func, g, chunk)
            try:
                self.submit(f.result._job, func, items, idx, feeding=True)
            except Exception as e:
                # Broken or terminated meanwhile: these items fail (a terminated
                # pool's teardown has failed the whole iterator already).
                for i in range(idx, f.next_index):
                    _deliver(f.result, i, (False, e))
                error = None
                ended = True
        items = None
        if error is not None:
            _deliver(f.result, f.next_index, (False, error))
            self._end_feed(f, f.next_index + 1)
        elif ended:
            self._end_feed(f, f.next_index)

    def _end_feed(self, f, length):
        with self.feed_cond:
            if f in self.feeds:
                self.feeds.remove(f)
        f.result._set_length(length)


class _ThreadEngine(_Engine):
    """A ThreadPool's engine, scheduled as the stdlib's: the worker threads take tasks
    from one inbox and post results (and, last, their exit) to an outbox, which the
    engine's thread reads."""

    def __init__(self, *args, **kwds):
        super().__init__(*args, **kwds)
        self.inbox = queue.SimpleQueue()    # (job, i, func, args, kwds); None: stop
        self.outbox = queue.SimpleQueue()   # (slot, message)
        self.exited = [0, 0.0, None, None]  # (threads pickle nothing: no bytes)
        # The feeder tops the inbox up to feed_burst tasks and sleeps until the
        # engine's thread sees it below half of that: bursts, not a switch per task.
        self.feed_demand = False

    def submit(self, job, func, items, first=0, unpack=False, kwds=None, feeding=False):
        tasks = []
        for i, item in enumerate(items, first):
            if unpack:
                try:
                    item = tuple(item)
                except Exception as e:
                    self._fail_task(job, i, e)
                    continue
            else:
                item = (item,)
            tasks.append((job, i, func, item, kwds))
        with self.lock:
            self._may_submit(feeding)
            put = self.inbox.put
            for task in tasks:
                put(task)

    def _queue_room(self):
        # The demand is announced before looking at the inbox, so the engine's thread,
        # which looks at the flag after a result came, cannot miss it.
        self.feed_demand = True
        room = self.feed_burst - self.inbox.qsize()
        if room > 0:
            self.feed_demand = False
        return room

    def _counters(self, slot):
        side = getattr(slot, 'side', None)
        if side is None:
            return 0, 0.0, None, None
        return side.tasks, side.busy, None, None

    def _start_worker(self):
        slot = _ThreadSlot()
        slot.proc = self._launch(_thread_worker, (self.inbox, self.outbox, slot, self.wake,
                                                  self.initializer, self.initargs))
        self.slots.append(slot)
        self.pool.append(slot.proc)
        util.debug('added worker')

    def _tend(self):
        # (with self.lock) A broken pool fails the tasks not started (returned, to fail
        # after the lock is let go); a closed pool with nothing left to wait for stops
        # its threads.
        failed = []
        if self.broken is not None:
            failed = [task[:2] for task in self._take_queued()]
            self._send_stops()
        elif self.state == CLOSE and not self.cache:
            self._send_stops()
        return failed

    def _after_tend(self, failed):
        for job, i in failed:
            self._fail_task(job, i, self.broken_error())

    def _send_stops(self):
        for s in self.slots:
            if not s.stopping:
                s.stopping = True
                self.inbox.put(None)

    def _take_queued(self):
        # The tasks no thread has taken yet, out of the inbox; its stop messages stay.
        tasks = []
        stops = 0
        try:
            while True:
                task = self.inbox.get_nowait()
                if task is None:
                    stops += 1
                else:
                    tasks.append(task)
        except queue.Empty:
            pass
        for _ in range(stops):
            self.inbox.put(None)
        return tasks

    def _wait(self, timeout, _):
        if self.progressing:
            timeout = self._tick_progress(timeout)
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        if poller.poll(timeout):
            self._drain_wake()
            self._read_outbox()
        if self.feed_demand and self.inbox.qsize() < self.feed_burst // 2:
            with self.feed_cond:
                self.feed_demand = False
                self.feed_cond.notify()

    def _read_outbox(self):
        while True:
            try:
                slot, msg = self.outbox.get_nowait()
            except queue.Empty:
                break
            job, i, obj = msg
            if job is not None:
                r = self.cache.get(job)
                if r is not None:
                    _deliver(r, i, obj)
            elif i == _READY:
                self._on_ready(slot)
            elif i == _INIT_FAILED:
                slot.init_error = obj[1]
            elif i == _EXITED:
                self._on_exit(slot, obj)
            slot = msg = obj = r = None

    def _on_exit(self, slot, held):
        slot.proc.join()
        with self.lock:
            self._count_exit(slot)
            self._forget_slot(slot)
            if not slot.ready:
                self._not_ready(slot, None)
        util.debug('pool worker exited: %s' % slot.describe())
        if held is not None:
            self._lost(slot, None, held)

    def _stop_workers(self, slots):
        # A thread cannot be stopped: drop the queued work and ask each to finish; one
        # that is busy is abandoned.
        self._take_queued()
        for s in slots:
            s.stopping = True
            self.inbox.put(None)
        deadline = time.monotonic() + 0.2
        for s in slots:
            if s.proc is not None:
                s.proc.join(max(0.0, deadline - time.monotonic()))


class _ProcessEngine(_Engine):
    """A process Pool's engine: tasks and results travel through two shared rings
    (see ``_Channel``). Callers write their tasks into the task ring themselves and a
    caller waiting for a result reads the result ring itself (``wait_for``), so
    neither path goes through the engine's thread; it starts and replaces workers,
    attributes the task of a worker that died, runs callbacks, and collects results
    that nobody waits for."""

    def __init__(self, *args, **kwds):
        super().__init__(*args, **kwds)
        main_by_value = reduction._main_by_value(_context._start_method_of(self.ctx))
        self.channel = (_MainChannel if main_by_value else _Channel)(self.processes)
        self.free_indexes = list(range(self.processes - 1, -1, -1))
        self.wids = itertools.count(1)
        self.by_wid = {}
        # Task numbers, a block of _BLOCK per batch (block 0 holds the stop tag).
        self.blocks = itertools.count(1)
        self.inflight = {}              # task number -> (job, i) not yet answered
        self.collect_lock = threading.Lock()
        self.handoff = collections.deque()  # (result, i, obj) for callbacks
        self.unrouted = collections.deque()  # (tag, ok, obj) taken from the ring
        self.idle = False               # the engine's thread sleeps without a tick
        self.funcs = _FuncCache()
        if main_by_value:
            self.funcs.dumps = reduction._dumps_bytes_main
        self.last_collect = 0.0         # when a caller last submitted or collected
        self.next_liveness = 0.0
        self.timed = set()              # jobs with a task_timeout, maybe finished
        self.expiring = []              # slots stopped for a timeout, not exited yet

    # -- submitting (any thread) ------------------------------------------------------

    def check_func(self, func):
        self.funcs.parent_key(func)

    def submit(self, job, func, items, first=0, unpack=False, kwds=None, feeding=False):
        self._may_submit(feeding)
        fkey = self.funcs.parent_key(func)
        # func(item) of a plain scalar item goes natively (PoolRing.put_calls), up to
        # _BLOCK a batch; the rest is pickled, _BATCH a batch.
        native = type(fkey) is bytes and not unpack and not kwds and type(items) in _SEQUENCES
        inflight = self.inflight
        n = len(items)
        at = 0
        while at < n:
            tag0 = next(self.blocks) << _BLOCK_BITS
            if native:
                k = n - at if n - at < _BLOCK else _BLOCK
                # Recorded before the write: a result may come back before it returns.
                if k == 1:
                    inflight[tag0] = (job, first + at)
                else:
                    inflight.update(zip(range(tag0, tag0 + k), zip(
                        itertools.repeat(job), range(first + at, first + at + k))))
                try:
                    written = self.channel.tasks.put_calls(tag0, fkey, items, at, at + k)
                except BaseException:
                    written = 0
                    raise
                finally:
                    if written < k:
                        for tag in range(tag0 + written, tag0 + k):
                            del inflight[tag]
                if written:
                    at += written
                    continue
                # (Nothing went out under tag0: the pickled batch takes the block. After
                # it, the plain items go natively again.)
            at = self._put_pickled(tag0, job, fkey, items, at, min(n, at + _BATCH), first,
                                   unpack, kwds, feeding, at == 0)
            if at < n:
                # Take in the results that came meanwhile, here rather than in the
                # engine's thread, which would wait for our GIL.
                self.drain()
        self._submitted()

    def _put_pickled(self, tag0, job, fkey, items, at, stop, first, unpack, kwds, feeding,
                     first_batch):
        # Pickles and writes the items from ``at`` up to ``stop``; returns where it
        # stopped (before ``stop`` when a long first batch goes out early).
        started = first_batch and time.perf_counter()
        encode = self.channel.encode_task
        inflight = self.inflight
        batch = []
        tag = tag0
        try:
            while at < stop:
                item = items[at]
                i = first + at
                at += 1
                try:
                    args = tuple(item) if unpack else (item,)
                except Exception as e:
                    # As the stdlib's starmap fails in the worker.
                    self._fail_task(job, i, e)
                    continue
                try:
                    payload = encode(fkey, args, kwds)
                except Exception as e:
                    if not feeding:
                        raise
                    self._fail_task(job, i, e)
                    continue
                inflight[tag] = (job, i)
                batch.append((tag, payload))
                tag += 1
                item = args = payload = None
                # A long first batch goes out once pickling has taken a moment, so a
                # worker starts while we pickle on.
                if started and time.perf_counter() - started > _FIRST_BATCH_TIME:
                    break
            if len(batch) == 1:
                self.channel.tasks.put(*batch[0])
            elif batch:
                # One wake-up for the batch: waking a worker can preempt us at once.
                self.channel.tasks.put_many(batch)
        except BaseException:
            # Which of them went out is unknown: forget them all (results of any that
            # run are dropped); the caller's job fails with this error.
            for tag, _ in batch:
                inflight.pop(tag, None)
            raise
        return at

    def _submitted(self):
        # A caller submitted: it will collect (see _loop), and an idle engine thread
        # must look at the new tasks.
        self.last_collect = time.monotonic()
        if self.idle:
            self.idle = False
            self.wake()

    # -- collecting results (any thread) ------------------------------------------------

    def wait_for(self, ready, timeout, sleep):
        """Waits until ``ready()`` or ``timeout``, reading the result ring meanwhile if
        no other thread does; otherwise ``sleep(t)`` waits for that thread to deliver."""
        if ready():
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = self.collect_lock
        while not ready():
            left = _COLLECT_SLICE
            if deadline is not None:
                left = min(left, deadline - time.monotonic())
                if left <= 0:
                    return
            if self.torn_down or self.foreign() or not lock.acquire(False):
                sleep(min(left, 0.002) if not self.torn_down else left)
                continue
            try:
                self._collect(ready, deadline)
            finally:
                self.last_collect = time.monotonic()
                lock.release()

    def _collect(self, ready, deadline):
        take = self.channel.results.take_into
        unrouted = self.unrouted
        while not ready() and not self.torn_down:
            # (Results already taken, by a caller interrupted before it routed them
            # all, go first.)
            if not unrouted:
                left = _COLLECT_SLICE
                if deadline is not None:
                    left = min(left, deadline - time.monotonic())
                    if left <= 0:
                        return
                try:
                    if not take(_loads, _TAKE_BATCH, unrouted.append, True, left):
                        continue
                except OSError:
                    return
            # These, and whatever else has come, without waiting.
            self._route_ready(False)

    def _route_ready(self, in_engine_thread):
        # Routes the results in the ring now, without waiting (collect_lock held),
        # taking them a batch per call.
        take = self.channel.results.take_into
        unrouted = self.unrouted
        while True:
            if not unrouted:
                try:
                    if not take(_loads, _TAKE_BATCH, unrouted.append):
                        return
                except OSError:
                    return
            self._route(in_engine_thread)

    def results_waiting(self):
        """Whether results wait to be routed, in the ring or taken already."""
        return bool(self.unrouted) or self.channel.results.has_data()

    def drain(self, in_engine_thread=False):
        """Routes the results already in the ring, if no other thread is reading it."""
        if not self.results_waiting() or not self.collect_lock.acquire(False):
            return
        try:
            self._route_ready(in_engine_thread)
        finally:
            if not in_engine_thread:
                self.last_collect = time.monotonic()
            self.collect_lock.release()

    def _route(self, in_engine_thread):
        """Hands each result taken from the ring (``self.unrouted``, ``(tag, ok, obj)``
        each) to its result object, in one loop: this is most of the caller's work per
        task. The results wait in ``unrouted`` until then, so a KeyboardInterrupt in
        between loses none: whoever collects next routes them."""
        unrouted = self.unrouted
        take_next = unrouted.popleft
        inflight_pop = self.inflight.pop
        cache_get = self.cache.get
        while unrouted:
            tag, ok, obj = take_next()
            if tag & _CTL:
                self._on_control(tag, obj)
                continue
            where = inflight_pop(tag & _SEQ_MASK, None)
            if where is None:
                continue    # answered already (failed by a death verdict, or terminated)
            r = cache_get(where[0])
            if r is None:
                continue
            obj = (ok and not tag & _FAIL, obj)
            if r._has_callbacks and not in_engine_thread:
                # Callbacks run in the engine's thread, as in the stdlib's result
                # handler.
                self.handoff.append((r, where[1], obj))
                self.wake()
                continue
            try:
                r._set(where[1], obj)
            except BaseException:
                _report_error()

    def _on_control(self, tag, obj):
        kind = (tag >> 40) & 0xff
        if kind == _CTL_NUDGE:
            return
        with self.lock:
            slot = self.by_wid.get(tag & _WID_MASK)
            if slot is None:
                return
            if kind == _CTL_READY:
                self._on_ready(slot)
            elif kind == _CTL_INIT_FAILED:
                slot.init_error = obj

    def _nudge(self):
        # Wakes a caller blocked reading the result ring, so it looks at its result
        # again (failed by a death verdict or by terminate()).
        if self.collect_lock.locked():
            try:
                self.channel.results.put(_ctl_tag(_CTL_NUDGE, 0), _NONE_PICKLE)
            except OSError:
                pass

    # -- workers (called with self.lock held) ---------------------------------------

    def _counters(self, slot):
        return self.channel.counters(slot.index)

    def _start_worker(self):
        index = self.free_indexes.pop()
        self.channel.reset_slot(index)
        wid = next(self.wids)
        try:
            w = self._launch(_ring_worker, (self.channel, index, wid, self.initializer,
                                            self.initargs, self.maxtasks,
                                            self.wrap_exception, self.max_memory))
        except BaseException:
            self.free_indexes.append(index)
            raise
        slot = _ProcessSlot(w, index, wid)
        self.by_wid[wid] = slot
        self.slots.append(slot)
        self.pool.append(w)
        util.debug('added worker')

    def _tend(self):
        # (with self.lock) A broken pool fails the tasks no live worker holds; a
        # closed pool with nothing left to wait for stops its workers. Returns the
        # workers to watch.
        if self.broken is not None:
            claims = self.channel.claims
            held = {claims.load_word(s.index) for s in self.slots}
            for tag in [t for t in self.inflight if t not in held]:
                where = self.inflight.pop(tag, None)
                r = self.cache.get(where[0]) if where is not None else None
                if r is not None:
                    self.handoff.append((r, where[1], (False, self.broken_error())))
            self._send_stops()
        elif self.state == CLOSE and not self.cache:
            self._send_stops()
        return list(self.slots)

    def _send_stops(self):
        n = 0
        for s in self.slots:
            if not s.stopping:
                s.stopping = True
                n += 1
        for _ in range(n):
            self.channel.tasks.put(_STOP_TAG, _NONE_PICKLE)

    # -- the engine's thread --------------------------------------------------------------

    def _after_tend(self, slots):
        self._run_handoff()

    def _wait(self, timeout, slots):
        if self.progressing:
            timeout = self._tick_progress(timeout)
        if self.timed or self.expiring:
            self._check_timeouts()
            if self.timed or self.expiring:
                tick = int(_TIMEOUT_TICK * 1000)
                timeout = tick if timeout is None else min(timeout, tick)
        watch = bool(self.inflight) or any(not s.ready for s in slots)
        if watch:
            left = max(0, int((self.next_liveness - time.monotonic()) * 1000))
            timeout = left if timeout is None else min(timeout, left)
        # A caller that submitted or collected lately will collect: unpickling results
        # here would only keep it waiting for the GIL.
        recent = self.collect_lock.locked() or \
            time.monotonic() - self.last_collect < _QUIET_TICK
        if not recent:
            self.drain(True)
            self._run_handoff()
        # Tick while results may come that nobody waits for; otherwise sleep until a
        # submit() wakes us (it looks at self.idle after adding its task).
        self.idle = True
        if recent or self.inflight or self.results_waiting():
            self.idle = False
            tick = int((_QUIET_TICK if recent else _BACKGROUND_TICK) * 1000)
            timeout = tick if timeout is None else min(timeout, tick)
        poller = select.poll()
        handlers = {self.wake_r: None}
        poller.register(self.wake_r, select.POLLIN)
        for s in slots:
            if s.sentinel is not None:
                poller.register(s.sentinel, select.POLLIN)
                handlers[s.sentinel] = s
        events = poller.poll(timeout)
        self.idle = False
        exits = [handlers[fd] for fd, _ in events if handlers[fd] is not None]
        if len(exits) < len(events):
            self._drain_wake()
        for s in exits:
            self._on_exit(s)
        if watch and time.monotonic() >= self.next_liveness:
            self._check_liveness()

    # -- task_timeout (the engine's thread) ----------------------------------------------

    def _check_timeouts(self):
        # A call is identified by its task's tag (the worker's claim word) and, in a
        # timed chunk, its index (the worker's progress word); it has run since this
        # thread first saw that pair, at most a tick after it started. One that ran
        # past its timeout has its worker's process group stopped.
        now = time.monotonic()
        for s in list(self.expiring):
            if s.kill_at is not None and now >= s.kill_at:
                s.kill_at = None
                self._signal_group(s, signal.SIGKILL)
        cache = self.cache
        self.timed.intersection_update(cache)
        if not self.timed:
            return
        channel = self.channel
        load = channel.claims.load_word
        for s in list(self.slots):
            if s.expired is not None:
                continue
            tag = load(s.index)
            if not tag or load(channel.started_word(s.index)) != tag:
                s.watch = None      # idle, or its call has not begun
                continue
            call = (tag, load(channel.progress_word(s.index)))
            if s.watch is None or s.watch[0] != call:
                s.watch = (call, now)
                continue
            where = self.inflight.get(tag)
            r = cache.get(where[0]) if where is not None else None
            limit = getattr(r, '_task_timeout', None)
            if limit is not None and now - s.watch[1] >= limit:
                s.expired = (call, limit)
                s.kill_at = now + _KILL_GRACE
                self.expiring.append(s)
                util.debug('pool task ran past its task_timeout: stopping %s'
                           % s.describe())
                self._signal_group(s, signal.SIGTERM)

    def _signal_group(self, slot, sig):
        # The worker leads its own process group (see _ring_worker): the group goes,
        # whatever the call started with it. (Should the worker not lead one, it alone.)
        pid = getattr(slot.proc, 'pid', None)
        if not pid:
            return
        try:
            os.killpg(pid, sig)
            return
        except OSError:
            pass
        try:
            os.kill(pid, sig)
        except OSError:
            pass

    def _timed_out(self, slot, where, exitcode):
        # The call slot.expired names ran past its timeout; its worker is gone. That
        # call fails with TaskTimeoutError; a chunk's other calls run again elsewhere.
        (tag, k), limit = slot.expired
        r = self.cache.get(where[0])
        if r is None:
            return
        name = getattr(r, '_func_name', 'the task')
        exc = _error_class('TaskTimeoutError')(
            'pool task %s ran past its task_timeout of %g s in %s; the worker and the '
            'processes it started were stopped' % (name, limit, slot.describe()),
            getattr(slot.proc, 'pid', None), exitcode)
        exc.timeout = limit
        chunks = getattr(r, '_timed_chunks', None)
        chunk = chunks.pop(where[1], None) if chunks is not None else None
        if chunk is None:
            _deliver(r, where[1], (False, exc))
            return
        _Rerun.after_timeout(self, r, where[1], chunk, k, exc)

    def _check_liveness(self):
        # A fork worker's sentinel is a pipe whose write end the worker holds; a
        # process forked by another thread at the wrong moment inherits it too, and
        # then the sentinel stays silent when the worker dies. So once a second, while
        # some worker holds a task or is starting, ask the kernel (waitpid) as well.
        self.next_liveness = time.monotonic() + 1.0
        for s in list(self.slots):
            if s in self.slots and s.proc.exitcode is not None:
                self._on_exit(s)

    def _run_handoff(self):
        handoff = self.handoff
        while handoff:
            try:
                r, i, obj = handoff.popleft()
            except IndexError:
                break
            _deliver(r, i, obj)
            r = obj = None

    def _on_exit(self, slot):
        exitcode = slot.exitcode_after_exit()
        # What it wrote before it died (its READY, a result) comes first.
        self.drain(True)
        if not slot.ready and slot.init_error is None:
            # A caller collecting results may hold the word of why it died (its
            # initializer's exception): give it a moment to hand that over.
            until = time.monotonic() + 0.2
            while time.monotonic() < until:
                self.drain(True)
                if slot.ready or slot.init_error is not None or (
                        not self.collect_lock.locked()
                        and not self.results_waiting()):
                    break
                time.sleep(0.001)
        claims = self.channel.claims
        tag = claims.load_word(slot.index)
        slot.retired = _RETIRED_BY_CODE.get(
            claims.load_word(self.channel.started_word(slot.index)))
        lost = None
        with self.lock:
            self._count_exit(slot)
            self._forget_slot(slot)
            self.by_wid.pop(slot.wid, None)
            self.channel.claims.store_word(slot.index, 0)
            self.free_indexes.append(slot.index)
            if tag:
                lost = self.inflight.pop(tag, None)
            if not slot.ready and lost is None:
                self._not_ready(slot, exitcode)
        util.debug('pool worker exited: %s' % slot.describe())
        if slot.expired is not None:
            # Whatever the timed-out call started goes with it.
            self._signal_group(slot, signal.SIGKILL)
            if slot in self.expiring:
                self.expiring.remove(slot)
        if lost is not None:
            if slot.expired is not None and slot.expired[0][0] == tag:
                self._timed_out(slot, lost, exitcode)
            else:
                self._lost(slot, exitcode, lost)
            self._nudge()

    # -- shutting down ------------------------------------------------------------------

    def _stop_workers(self, slots):
        procs = [s for s in slots if s.proc.exitcode is None]
        for s in procs:
            try:
                s.proc.terminate()
            except Exception:
                pass
        deadline = time.monotonic() + 1.0
        waiting = [s for s in procs if s.sentinel is not None]
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done = connection.wait([s.sentinel for s in waiting], left)
            waiting = [s for s in waiting if s.sentinel not in done]
        for s in procs:
            if s.proc.exitcode is None:
                try:
                    s.proc.kill()
                except Exception:
                    pass
        for s in procs:
            s.proc.join()

    def _teardown(self, failure=None):
        super()._teardown(failure)
        self.channel.spill.unlink_all()
        _spill.unregister(self.channel.spill)
        self.inflight.clear()
        self.handoff.clear()
        self._nudge()
        self.channel.tasks.abandon()


class _PoolCache(dict):
    """The pool's job -> result map; wakes the engine's thread when it becomes empty
    (a closed pool finishes once nothing is left to wait for)."""

    def __init__(self, /, *args, notifier=None, **kwds):
        self.notifier = notifier
        super().__init__(*args, **kwds)

    def __delitem__(self, item):
        super().__delitem__(item)
        if not self and self.notifier is not None:
            self.notifier()

    def _forget(self, job):
        if self.pop(job, None) is not None and not self and self.notifier is not None:
            self.notifier()


def _add_timed(engine, job):
    # The first timed job makes the engine's thread tick fast: wake it now rather than
    # when its current wait ends.
    first = not engine.timed
    engine.timed.add(job)
    if first:
        engine.wake()


class _PoolDefault:
    def __repr__(self):
        return "<the pool's task_timeout>"


_POOL_DEFAULT = _PoolDefault()


def _check_task_timeout(value):
    """``value`` as a task_timeout: None, or a positive number of seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError('task_timeout must be a number of seconds or None, not %s'
                        % type(value).__name__)
    if not value > 0 or value != value or value == float('inf'):
        raise ValueError('task_timeout must be a positive, finite number of seconds, '
                         'not %r' % (value,))
    return float(value)


def _func_name(func):
    name = getattr(func, '__qualname__', None) or getattr(func, '__name__', None)
    if name is None:
        return repr(func)
    return '%s()' % name


def _get_context():
    return _context._default_context.get_context()


#
# The pool
#

class Pool(object):
    '''
    A pool of worker processes to which tasks can be submitted.
    '''
    _wrap_exception = True
    _Engine = _ProcessEngine
    # map's default chunksize splits the items into this many chunks per worker. The
    # stdlib's 4 leaves a long tail on tiny tasks: the last chunks' results are
    # unpacked after the workers are done, and one worker idles while the other ends
    # its last chunk. A task costs a process pool about 1 us (chunksize=1 map), so 16
    # is cheap (docs/benchmarks.md, "Pool: the default chunksize").
    _chunks_per_worker = 16

    @staticmethod
    def Process(ctx, *args, **kwds):
        return ctx.Process(*args, **kwds)

    def __init__(self, processes=None, initializer=None, initargs=(),
                 maxtasksperchild=None, context=None, *, task_timeout=None,
                 max_memory_per_child=None):
        # Set first, so that __del__ and __repr__ work if __init__ fails.
        self._pool = []
        self._state = INIT
        self._engine = None
        self._task_timeout = _check_task_timeout(task_timeout)

        self._ctx = context or _get_context()
        self._cache = _PoolCache()
        self._maxtasksperchild = maxtasksperchild
        self._initializer = initializer
        self._initargs = initargs

        if processes is None:
            processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if max_memory_per_child is not None:
            if isinstance(max_memory_per_child, bool) or not isinstance(
                    max_memory_per_child, int):
                raise TypeError('max_memory_per_child must be a number of bytes (an int) '
                                'or None, not %s' % type(max_memory_per_child).__name__)
            if max_memory_per_child <= 0:
                raise ValueError('max_memory_per_child must be positive, not %d'
                                 % max_memory_per_child)
        if initializer is not None and not callable(initializer):
            raise TypeError('initializer must be a callable')

        self._processes = processes
        self._engine = self._Engine(
            self._ctx, self.Process, processes, self._pool, self._cache,
            initializer, initargs, maxtasksperchild, self._wrap_exception,
            max_memory_per_child)
        try:
            self._repopulate_pool()
            self._engine.start_threads()
        except BaseException:
            self._engine.abort_start()
            raise
        self._terminate = util.Finalize(self, self._terminate_pool,
                                        args=(self._engine,), exitpriority=15)
        self._state = RUN

    # Globals bound as defaults: this can run during interpreter shutdown.
    def __del__(self, _warn=warnings.warn, RUN=RUN):
        # (No _state when __init__ never ran: bad arguments.)
        if getattr(self, '_state', None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}",
                  ResourceWarning, source=self)
            engine = getattr(self, '_engine', None)
            if engine is not None and not engine.foreign():
                engine.wake()

    def __repr__(self):
        cls = self.__class__
        return (f'<{cls.__module__}.{cls.__qualname__} '
                f'state={self._state} '
                f'pool_size={len(self._pool)}>')

    def __reduce__(self):
        raise NotImplementedError(
            'pool objects cannot be passed between processes or pickled')

    def _repopulate_pool(self):
        """Start workers until there are ``processes`` of them."""
        self._engine.repopulate()

    def stats(self):
        '''
        What the pool has done, as plain data to log: ``{'workers': [...], 'exited':
        {...}, 'replaced': {...}}``. Each live worker is ``{'pid', 'name', 'tasks',
        'busy_seconds', 'arg_bytes', 'result_bytes'}`` (tasks answered, time from
        taking a task to sending its result, pickled bytes of the tasks it took and
        the results it sent; a ThreadPool pickles nothing, so its bytes are None);
        ``exited`` sums the same counts over the workers gone; ``replaced`` counts the
        workers replaced, by cause: ``died``, ``timed_out`` (task_timeout),
        ``memory`` (max_memory_per_child), ``maxtasks`` (maxtasksperchild).
        '''
        return self._engine.stats()

    def _check_running(self):
        engine = self._engine
        if self._state != RUN or engine.foreign():
            raise ValueError("Pool not running")
        if engine.broken is not None:
            raise engine.broken_error()

    # -- submitting work ------------------------------------------------------------

    def _timeout_for(self, task_timeout, func):
        # The task_timeout of one call: its own, or the pool's.
        if task_timeout is _POOL_DEFAULT:
            return self._task_timeout
        return _check_task_timeout(task_timeout)

    @staticmethod
    def _timed(result, timeout, func):
        if timeout is not None:
            result._task_timeout = timeout
            result._func_name = _func_name(func)
            _add_timed(result._engine, result._job)

    def apply(self, func, args=(), kwds={}, *,  # noqa: B006 (the stdlib's signature)
              task_timeout=_POOL_DEFAULT):
        '''
        Equivalent of `func(*args, **kwds)`.
        Pool must be running.
        '''
        return self.apply_async(func, args, kwds, task_timeout=task_timeout).get()

    def map(self, func, iterable, chunksize=None, *, task_timeout=_POOL_DEFAULT,
            progress=None):
        '''
        Apply `func` to each element in `iterable`, collecting the results
        in a list that is returned.
        '''
        return self._map_async(func, iterable, mapstar, chunksize,
                               task_timeout=task_timeout, progress=progress).get()

    def starmap(self, func, iterable, chunksize=None, *, task_timeout=_POOL_DEFAULT,
                progress=None):
        '''
        Like `map()` method but the elements of the `iterable` are expected to
        be iterables as well and will be unpacked as arguments. Hence
        `func` and (a, b) becomes func(a, b).
        '''
        return self._map_async(func, iterable, starmapstar, chunksize,
                               task_timeout=task_timeout, progress=progress).get()

    def starmap_async(self, func, iterable, chunksize=None, callback=None,
                      error_callback=None, *, task_timeout=_POOL_DEFAULT, progress=None):
        '''
        Asynchronous version of `starmap()` method.
        '''
        return self._map_async(func, iterable, starmapstar, chunksize,
                               callback, error_callback, task_timeout=task_timeout,
                               progress=progress)

    def apply_async(self, func, args=(), kwds={}, callback=None,  # noqa: B006
                    error_callback=None, *, task_timeout=_POOL_DEFAULT):
        '''
        Asynchronous version of `apply()` method.
        '''
        self._check_running()
        timeout = self._timeout_for(task_timeout, func)
        result = ApplyResult(self, callback, error_callback)
        self._timed(result, timeout, func)
        try:
            if type(args) is tuple and len(args) == 1 and not kwds:
                # func(x): x itself is the task's one item (a plain x travels natively).
                self._engine.submit(result._job, func, args)
            else:
                self._engine.submit(result._job, func, (args,), unpack=True,
                                    kwds=kwds or None)
        except BaseException:
            self._cache._forget(result._job)
            raise
        return result

    def map_async(self, func, iterable, chunksize=None, callback=None,
                  error_callback=None, *, task_timeout=_POOL_DEFAULT, progress=None):
        '''
        Asynchronous version of `map()` method.
        '''
        return self._map_async(func, iterable, mapstar, chunksize, callback,
                               error_callback, task_timeout=task_timeout,
                               progress=progress)

    def _map_async(self, func, iterable, mapper, chunksize=None, callback=None,
                   error_callback=None, task_timeout=_POOL_DEFAULT, progress=None):
        '''
        Helper function to implement map, starmap and their async counterparts.
        '''
        self._check_running()
        timeout = self._timeout_for(task_timeout, func)
        sink = _progress_sink(progress)     # a bad progress= raises here, before any work
        if not hasattr(iterable, '__len__'):
            iterable = list(iterable)

        if chunksize is None:
            chunksize, extra = divmod(len(iterable), self._processes * self._chunks_per_worker)
            if extra:
                chunksize += 1
        if len(iterable) == 0:
            chunksize = 0

        result = MapResult(self, chunksize, len(iterable), callback,
                           error_callback=error_callback)
        _track(result, sink, len(iterable))
        if chunksize <= 0:
            if result._progress is not None:
                result._progress.report(True)
            return result
        self._timed(result, timeout, func)
        # With one item per task, the task calls the function itself rather than
        # through mapstar, and its result is the item's (not a list of one).
        result._single = single = chunksize == 1
        try:
            items, error = _task_items(func, iterable, chunksize)
            if single:
                self._engine.submit(result._job, func, items,
                                    unpack=mapper is starmapstar)
            elif timeout is None:
                self._engine.submit(result._job, _CHUNK_RUNNERS[mapper], items)
            else:
                # Each call of a chunk is timed (see _counted); the parent keeps the
                # chunks, to run the rest of one again after a timeout.
                runner = _TIMED_CHUNK_RUNNERS[mapper]
                result._timed_chunks = {i: (runner, f, chunk)
                                        for i, (f, chunk) in enumerate(items)}
                self._engine.submit(result._job, runner, items)
        except BaseException:
            self._cache._forget(result._job)
            raise
        produced = len(items)
        if error is not None:
            # The iterable itself failed: that chunk fails, as in the stdlib.
            result._set(produced, (False, error))
            produced += 1
        result._alloc()
        result._expect_chunks(produced)
        return result

    def imap(self, func, iterable, chunksize=1, *, task_timeout=_POOL_DEFAULT,
             progress=None):
        '''
        Equivalent of `map()` -- can be MUCH slower than `Pool.map()`.
        '''
        self._check_running()
        if chunksize != 1 and chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        return self._imap(IMapIterator, func, iterable, chunksize, task_timeout, progress)

    def imap_unordered(self, func, iterable, chunksize=1, *, task_timeout=_POOL_DEFAULT,
                       progress=None):
        '''
        Like `imap()` method but ordering of results is arbitrary.
        '''
        self._check_running()
        if chunksize != 1 and chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0!r}".format(chunksize))
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize, task_timeout,
                          progress)

    def _imap(self, result_class, func, iterable, chunksize, task_timeout=_POOL_DEFAULT,
              progress=None):
        # The function is checked here so that an unpicklable one fails at the call;
        # the items are pickled by the feeder as it pulls them.
        timeout = self._timeout_for(task_timeout, func)
        sink = _progress_sink(progress)     # a bad progress= raises here, before any work
        engine = self._engine
        engine.check_func(func)
        result = result_class(self)
        self._timed(result, timeout, func)
        try:
            total = len(iterable)
        except Exception:
            total = None
        _track(result, sink, total, chunksize)
        if timeout is not None and chunksize != 1:
            result._timed_chunks = {}
        inline = type(iterable) in _SEQUENCES
        feed = _Feed(result, func, iterable, chunksize, inline)
        result._feed = feed
        result._on_take = engine.taken
        try:
            engine.add_feed(feed)
        except BaseException:
            self._cache._forget(result._job)
            raise
        if inline:
            engine.feed_inline(feed)
        if chunksize == 1:
            return result
        if timeout is not None:
            return _Flatten(result)
        return (item for chunk in result for item in chunk)

    @staticmethod
    def _get_tasks(func, it, size):
        it = iter(it)
        while True:
            chunk = tuple(itertools.islice(it, size))
            if not chunk:
                return
            yield (func, chunk)

    # -- lifetime -------------------------------------------------------------------

    def close(self):
        '''
        Stop accepting work; the workers exit once the pending work is done.
        '''
        util.debug('closing pool')
        if self._state == RUN:
            self._state = CLOSE
            if not self._engine.foreign():
                self._engine.close()

    def terminate(self):
        '''
        Stop the workers now; results still pending raise PoolTerminatedError.
        '''
        util.debug('terminating pool')
        self._state = TERMINATE
        self._terminate()

    def join(self):
        '''
        Wait for the workers to exit (after close() or terminate()).
        '''
        util.debug('joining pool')
        if self._state == RUN:
            raise ValueError("Pool is still running")
        elif self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        if self._engine.foreign():
            return
        self._engine.join_threads()
        for p in list(self._pool):
            p.join()

    @staticmethod
    def _terminate_pool(engine):
        # Run once, by terminate() or by the finalizer (pool collected, or exit).
        util.debug('finalizing pool')
        engine.terminate()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()


def _task_items(func, iterable, chunksize):
    """The items of a map's tasks: the iterable's items (chunksize 1) or ``(func,
    chunk)`` pairs, as a list, tuple or range; and the exception the iterable raised
    part way, if it did (the items before it are still run)."""
    if type(iterable) in _SEQUENCES:
        if chunksize == 1:
            return iterable, None
        # Slices: a range's chunks are ranges, which pickle in a few bytes.
        return [(func, iterable[at:at + chunksize])
                for at in range(0, len(iterable), chunksize)], None
    items = []
    source = iter(iterable) if chunksize == 1 else Pool._get_tasks(func, iterable, chunksize)
    try:
        for item in source:
            items.append(item)
    except Exception as e:
        return items, e
    return items, None


#
# Results
#

class _Flag:
    """A one-shot ``threading.Event`` (set once, never cleared) at a tenth of the
    cost: one lock, held until the flag is set."""

    __slots__ = ('_flag', '_lock')

    def __init__(self):
        self._flag = False
        self._lock = threading.Lock()
        self._lock.acquire()

    def is_set(self):
        return self._flag

    def set(self):
        if not self._flag:
            self._flag = True
            self._lock.release()

    def wait(self, timeout=None):
        if self._flag:
            return True
        if timeout is None:
            got = self._lock.acquire()
        else:
            got = self._lock.acquire(True, max(timeout, 0))
        if got:
            # Let the next waiter through too.
            self._lock.release()
        return self._flag


class ApplyResult(object):
    """The pending result of one ``apply_async`` call."""

    _task_timeout = None    # seconds each call may run (see Pool's task_timeout)
    _timed_chunks = None    # chunk index -> (runner, func, items), for timed chunks
    _progress = None        # a map's _Progress (progress=)

    def __init__(self, pool, callback, error_callback):
        self._pool = pool
        self._event = _Flag()
        self._lock = threading.Lock()
        self._done = False
        self._job = next(job_counter)
        self._cache = pool._cache
        self._callback = callback
        self._error_callback = error_callback
        self._has_callbacks = bool(callback or error_callback)
        self._engine = pool._engine
        self._cache[self._job] = self

    def ready(self):
        return self._event.is_set()

    def successful(self):
        if not self.ready():
            raise ValueError("{0!r} not ready".format(self))
        return self._success

    def wait(self, timeout=None):
        event = self._event
        if not event.is_set():
            self._engine.wait_for(event.is_set, timeout, event.wait)

    def get(self, timeout=None):
        self.wait(timeout)
        if not self.ready():
            raise _context.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, i, obj):
        with self._lock:
            if self._done:
                return
            self._done = True
        self._success, self._value = obj
        self._finish()

    def _fail(self, exc):
        self._set(0, (False, exc))

    def _finish(self):
        # Callbacks run before the result turns ready, as in the stdlib; the result
        # turns ready even if a callback raises.
        try:
            if self._success:
                if self._callback:
                    self._callback(self._value)
            elif self._error_callback:
                self._error_callback(self._value)
        finally:
            if self._progress is not None:
                self._progress.report(True)
            self._event.set()
            self._cache._forget(self._job)
            self._pool = None

    __class_getitem__ = classmethod(types.GenericAlias)


AsyncResult = ApplyResult       # create alias -- see #17805


class MapResult(ApplyResult):
    """The pending result of a ``map_async`` / ``starmap_async`` call."""

    def __init__(self, pool, chunksize, length, callback, error_callback):
        ApplyResult.__init__(self, pool, callback, error_callback=error_callback)
        self._success = True
        # The result list is made once the tasks are out (see _alloc): a large one
        # costs page faults that the workers need not wait for.
        self._value = None if length else []
        self._length = length
        self._chunksize = chunksize
        if chunksize <= 0:
            self._value = [None] * length
            self._number_left = 0
            self._chunks = 0
            self._done = True
            self._event.set()
            self._cache._forget(self._job)
        else:
            self._number_left = length // chunksize + bool(length % chunksize)
            self._chunks = self._number_left
        self._counted = chunksize <= 0

    _single = False

    def _set(self, i, success_result):
        success, result = success_result
        with self._lock:
            if self._done:
                return
            self._number_left -= 1
            if self._progress is not None:
                self._progress.done += 1 if self._single else (
                    len(result) if success else self._chunksize)
            if success and self._success:
                if self._value is None:
                    self._value = [None] * self._length
                v = self._value
                if self._single:
                    if i >= len(v):
                        v.extend([None] * (i + 1 - len(v)))     # see below
                    v[i] = result
                else:
                    at = i * self._chunksize
                    n = len(result)
                    if at + n > len(v):
                        # Past the end: the iterable's len() was short. The list
                        # grows to hold the chunk, whatever order chunks come in.
                        v.extend([None] * (at + n - len(v)))
                    if type(result) is _Packed:
                        result.store(v, at)
                    else:
                        v[at:at + n] = result
            elif not success and self._success:
                # Only the first exception is kept.
                self._success = False
                self._value = result

            # Ready only once every chunk is in, failed or not, and the caller has
            # said how many there are (_expect_chunks).
            finished = self._done = self._number_left <= 0 and self._counted
        if finished:
            self._finish()

    def _alloc(self):
        with self._lock:
            if self._value is None and self._success:
                self._value = [None] * self._length

    def _expect_chunks(self, n):
        # All the tasks are out: n chunks, fewer than len() promised if the iterable
        # raised, more or fewer if its len() was wrong. Wait for just those.
        with self._lock:
            self._counted = True
            if self._done:
                return
            self._number_left += n - self._chunks
            self._chunks = n
            finished = self._done = self._number_left <= 0
        if finished:
            self._finish()

    def _fail(self, exc):
        with self._lock:
            if self._done:
                return
            self._done = True
            self._number_left = 0
            if self._success:
                self._success = False
                self._value = exc
        self._finish()


class IMapIterator(object):
    """The iterator ``imap`` returns: results in order, as they arrive."""

    _has_callbacks = False
    _task_timeout = None
    _timed_chunks = None
    _progress = None        # its _Progress (progress=)

    def __init__(self, pool):
        self._pool = pool
        self._engine = pool._engine
        # _set takes the condition's lock directly: Condition's own __enter__ and
        # __exit__ are Python code, half a microsecond per result.
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._job = next(job_counter)
        self._cache = pool._cache
        self._items = collections.deque()
        self._index = 0
        self._length = None
        self._unsorted = {}
        self._failed = False
        self._taken = 0         # items handed to the caller (bounds the look-ahead)
        self._feed = None
        self._on_take = None
        self._wake_at = 0       # _on_take is called once _taken reaches this
        self._cache[self._job] = self

    def __iter__(self):
        return self

    def _ready_to_take(self):
        return bool(self._items) or self._index == self._length

    def _sleep(self, timeout):
        with self._cond:
            if not self._ready_to_take():
                self._cond.wait(timeout)

    def next(self, timeout=None):
        try:
            # Items are only appended by others (deque operations are atomic).
            item = self._items.popleft()
        except IndexError:
            item = self._next_slow(timeout)
        # Only this thread counts (the feeder just reads it).
        self._taken += 1
        if self._taken >= self._wake_at and self._on_take is not None:
            self._on_take(self._feed)
        success, value = item
        if success:
            return value
        raise value

    __next__ = next

    def _next_slow(self, timeout):
        engine = self._engine
        if not self._items:
            feed = self._feed
            if feed is not None and feed.inline:
                engine.feed_inline(feed)
            # Collect results here (or wait for whoever does); then only look.
            engine.wait_for(self._ready_to_take, timeout, self._sleep)
            timeout = 0
        with self._cond:
            try:
                return self._items.popleft()
            except IndexError:
                if self._index == self._length:
                    self._pool = None
                    raise StopIteration from None
                self._cond.wait(timeout)
                try:
                    return self._items.popleft()
                except IndexError:
                    if self._index == self._length:
                        self._pool = None
                        raise StopIteration from None
                    raise _context.TimeoutError from None

    def _notify(self):
        # Called with the condition held. Condition.notify() costs half a microsecond
        # even with nobody waiting, and the caller collecting its own results never
        # waits on it.
        if self._cond._waiters:
            self._cond.notify()

    def _complete_locked(self):
        if self._index == self._length:
            if self._progress is not None:
                self._progress.report(True)
            self._cache._forget(self._job)
            self._pool = None

    def _set(self, i, obj):
        cond = self._cond
        with self._mutex:
            if self._failed:
                return
            if self._progress is not None:
                self._progress.count(obj)
            if self._index == i:
                self._items.append(obj)
                self._index += 1
                unsorted = self._unsorted
                if unsorted:
                    while self._index in unsorted:
                        self._items.append(unsorted.pop(self._index))
                        self._index += 1
                if cond._waiters:
                    cond.notify()
            else:
                self._unsorted[i] = obj
            if self._index == self._length:
                self._complete_locked()

    def _set_length(self, length):
        with self._cond:
            if self._failed:
                return
            self._length = length
            if self._index == self._length:
                self._notify()
                self._complete_locked()

    def _fail(self, exc):
        # Deliver the error where the caller is, then end the iteration.
        with self._cond:
            if self._index == self._length or self._failed:
                return
            self._failed = True
            self._unsorted.clear()
            self._items.append((False, exc))
            self._index += 1
            self._length = self._index
            self._notify()
            self._complete_locked()


class IMapUnorderedIterator(IMapIterator):
    """The iterator ``imap_unordered`` returns: results as they arrive."""

    def _set(self, i, obj):
        with self._mutex:
            if self._failed:
                return
            if self._progress is not None:
                self._progress.count(obj)
            self._items.append(obj)
            self._index += 1
            if self._cond._waiters:
                self._cond.notify()
            if self._index == self._length:
                self._complete_locked()


#
# progress=: how far a map or imap has come
#

_PROGRESS_PERIOD = 0.1      # seconds between two reports (the last comes at the end)


class _Progress:
    """The count of one map's or imap's items whose results have arrived (``done``,
    added to by the result object under its lock), and its reporter: ``sink(done,
    total, final)``, called at most every _PROGRESS_PERIOD by the engine's thread and
    once at the end by whichever thread finishes the result."""

    __slots__ = ('done', 'total', 'sink', 'last', 'lock', 'ended', 'chunksize')

    def __init__(self, sink, total, chunksize=1):
        self.done = 0
        self.total = total
        self.sink = sink
        self.last = time.monotonic()    # the first report comes a period in
        self.lock = threading.Lock()
        self.ended = False
        self.chunksize = chunksize

    def count(self, obj):
        # An imap result (ok, value): one item, or a chunk's list of them.
        if self.chunksize == 1:
            self.done += 1
        elif obj[0] and type(obj[1]) is list:
            self.done += len(obj[1])
        else:
            self.done += self.chunksize

    def report(self, final=False):
        with self.lock:
            if self.ended:
                return
            now = time.monotonic()
            if not final and now - self.last < _PROGRESS_PERIOD:
                return
            self.last = now
            self.ended = final
            try:
                self.sink(self.done, self.total, final)
            except Exception:
                _report_error('a pool progress reporter')


def _progress_sink(progress):
    """The reporter ``sink(done, total, final)`` that ``progress=`` asks for: a tqdm
    bar (True, or a dict of tqdm's options), the built-in bar on stderr when tqdm is
    not installed, or the user's callable ``progress(done, total)``; None for None or
    False (no progress)."""
    if progress is None or progress is False:
        return None
    if callable(progress):
        return lambda done, total, final: progress(done, total)
    if progress is True:
        options = {}
    elif isinstance(progress, dict):
        options = dict(progress)
    else:
        raise TypeError('progress must be True, a dict of tqdm options or a callable '
                        '(done, total), not %s' % type(progress).__name__)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LineBar(options.get('desc')).show
    bar = []

    def sink(done, total, final):
        if not bar:
            bar.append(tqdm(total=total, **options))
        bar[0].update(done - bar[0].n)
        if final:
            bar[0].close()
    return sink


class _LineBar:
    """The built-in progress bar: one line on stderr, redrawn in place (items done,
    of how many, rate, time left), ended with a newline."""

    def __init__(self, desc=None):
        self.prefix = '%s: ' % desc if desc else ''
        self.start = time.monotonic()

    def show(self, done, total, final):
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done / elapsed
        if total:
            left = (total - done) / rate if rate else 0.0
            line = '%s%d/%d [%3d%%] %.0f it/s, %d:%02d left' % (
                self.prefix, done, total, 100 * done // total, rate,
                int(left) // 60, int(left) % 60)
        else:
            line = '%s%d items, %.0f it/s' % (self.prefix, done, rate)
        try:
            sys.stderr.write('\r' + line + ('\n' if final else ''))
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass


def _track(result, sink, total, chunksize=1):
    # Attaches a progress reporter (a _progress_sink, or None) to a map's or imap's
    # result.
    if sink is None:
        return
    tracker = _Progress(sink, total, chunksize)
    result._progress = tracker
    result._engine.add_progress(tracker)


#
# task_timeout: what a chunk interrupted by a timeout becomes
#

class _Raise:
    """An item of a timed imap chunk whose call ran past its timeout: the iterator of a
    chunked imap raises ``exc`` in its place (and goes on)."""

    __slots__ = ('exc',)

    def __init__(self, exc):
        self.exc = exc


class _Flatten:
    """What a chunked ``imap`` / ``imap_unordered`` with a ``task_timeout`` returns: the
    items of each chunk in turn. An item whose call timed out raises its
    TaskTimeoutError in its place, a chunk whose function raised raises that, and
    either way the iteration goes on."""

    def __init__(self, chunks):
        self._chunks = chunks
        self._items = iter(())

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            for item in self._items:
                if type(item) is _Raise:
                    raise item.exc
                return item
            self._items = iter(next(self._chunks))

    next = __next__


class _Rerun:
    """The calls of a timed chunk that did not run to the end because one of them ran
    past its timeout, run again as one task. Its result goes to the chunk's result at
    the chunk's index, with each timed-out call's error in its place; with no target
    (the chunk of a map, which failed with the timeout already) it is dropped: those
    calls are run for what they do, as the stdlib runs a failed map's other chunks."""

    _has_callbacks = False

    def __init__(self, engine, target, index, n, positions, errors, chunk, limit, name):
        self._job = next(job_counter)
        self._cache = engine.cache
        self._target = target
        self._index = index
        self._n = n                     # calls in the original chunk
        self._positions = positions     # each call's place in the original chunk
        self._errors = errors           # place -> TaskTimeoutError
        self._task_timeout = limit
        self._func_name = name
        self._timed_chunks = {0: chunk}
        self._done = False
        self._cache[self._job] = self

    @staticmethod
    def after_timeout(engine, r, i, chunk, k, exc):
        """Call ``k`` of chunk ``i`` of ``r`` (a result, or a _Rerun) timed out with
        ``exc``: fails it, and runs the chunk's other calls again."""
        runner, func, items = chunk
        if type(r) is _Rerun:
            target, index, n = r._target, r._index, r._n
            positions, errors = r._positions, dict(r._errors)
            r._forget()
        else:
            target, index, n = r, i, len(items)
            positions, errors = list(range(n)), {}
        if target is None or isinstance(target, MapResult):
            # A map fails with the first error anyway: the calls after this one run.
            if target is not None:
                _deliver(target, index, (False, exc))
            target, rest = None, list(items[k + 1:])
        else:
            errors[positions[k]] = exc
            rest = list(items[:k]) + list(items[k + 1:])
            positions = positions[:k] + positions[k + 1:]
        if not rest:
            if target is not None:
                _deliver(target, index, (True, [_Raise(errors[p]) for p in range(n)]))
            return
        again = _Rerun(engine, target, index, n, positions, errors, (runner, func, rest),
                       r._task_timeout, r._func_name)
        _add_timed(engine, again._job)
        # From a thread of its own: the task ring may be full, and the engine's
        # thread must not wait for room (it replaces the workers that make it).
        try:
            threading.Thread(target=again._submit, args=(engine, runner, func, rest),
                             name='ferromp-pool-rerun', daemon=True).start()
        except RuntimeError as e:
            again._set(0, (False, e))

    def _submit(self, engine, runner, func, rest):
        try:
            engine.submit(self._job, runner, [(func, rest)], feeding=True)
        except Exception as e:
            self._set(0, (False, e))

    def _forget(self):
        self._done = True
        self._cache._forget(self._job)

    def _set(self, i, obj):
        if self._done:
            return
        self._forget()
        target = self._target
        if target is None:
            return
        ok, value = obj
        if ok:
            out = [None] * self._n
            for p, v in zip(self._positions, value):
                out[p] = v
            for p, e in self._errors.items():
                out[p] = _Raise(e)
            value = out
        _deliver(target, self._index, (ok, value))

    def _fail(self, exc):
        self._set(0, (False, exc))


#
# Thread pools
#

class ThreadPool(Pool):
    '''
    A Pool whose workers are threads: no pickling, objects go by reference.
    '''
    _wrap_exception = False
    _Engine = _ThreadEngine
    _chunks_per_worker = 4      # threads share the GIL: fewer, larger chunks

    @staticmethod
    def Process(ctx, *args, **kwds):
        from .dummy import Process
        return Process(*args, **kwds)

    def __init__(self, processes=None, initializer=None, initargs=()):
        Pool.__init__(self, processes, initializer, initargs)

    def _timeout_for(self, task_timeout, func):
        if task_timeout is not _POOL_DEFAULT and task_timeout is not None:
            raise TypeError('ThreadPool does not support task_timeout: a thread cannot '
                            'be stopped (use Pool, whose workers are processes)')
        return None
