"""Helpers shared by the rest of ferromp: logging, finalizers, after-fork hooks, fds.

This is ferromp's counterpart of the stdlib's ``multiprocessing/util.py``. It keeps the
stdlib's public and underscore names, because libraries and CPython's own test suite
reach into them (``_finalizer_registry``, ``_afterfork_registry``, ``_exit_function``,
``_run_finalizers``, ``_cleanup_tests`` ...). Nothing here needs the Rust core except
``spawnv_passfds``, which imports ``ferromp._core`` when it is called.
"""

import atexit
import itertools
import os
import sys
import threading  # imported before our atexit hook is installed, as the stdlib does
import weakref

from . import process

__all__ = [
    'sub_debug', 'debug', 'info', 'sub_warning', 'get_logger',
    'log_to_stderr', 'get_temp_dir', 'register_after_fork',
    'is_exiting', 'Finalize', 'ForkAwareThreadLock', 'ForkAwareLocal',
    'close_all_fds_except', 'SUBDEBUG', 'SUBWARNING',
]

# spawn and forkserver build the child's command line from this; the stdlib's util
# exposes it under the same name, so callers written against it keep working.


def _args_from_interpreter_flags():
    # subprocess costs a spawn child several ms to import; only parents need this.
    import subprocess
    return subprocess._args_from_interpreter_flags()

#
# Logging
#

NOTSET = 0
SUBDEBUG = 5
DEBUG = 10
INFO = 20
SUBWARNING = 25

# Deliberately the stdlib's logger name rather than "ferromp": ferromp is a drop-in, so a
# program's existing logging configuration for "multiprocessing" (levels, handlers,
# filters) must apply to it unchanged. The price is that ferromp and the stdlib share
# one logger object when both are loaded in the same process.
LOGGER_NAME = 'multiprocessing'
DEFAULT_LOGGING_FORMAT = '[%(levelname)s/%(processName)s] %(message)s'

_logger = None
_log_to_stderr = False


def sub_debug(msg, *args):
    if _logger:
        _logger.log(SUBDEBUG, msg, *args)


def debug(msg, *args):
    if _logger:
        _logger.log(DEBUG, msg, *args)


def info(msg, *args):
    if _logger:
        _logger.log(INFO, msg, *args)


def sub_warning(msg, *args):
    if _logger:
        _logger.log(SUBWARNING, msg, *args)


def get_logger():
    '''
    Returns logger used by multiprocessing
    '''
    global _logger
    import logging

    # logging's own module lock (an RLock, present on every supported Python) makes
    # first-time creation race-free against threads configuring logging at the same time.
    with logging._lock:
        if not _logger:
            _logger = logging.getLogger(LOGGER_NAME)
            _logger.propagate = False
            # atexit runs hooks last-registered-first, and logging registered its
            # shutdown() when it was imported. Moving our hook to the end makes the
            # finalizers run (and log) before logging closes its handlers.
            atexit.unregister(_exit_function)
            atexit.register(_exit_function)
    return _logger


def log_to_stderr(level=None):
    '''
    Turn on logging and add a handler which prints to stderr
    '''
    global _log_to_stderr
    import logging

    logger = get_logger()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(DEFAULT_LOGGING_FORMAT))
    logger.addHandler(handler)
    if level:
        logger.setLevel(level)
    _log_to_stderr = True
    return _logger


#
# Socket addresses
#

def _platform_supports_abstract_sockets():
    return sys.platform == 'linux' or hasattr(sys, 'getandroidapilevel')


def is_abstract_socket_namespace(address):
    if not address:
        return False
    if isinstance(address, bytes):
        return address[0] == 0
    if isinstance(address, str):
        return address[0] == '\0'
    raise TypeError(f'address type of {address!r} unrecognized')


abstract_sockets_supported = _platform_supports_abstract_sockets()

# Only the (Windows) AF_PIPE names need a per-process sequence number.
_pipe_counter = itertools.count()


