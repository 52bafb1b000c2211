"""Process objects: the stdlib's ``multiprocessing.process`` API over ferromp's core.

``BaseProcess`` holds the user-facing state (name, daemon flag, authkey, target) and
delegates the OS work to a Popen object chosen by the process's context (see
``popen_fork``, ``popen_spawn_posix``, ``popen_forkserver``), which in turn calls the
Rust core for fork / exec / waitpid / kill.
"""

__all__ = ['BaseProcess', 'current_process', 'active_children', 'parent_process']

import itertools
import os
import signal
import sys
import threading
from _weakrefset import WeakSet

try:
    ORIGINAL_DIR = os.path.abspath(os.getcwd())
except OSError:
    ORIGINAL_DIR = None


def current_process():
    """The Process object that stands for the calling process."""
    return _current_process


def active_children():
    """Children of the calling process that are still alive (reaping the others)."""
    _cleanup()
    return list(_children)


def parent_process():
    """The Process object of the parent, or None in the main process."""
    return _parent_process


def _cleanup():
    # Forget children that have exited, so their Popen objects can be freed.
    for child in list(_children):
        popen = child._popen
        if popen is not None and popen.poll() is not None:
            _children.discard(child)


class BaseProcess(object):
    """A unit of work run in a separate process; subclasses pick the start method."""

    _start_method = None

    def _Popen(self):
        raise NotImplementedError

    def __init__(self, group=None, target=None, name=None, args=(), kwargs={},  # noqa: B006
                 *, daemon=None):
        assert group is None, 'group argument must be None for now'
        serial = next(_process_counter)
        self._identity = _current_process._identity + (serial,)
        self._config = _current_process._config.copy()
        self._parent_pid = os.getpid()
        self._parent_name = _current_process.name
        self._popen = None
        self._closed = False
        self._target = target
        self._args = tuple(args)
        self._kwargs = dict(kwargs)
        self._name = name or (type(self).__name__ + '-'
                              + ':'.join(str(i) for i in self._identity))
        if daemon is not None:
            self.daemon = daemon
        _dangling.add(self)

    def _check_closed(self):
        if self._closed:
            raise ValueError("process object is closed")

    def run(self):
        """What the child runs; by default calls the target with its arguments."""
        if self._target:
            self._target(*self._args, **self._kwargs)

    def start(self):
        """Start the child process."""
        self._check_closed()
        assert self._popen is None, 'cannot start a process twice'
        assert self._parent_pid == os.getpid(), \
            'can only start a process object created by current process'
        assert not _current_process._config.get('daemon'), \
            'daemonic processes are not allowed to have children'
        _cleanup()
        self._popen = self._Popen(self)
        self._sentinel = self._popen.sentinel
        # The target and its arguments live on in the child; drop our references so
        # they can be garbage collected here.
        del self._target, self._args, self._kwargs
        _children.add(self)

    def terminate(self):
        """Send SIGTERM to the child."""
        self._check_closed()
        self._popen.terminate()

    def kill(self):
        """Send SIGKILL to the child."""
        self._check_closed()
        self._popen.kill()

    def join(self, timeout=None):
        """Wait until the child exits, or until ``timeout`` seconds pass."""
        self._check_closed()
        assert self._parent_pid == os.getpid(), 'can only join a child process'
        assert self._popen is not None, 'can only join a started process'
        res = self._popen.wait(timeout)
        if res is not None:
            _children.discard(self)

    def is_alive(self):
        """Whether the child is running."""
        self._check_closed()
        if self is _current_process:
            return True
        assert self._parent_pid == os.getpid(), 'can only test a child process'
        if self._popen is None:
            return False
        if self._popen.poll() is None:
            return True
        _children.discard(self)
        return False

    def close(self):
        """Release the resources held by a finished process object."""
        if self._popen is not None:
            if self._popen.poll() is None:
                raise ValueError("Cannot close a process while it is still running. "
                                 "You should first call join() or terminate().")
            self._popen.close()
            self._popen = None
            del self._sentinel
            _children.discard(self)
        self._closed = True

    @property
    def name(self):
        return self._name

    @name.setter
    def name(self, name):
        assert isinstance(name, str), 'name must be a string'
        self._name = name

    @property
    def daemon(self):
        """Whether the process is daemonic (killed when its parent exits)."""
        return self._config.get('daemon', False)

    @daemon.setter
    def daemon(self, daemonic):
        assert self._popen is None, 'process has already started'
        self._config['daemon'] = daemonic

    @property
    def authkey(self):
        return self._config['authkey']

    @authkey.setter
    def authkey(self, authkey):
        self._config['authkey'] = AuthenticationString(authkey)

    @property
    def exitcode(self):
        """The exit code, or None while running; -N if killed by signal N."""
        self._check_closed()
        if self._popen is None:
            return self._popen
        return self._popen.poll()

    @property
    def ident(self):
        """The process id (None before start)."""
        self._check_closed()
        if self is _current_process:
            return os.getpid()
        return self._popen and self._popen.pid

    pid = ident

    @property
    def sentinel(self):
        """A file descriptor that becomes readable when the process ends."""
        self._check_closed()
        try:
            return self._sentinel
        except AttributeError:
            raise ValueError("process not started") from None

    def __repr__(self):
        code = None
        if self is _current_process:
            status = 'started'
        elif self._closed:
            status = 'closed'
        elif self._parent_pid != os.getpid():
            status = 'unknown'
        elif self._popen is None:
            status = 'initial'
        else:
            code = self._popen.poll()
            status = 'started' if code is None else 'stopped'
        parts = [type(self).__name__, 'name=%r' % self._name]
        if self._popen is not None:
            parts.append('pid=%s' % self._popen.pid)
        parts.append('parent=%s' % self._parent_pid)
        parts.append(status)
        if code is not None:
            parts.append('exitcode=%s' % _exitcode_to_name.get(code, code))
        if self.daemon:
            parts.append('daemon')
        return '<%s>' % ' '.join(parts)

    def _bootstrap(self, parent_sentinel=None):
        """Runs in the child: set up process state, call run(), return the exit code."""
        from . import util, context
        global _current_process, _parent_process, _process_counter, _children
        try:
            if self._start_method is not None:
                context._force_start_method(self._start_method)
            _process_counter = itertools.count(1)
            _children = set()
            util._close_stdin()
            old_process = _current_process
            _current_process = self
            _parent_process = _ParentProcess(self._parent_name, self._parent_pid,
                                             parent_sentinel)
            if self.daemon:
                # The OS parent, not _parent_pid: under forkserver it is the server,
                # which exits when the real parent does.
                _watch_parent(parent_sentinel, os.getppid())
            if threading._HAVE_THREAD_NATIVE_ID:
                threading.main_thread()._set_native_id()
            try:
                self._after_fork()
            finally:
                # The parent's Process object is not ours to finalize.
                del old_process
            util.info('child process calling self.run()')
            try:
                self.run()
                exitcode = 0
            finally:
                util._exit_function()
                _run_stdlib_finalizers()
        except SystemExit as e:
            if e.code is None:
                exitcode = 0
            elif isinstance(e.code, int):
                exitcode = e.code
            else:
                sys.stderr.write(str(e.code) + '\n')
                exitcode = 1
        except BaseException:
            exitcode = 1
            import traceback
            sys.stderr.write('Process %s:\n' % self.name)
            traceback.print_exc()
        finally:
            threading._shutdown()
            util.info('process exiting with exitcode %d' % exitcode)
            util._flush_std_streams()
        return exitcode

    @staticmethod
    def _after_fork():
        from . import util
        util._finalizer_registry.clear()
        util._run_after_forkers()
        # Stdlib objects built on a ferromp context (the stdlib ProcessPoolExecutor's
        # queues) keep their after-fork hooks and finalizers in the stdlib's registries.
        std_util = sys.modules.get('multiprocessing.util')
        if std_util is not None:
            std_process = sys.modules.get('multiprocessing.process')
            if std_process is not None:
                # The parent's stdlib children are not ours to reap or terminate.
                std_process._children = set()
            std_util._finalizer_registry.clear()
            std_util._run_after_forkers()


