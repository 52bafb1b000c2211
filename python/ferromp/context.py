"""Contexts and start methods: the stdlib's ``multiprocessing.context`` API.

A context bundles a start method (fork, spawn, forkserver) with factories for every
multiprocessing object. The module-level functions of ``ferromp`` are the bound
methods of the default context, as in the stdlib.

The four exception classes are the stdlib's own (``multiprocessing.ProcessError`` and
its subclasses), so ``except multiprocessing.TimeoutError`` written for the stdlib
catches ours. They are looked up on first use, so a process that never touches them
never imports the stdlib package.
"""

import os
import sys
import threading

from . import process
from . import reduction

__all__ = ()

_EXCEPTIONS = ('ProcessError', 'BufferTooShort', 'TimeoutError', 'AuthenticationError')


def _stdlib_context():
    import multiprocessing.context
    return multiprocessing.context


def __getattr__(name):
    if name in _EXCEPTIONS:
        return getattr(_stdlib_context(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _StdlibException:
    """Class attribute that resolves to the stdlib exception of the same name."""

    def __set_name__(self, owner, name):
        self._name = name

    def __get__(self, obj, owner=None):
        return getattr(_stdlib_context(), self._name)


class BaseContext(object):
    """Factories for every multiprocessing object, bound to one start method."""

    ProcessError = _StdlibException()
    BufferTooShort = _StdlibException()
    TimeoutError = _StdlibException()
    AuthenticationError = _StdlibException()

    current_process = staticmethod(process.current_process)
    parent_process = staticmethod(process.parent_process)
    active_children = staticmethod(process.active_children)

    def cpu_count(self):
        """Number of CPUs in the system."""
        num = os.cpu_count()
        if num is None:
            raise NotImplementedError('cannot determine number of cpus')
        return num

    def Manager(self):
        """A SyncManager, started, that serves shared objects to processes."""
        from .managers import SyncManager
        m = SyncManager(ctx=self.get_context())
        m.start()
        return m

    def Pipe(self, duplex=True):
        """Two Connection objects joined by a pipe (socketpair when duplex)."""
        from .connection import Pipe
        c1, c2 = Pipe(duplex)
        if reduction._main_by_value(_start_method_of(self)):
            # Its ends may go to spawn or forkserver children, which cannot import
            # what an interactive __main__ defines: that goes by value.
            c1._dumps = c2._dumps = reduction._dumps_bytes_main
        return c1, c2

    def Lock(self):
        from .synchronize import Lock
        return Lock(ctx=self.get_context())

    def RLock(self):
        from .synchronize import RLock
        return RLock(ctx=self.get_context())

    def Condition(self, lock=None):
        from .synchronize import Condition
        return Condition(lock, ctx=self.get_context())

    def Semaphore(self, value=1):
        from .synchronize import Semaphore
        return Semaphore(value, ctx=self.get_context())

    def BoundedSemaphore(self, value=1):
        from .synchronize import BoundedSemaphore
        return BoundedSemaphore(value, ctx=self.get_context())

    def Event(self):
        from .synchronize import Event
        return Event(ctx=self.get_context())

    def Barrier(self, parties, action=None, timeout=None):
        from .synchronize import Barrier
        return Barrier(parties, action, timeout, ctx=self.get_context())

    def Queue(self, maxsize=0):
        from .queues import Queue
        return Queue(maxsize, ctx=self.get_context())

    def JoinableQueue(self, maxsize=0):
        from .queues import JoinableQueue
        return JoinableQueue(maxsize, ctx=self.get_context())

    def SimpleQueue(self):
        from .queues import SimpleQueue
        return SimpleQueue(ctx=self.get_context())

    def Pool(self, processes=None, initializer=None, initargs=(),
             maxtasksperchild=None, *, task_timeout=None, max_memory_per_child=None):
        from .pool import Pool
        return Pool(processes, initializer, initargs, maxtasksperchild,
                    context=self.get_context(), task_timeout=task_timeout,
                    max_memory_per_child=max_memory_per_child)

    def RawValue(self, typecode_or_type, *args):
        from .sharedctypes import RawValue
        return RawValue(typecode_or_type, *args)

    def RawArray(self, typecode_or_type, size_or_initializer):
        from .sharedctypes import RawArray
        return RawArray(typecode_or_type, size_or_initializer)

    def Value(self, typecode_or_type, *args, lock=True):
        from .sharedctypes import Value
        return Value(typecode_or_type, *args, lock=lock, ctx=self.get_context())

    def Array(self, typecode_or_type, size_or_initializer, *, lock=True):
        from .sharedctypes import Array
        return Array(typecode_or_type, size_or_initializer, lock=lock,
                     ctx=self.get_context())

    def freeze_support(self):
        """Run the child's bootstrap when a frozen Windows program starts a child."""
        if sys.platform == 'win32' and getattr(sys, 'frozen', False):
            from .spawn import freeze_support
            freeze_support()

    def get_logger(self):
        """The 'multiprocessing' logger, created on first use."""
        from .util import get_logger
        return get_logger()

    def log_to_stderr(self, level=None):
        """Send the logger's records to stderr."""
        from .util import log_to_stderr
        return log_to_stderr(level)

    def allow_connection_pickling(self):
        """Kept for compatibility: Connections are always picklable at child start."""
        from . import connection  # noqa: F401  (registers the reducers)

    def set_executable(self, executable):
        """Interpreter used to start spawn children."""
        from .spawn import set_executable
        set_executable(executable)

    def set_forkserver_preload(self, module_names):
        """Modules the fork server imports once, so its children start warm."""
        from .forkserver import set_forkserver_preload
        set_forkserver_preload(module_names)

    def get_context(self, method=None):
        if method is None:
            return self
        try:
            ctx = _concrete_contexts[method]
        except KeyError:
            raise ValueError('cannot find context for %r' % method) from None
        ctx._check_available()
        return ctx

    def get_start_method(self, allow_none=False):
        return self._name

    def set_start_method(self, method, force=False):
        raise ValueError('cannot set start method of concrete context')

    @property
    def reducer(self):
        """The reduction module used to pickle objects for children."""
        return globals().get('reduction')

    @reducer.setter
    def reducer(self, reduction):
        globals()['reduction'] = reduction

    def _check_available(self):
        pass


class Process(process.BaseProcess):
    """A process of the default context: its start method is picked at start()."""

    _start_method = None

    @staticmethod
    def _Popen(process_obj):
        return _default_context.get_context().Process._Popen(process_obj)

    @staticmethod
    def _after_fork():
        return _default_context.get_context().Process._after_fork()


class DefaultContext(BaseContext):
    """The context behind module-level functions; its start method can be set once."""

    Process = Process

    def __init__(self, context):
        self._default_context = context
        self._actual_context = None

    def get_context(self, method=None):
        if method is None:
            if self._actual_context is None:
                self._actual_context = self._default_context
            return self._actual_context
        return super().get_context(method)

    def set_start_method(self, method, force=False):
        if self._actual_context is not None and not force:
            raise RuntimeError('context has already been set')
        if method is None and force:
            self._actual_context = None
            return
        self._actual_context = self.get_context(method)

    def get_start_method(self, allow_none=False):
        if self._actual_context is None:
            if allow_none:
                return None
            self._actual_context = self._default_context
        return self._actual_context._name

    def get_all_start_methods(self):
        """Start methods this platform supports, the default first."""
        if sys.platform == 'win32':
            return ['spawn']
        methods = ['spawn', 'fork'] if sys.platform == 'darwin' else ['fork', 'spawn']
        if reduction.HAVE_SEND_HANDLE:
            methods.append('forkserver')
        return methods


class ForkProcess(process.BaseProcess):
    _start_method = 'fork'

    @staticmethod
    def _Popen(process_obj):
        from .popen_fork import Popen
        return Popen(process_obj)


class SpawnProcess(process.BaseProcess):
    _start_method = 'spawn'

    @staticmethod
    def _Popen(process_obj):
        from .popen_spawn_posix import Popen
        return Popen(process_obj)

    @staticmethod
    def _after_fork():
        # A spawned child starts from a fresh interpreter: nothing to reset.
        pass


class ForkServerProcess(process.BaseProcess):
    _start_method = 'forkserver'

    @staticmethod
    def _Popen(process_obj):
        from .popen_forkserver import Popen
        return Popen(process_obj)


class ForkContext(BaseContext):
    _name = 'fork'
    Process = ForkProcess


class SpawnContext(BaseContext):
    _name = 'spawn'
    Process = SpawnProcess


class ForkServerContext(BaseContext):
    _name = 'forkserver'
    Process = ForkServerProcess

    def _check_available(self):
        if not reduction.HAVE_SEND_HANDLE:
            raise ValueError('forkserver start method not available')


_concrete_contexts = {
    'fork': ForkContext(),
    'spawn': SpawnContext(),
    'forkserver': ForkServerContext(),
}
# The running Python's default: fork on Linux up to 3.13, spawn on macOS,
# forkserver from 3.14 on.
if sys.platform == 'darwin':
    _default_context = DefaultContext(_concrete_contexts['spawn'])
elif sys.version_info >= (3, 14):
    _default_context = DefaultContext(_concrete_contexts['forkserver'])
else:
    _default_context = DefaultContext(_concrete_contexts['fork'])


def _start_method_of(ctx):
    """``ctx``'s start method; for the default context, the one it has or would pick,
    without fixing it as ``get_start_method()`` does."""
    if isinstance(ctx, DefaultContext):
        return (ctx._actual_context or ctx._default_context)._name
    get = getattr(ctx, 'get_start_method', None)    # (a stand-in context may have none)
    return get() if get is not None else None


def _force_start_method(method):
    _default_context._actual_context = _concrete_contexts[method]


# The Popen object of the child being started, per thread, while its process object
# is pickled: reducers of fd-backed objects ask it to pass their fds to the child.
_tls = threading.local()


def get_spawning_popen():
    return getattr(_tls, 'spawning_popen', None)


def set_spawning_popen(popen):
    _tls.spawning_popen = popen
    # Objects built on the stdlib (e.g. the stdlib ProcessPoolExecutor's queues, given
    # a ferromp context) pickle through the stdlib's reducers, which ask the stdlib's
    # context. Mirror the value there when the stdlib is loaded; never import it.
    std = sys.modules.get('multiprocessing.context')
    if std is not None:
        std.set_spawning_popen(popen)


def assert_spawning(obj):
    if get_spawning_popen() is None:
        raise RuntimeError(
            '%s objects should only be shared between processes'
            ' through inheritance' % type(obj).__name__
        )