def arbitrary_address(family):
    '''
    Return an arbitrary free address for the given family
    '''
    import tempfile

    if family == 'AF_INET':
        return ('localhost', 0)
    if family == 'AF_UNIX':
        # A filesystem path even where abstract sockets exist, as CPython does since
        # 3.11.1 (CVE-2022-42919): an abstract socket has no permissions, so any local
        # user could connect to it, while this path lives in a 0700 directory.
        return tempfile.mktemp(prefix='listener-', dir=get_temp_dir())
    if family == 'AF_PIPE':
        prefix = r'\\.\pipe\pyc-%d-%d-' % (os.getpid(), next(_pipe_counter))
        return tempfile.mktemp(prefix=prefix, dir='')
    raise ValueError('unrecognized family')


#
# A per-process temporary directory, removed at exit
#

def _remove_temp_dir(rmtree, tempdir):
    try:
        rmtree(tempdir)
    except FileNotFoundError:
        # Someone (a test, tmp cleaner) got there first: the goal is already met.
        pass
    # current_process() may already be gone when this runs late in interpreter shutdown.
    current = process.current_process()
    if current is not None:
        current._config['tempdir'] = None


def get_temp_dir():
    # Kept in the process's _config so a forked child reuses its parent's directory
    # instead of creating its own; only the creator removes it (Finalize checks the pid).
    config = process.current_process()._config
    tempdir = config.get('tempdir')
    if tempdir is None:
        import shutil
        import tempfile

        tempdir = tempfile.mkdtemp(prefix='pymp-')
        info('created temp directory %s', tempdir)
        # rmtree is bound now because module globals may be torn down by the time
        # this low-priority finalizer runs.
        Finalize(None, _remove_temp_dir, args=(shutil.rmtree, tempdir), exitpriority=-100)
        config['tempdir'] = tempdir
    return tempdir


#
# Hooks run in a child process right after it is created
#

# Keyed by (registration order, id(obj), func); the object is held weakly so that
# registering never keeps anything alive.
_afterfork_registry = weakref.WeakValueDictionary()
_afterfork_counter = itertools.count()


def _run_after_forkers():
    # Materialise first: a hook may create or drop registered objects.
    entries = sorted(_afterfork_registry.items(), key=lambda entry: entry[0][0])
    for (_order, _ident, func), obj in entries:
        try:
            func(obj)
        except Exception as e:
            info('after forker raised exception %s', e)


def register_after_fork(obj, func):
    _afterfork_registry[(next(_afterfork_counter), id(obj), func)] = obj


#
# Finalization using weakrefs
#

# Maps (exitpriority, creation order) -> Finalize. A plain dict of strong references:
# a finalizer stays registered until it runs or is cancelled.
_finalizer_registry = {}
_finalizer_counter = itertools.count()