def _run_stdlib_finalizers():
    # Flush stdlib objects (e.g. a stdlib Queue's feeder) at child exit, as the stdlib's
    # own bootstrap would; the stdlib's full exit function would also act on the stdlib
    # process table, which belongs to the parent.
    std_util = sys.modules.get('multiprocessing.util')
    if std_util is not None:
        std_util._run_finalizers(0)
        std_util._run_finalizers()


def _watch_parent(parent_sentinel, parent_pid):
    # Daemonic children must not outlive their parent, even one killed by SIGKILL,
    # which runs no exit handlers. The core watches the parent from a thread.
    try:
        from . import _core
        _core.watch_parent(parent_sentinel, parent_pid)
    except Exception:  # pragma: no cover - a missing watch must not stop the child
        pass


class AuthenticationString(bytes):
    """Bytes that refuse to be pickled except while a child process is being started."""

    def __reduce__(self):
        from .context import get_spawning_popen
        if get_spawning_popen() is None:
            raise TypeError(
                'Pickling an AuthenticationString object is '
                'disallowed for security reasons'
            )
        return AuthenticationString, (bytes(self),)


class _ParentProcess(BaseProcess):
    """Stands for the parent inside a child: is_alive() and join() via the sentinel."""

    def __init__(self, name, pid, sentinel):
        self._identity = ()
        self._name = name
        self._pid = pid
        self._parent_pid = None
        self._popen = None
        self._closed = False
        self._sentinel = sentinel
        self._config = {}

    def is_alive(self):
        from .connection import wait
        return not wait([self._sentinel], timeout=0)

    @property
    def ident(self):
        return self._pid

    def join(self, timeout=None):
        """Wait for the parent to exit (the sentinel turns readable)."""
        from .connection import wait
        wait([self._sentinel], timeout=timeout)

    pid = ident


class _MainProcess(BaseProcess):
    """The process object of the interpreter that imported ferromp first."""

    def __init__(self):
        self._identity = ()
        self._name = 'MainProcess'
        self._parent_pid = None
        self._popen = None
        self._closed = False
        self._config = {'authkey': AuthenticationString(os.urandom(32)),
                        'semprefix': '/mp'}
        # 'semprefix' names POSIX semaphores; 'authkey' secures Listener/Client.

    def close(self):
        pass


_parent_process = None
_current_process = _MainProcess()
_process_counter = itertools.count(1)
_children = set()
del _MainProcess

_exitcode_to_name = {}
for _name, _signum in list(signal.__dict__.items()):
    if _name[:3] == 'SIG' and '_' not in _name:
        _exitcode_to_name[-_signum] = f'-{_name}'
del _name, _signum

# Every Process object ever created and not yet collected; the test suite compares it
# before and after tests to find leaked processes.
_dangling = WeakSet()