class Finalize:
    '''
    Class which supports object finalization using weakrefs
    '''

    def __init__(self, obj, callback, args=(), kwargs=None, exitpriority=None):
        if exitpriority is not None and not isinstance(exitpriority, int):
            raise TypeError(
                "Exitpriority ({0!r}) must be None or int, not {1!s}".format(
                    exitpriority, type(exitpriority)))
        if obj is None and exitpriority is None:
            # Nothing would ever trigger it: no weakref to die, no exit run to include it.
            raise ValueError("Without object, exitpriority cannot be None")

        # The weakref's callback is the finalizer itself, so the object's death runs it.
        self._weakref = None if obj is None else weakref.ref(obj, self)
        self._callback = callback
        self._args = args
        self._kwargs = kwargs or {}
        self._key = (exitpriority, next(_finalizer_counter))
        # A forked child inherits the registry; only the creating process may run it.
        self._pid = os.getpid()
        _finalizer_registry[self._key] = self

    def __call__(self, wr=None,
                 # Bound as defaults because this may run from a weakref callback during
                 # interpreter shutdown, after the module's globals have been cleared.
                 _registry=_finalizer_registry, _sub_debug=sub_debug, _getpid=os.getpid):
        '''
        Run the callback unless it has already been called or cancelled
        '''
        # dict.pop is atomic, so two threads (or the GC and a thread) racing here
        # cannot both win: whoever removes the key runs the callback.
        if _registry.pop(self._key, None) is None:
            _sub_debug('finalizer no longer registered')
            return None
        if self._pid != _getpid():
            _sub_debug('finalizer ignored because different process')
            result = None
        else:
            _sub_debug('finalizer calling %s with args %s and kwargs %s',
                       self._callback, self._args, self._kwargs)
            result = self._callback(*self._args, **self._kwargs)
        self._forget()
        return result

    def _forget(self):
        # Drop references so that a finalizer kept alive by its caller pins nothing.
        self._weakref = self._callback = self._args = self._kwargs = self._key = None

    def cancel(self):
        '''
        Cancel finalization of the object
        '''
        if _finalizer_registry.pop(self._key, None) is not None:
            self._forget()

    def still_active(self):
        '''
        Return whether this finalizer is still waiting to invoke callback
        '''
        return self._key in _finalizer_registry

    def __repr__(self):
        name = type(self).__name__
        try:
            obj = self._weakref()
        except (AttributeError, TypeError):
            # No weakref: created without an object, or already run/cancelled.
            obj = None
        if obj is None:
            return '<%s object, dead>' % name

        parts = ['callback=%s' % getattr(self._callback, '__name__', self._callback)]
        if self._args:
            parts.append('args=' + str(self._args))
        if self._kwargs:
            parts.append('kwargs=' + str(self._kwargs))
        if self._key[0] is not None:
            parts.append('exitpriority=' + str(self._key[0]))
        return '<%s object, %s>' % (name, ', '.join(parts))


def _run_finalizers(minpriority=None):
    '''
    Run all finalizers whose exit priority is not None and at least minpriority

    Finalizers with highest priority are called first; finalizers with
    the same priority will be called in reverse order of creation.
    '''
    registry = _finalizer_registry
    if registry is None:
        # Called after this module's globals were cleared at shutdown.
        return

    # Snapshot the keys only: list(dict) is a single atomic step under the GIL, whereas
    # iterating items() would fail if a GC run or another thread mutates the registry
    # meanwhile (bpo-24484). Entries that vanish before their turn are skipped below.
    if minpriority is None:
        keys = [k for k in list(registry) if k[0] is not None]
    else:
        keys = [k for k in list(registry) if k[0] is not None and k[0] >= minpriority]
    # (priority, creation order) descending: highest priority first, newest first.
    keys.sort(reverse=True)

    for key in keys:
        finalizer = registry.get(key)
        if finalizer is None:
            continue
        sub_debug('calling %s', finalizer)
        try:
            finalizer()
        except Exception:
            import traceback
            traceback.print_exc()

    if minpriority is None:
        registry.clear()


#
# Clean up on exit
#

_exiting = False


def is_exiting():
    '''
    Returns true if the process is shutting down
    '''
    # None means the module's globals were already cleared: we are surely exiting.
    return _exiting or _exiting is None


def _exit_function(info=info, debug=debug, _run_finalizers=_run_finalizers,
                   _process=process):
    # Everything this uses is bound as a default argument because it can be called
    # after the module's globals were torn down. The process module is bound rather
    # than its functions so that they are looked up when this runs, which also lets
    # process.py and this module import each other in either order.
    global _exiting

    if _exiting:
        return
    _exiting = True

    info('process shutting down')
    debug('running all "atexit" finalizers with priority >= 0')
    _run_finalizers(0)

    # current_process() is None when sys.modules was swapped and the process module
    # was garbage collected (bpo-9775, bpo-15881); there are no children to reap then.
    if _process.current_process() is not None:
        # Daemonic children die with us; the others are waited for, as documented.
        for p in _process.active_children():
            if p.daemon:
                info('calling terminate() for daemon %s', p.name)
                p._popen.terminate()
        for p in _process.active_children():
            info('calling join() for process %s', p.name)
            p.join()

    debug('running the remaining "atexit" finalizers')
    _run_finalizers()


atexit.register(_exit_function)


#
# Fork-aware types
#

class ForkAwareThreadLock:
    '''
    A threading.Lock that is fresh (unlocked) in a child process after fork
    '''

    def __init__(self):
        self._lock = threading.Lock()
        # The bound methods are exposed directly (no Python-level wrapper on the hot
        # path). They stay valid after fork because _at_fork_reinit resets the same
        # lock object in place.
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        register_after_fork(self, ForkAwareThreadLock._at_fork_reinit)

    def _at_fork_reinit(self):
        # Another thread of the parent may have held the lock at fork time, and that
        # thread does not exist in the child: without this the child could deadlock.
        self._lock._at_fork_reinit()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *args):
        return self._lock.__exit__(*args)


def _clear_local(local):
    local.__dict__.clear()


class ForkAwareLocal(threading.local):
    '''
    A threading.local whose contents are dropped in a child process after fork
    '''

    def __init__(self):
        register_after_fork(self, _clear_local)

    def __reduce__(self):
        # Thread-local contents are per-process state: a copy sent elsewhere starts empty.
        return type(self), ()


#
# File descriptors and standard streams
#

try:
    MAXFD = os.sysconf('SC_OPEN_MAX')
except Exception:
    MAXFD = 256


def close_all_fds_except(fds):
    # -1 and MAXFD bracket the kept fds so every gap, including the ones before the
    # first and after the last kept fd, is closed by one closerange() call.
    bounds = sorted([-1, *fds, MAXFD])
    assert bounds[-1] == MAXFD, 'fd too large'
    for low, high in zip(bounds, bounds[1:]):
        # Empty gaps (adjacent or repeated fds) are skipped, not passed on: on CPython
        # 3.11, os.closerange(0, 0) becomes close_range(0, UINT_MAX) and closes every
        # fd, kept ones included, whenever fd 0 is in the kept set.
        if low + 1 < high:
            os.closerange(low + 1, high)


def _close_stdin():
    # A child must not read the parent's terminal; it gets an empty stdin instead.
    if sys.stdin is None:
        return
    try:
        sys.stdin.close()
    except (OSError, ValueError):
        pass
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            sys.stdin = open(fd, encoding='utf-8', closefd=False)
        except BaseException:
            os.close(fd)
            raise
    except (OSError, ValueError):
        pass


def _flush_std_streams():
    # Either stream may be None (pythonw, closed by the user) or already closed.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass


def spawnv_passfds(path, args, passfds):
    # The core forks and execs with only passfds (plus 0, 1, 2) left open and returns
    # the child's pid; doing it in Rust avoids Python code running between fork and exec.
    from . import _core

    return _core.spawnv_passfds(
        os.fsencode(path),
        [os.fsencode(arg) for arg in args],
        sorted(int(fd) for fd in passfds),
    )


def close_fds(*fds):
    """Close each file descriptor given as an argument"""
    for fd in fds:
        os.close(fd)


#
# Test-suite support
#

def _stop_helper(modname, *attrs):
    # The helper module may not exist (yet), and an optional piece of it may be
    # missing: either way there is nothing running to stop. Only the lookup is guarded,
    # so an error raised by the stop function itself still surfaces.
    import importlib

    try:
        target = importlib.import_module('%s.%s' % (__package__, modname))
    except ImportError:
        return
    for attr in attrs:
        target = getattr(target, attr, None)
        if target is None:
            return
    target()


def _reap_children_fallback():
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except OSError:
            return
        if pid == 0:
            return


def _cleanup_tests():
    """Cleanup multiprocessing resources when multiprocessing tests
    completed."""
    try:
        from test import support
    except ImportError:
        # Distributions may strip the test package; the cleanup must still happen.
        support = None

    process._cleanup()

    _stop_helper('forkserver', '_forkserver', '_stop')
    _stop_helper('resource_tracker', '_resource_tracker', '_stop')
    # Not stopped by the stdlib here; stopping it too leaves no stray thread behind.
    _stop_helper('resource_sharer', 'stop')

    # bpo-37421: remove get_temp_dir() directories now rather than at exit.
    _run_finalizers()

    if support is not None:
        support.gc_collect()
        support.reap_children()
    else:
        import gc

        gc.collect()
        _reap_children_fallback()
