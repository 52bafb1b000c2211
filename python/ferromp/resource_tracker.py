"""The resource tracker: the stdlib's ``multiprocessing.resource_tracker``.

Named shared-memory segments (``shared_memory.SharedMemory``) live in ``/dev/shm``
until someone unlinks them, also after every process that used them has died. The
tracker is a small process that remembers which names are still registered and
unlinks them when the program is gone:

* It is started lazily, by the first ``register`` / ``ensure_running`` / ``getfd``
  (a spawn or forkserver child start calls ``getfd``), with ferromp's own
  ``util.spawnv_passfds``: a fresh interpreter running ``main(fd)``, where ``fd`` is
  the read end of a pipe.
* Every process of the program holds the write end: the parent, its fork children
  (inherited), its spawn children (passed, ``spawn_main(tracker_fd=...)``) and its
  forkserver children (sent to the server with each request). So the tracker reads
  EOF exactly when the last of them has exited, however they died (SIGKILL
  included). It then unlinks every name still registered, warning with the stdlib's
  text ("There appear to be N leaked shared_memory objects to clean up at shutdown").
* The wire format is the stdlib's: one ``CMD:name:rtype\\n`` line per write, at most
  512 bytes so that a write to the pipe is atomic.
* The tracker ignores SIGINT and SIGTERM, as the stdlib's does: a Ctrl-C or a
  ``killall python`` must not take it down before the processes it watches. The
  signals are blocked in the parent across the start, so one sent before ``main``
  installs its handlers stays pending and is then discarded.

Differences from the stdlib, invisible to callers:

* ``register`` / ``unregister`` write the message straight away and only look at
  the tracker's health when that write fails (EPIPE: the tracker died); the stdlib
  first writes a probe every time. One write per message instead of two.
* The tracker reads its pipe in batches: after each read it naps for
  ``_BATCH_DELAY`` before reading again. A write into a pipe whose reader sleeps in
  ``read()`` pays for waking that process (about 8 us on this VM, most of a
  ``SharedMemory()``); a write while the reader naps is a plain copy (under 1 us). The
  pipe holds at least 64 KiB (1 MiB where the system allows), over a thousand
  messages, far more than a program sends in one nap, so writers do not block; EOF
  is seen at most one nap late.
* ferromp's semaphores live in memfds and have no name (``synchronize``), so there
  is no ``'semaphore'`` resource type to clean up.
"""

import os
import signal
import sys
import threading
import time
import warnings

from . import _core

__all__ = ['ensure_running', 'register', 'unregister']

_HAVE_SIGMASK = hasattr(signal, 'pthread_sigmask')
_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# What the tracker calls on a name left registered at shutdown, by resource type.
# 'noop' is what the liveness probe names (it is never registered).
_CLEANUP_FUNCS = {
    'noop': lambda: None,
    'shared_memory': _core.shm_unlink,
}

# POSIX makes writes of up to PIPE_BUF (>= 512) bytes to a pipe atomic.
_MAX_MSG = 512
_PROBE = b'PROBE:0:noop\n'

# The tracker's nap between two reads of its pipe (see the module docstring).
_BATCH_DELAY = 0.005
_PIPE_SIZE = 1 << 20


class ResourceTracker(object):
    """This process's handle on the tracker: the write end of its pipe (``_fd``) and,
    in the process that started it, its pid (``_pid``)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._fd = None
        self._pid = None

    def _after_fork_in_child(self):
        # The fd and pid are inherited on purpose (a fork child shares the tracker);
        # only the lock may have been held by a thread that does not exist here.
        self._lock = threading.Lock()

    def _stop(self):
        """Close our write end and wait for the tracker (test-suite support)."""
        with self._lock:
            if self._fd is None:
                return
            os.close(self._fd)
            self._fd = None
            if self._pid is not None:
                try:
                    os.waitpid(self._pid, 0)
                except ChildProcessError:
                    pass
                self._pid = None

    def getfd(self):
        """The write end of the tracker's pipe, starting the tracker if needed."""
        self.ensure_running()
        return self._fd

    def ensure_running(self):
        """Make sure the tracker runs, starting it (or a new one) if needed.

        Any process of the program may call this; a child normally reaches the
        tracker its parent started."""
        with self._lock:
            self._ensure_running_locked()

    def _ensure_running_locked(self):
        if self._fd is not None:
            if self._check_alive():
                return
            # The tracker is gone (killed): what it knew is lost, start a new one.
            os.close(self._fd)
            if self._pid is not None:
                try:
                    os.waitpid(self._pid, 0)
                except ChildProcessError:
                    pass
            self._fd = self._pid = None
            warnings.warn('resource_tracker: process died unexpectedly, '
                          'relaunching.  Some resources might leak.', stacklevel=3)
        self._launch()

    def _launch(self):
        from . import spawn
        from . import util

        r, w = os.pipe()
        try:
            exe = spawn.get_executable()
            args = [exe] + util._args_from_interpreter_flags()
            args += ['-c', 'from ferromp.resource_tracker import main;main(%d)' % r]
            # The child inherits this mask and keeps SIGINT/SIGTERM blocked until
            # main() ignores them: a signal sent right after the start cannot kill it.
            if _HAVE_SIGMASK:
                signal.pthread_sigmask(signal.SIG_BLOCK, _IGNORED_SIGNALS)
            try:
                pid = util.spawnv_passfds(exe, args, [r])
            finally:
                if _HAVE_SIGMASK:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _IGNORED_SIGNALS)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self._fd = w
        self._pid = pid

    def _check_alive(self):
        """Whether the tracker still reads its pipe (writes a probe message)."""
        try:
            os.write(self._fd, _PROBE)
        except OSError:
            return False
        return True

    def register(self, name, rtype):
        """Have the tracker unlink ``name`` at shutdown unless it is unregistered."""
        self._send('REGISTER', name, rtype)

    def unregister(self, name, rtype):
        """Forget ``name`` (its owner cleaned it up)."""
        self._send('UNREGISTER', name, rtype)

    def _send(self, cmd, name, rtype):
        msg = '{0}:{1}:{2}\n'.format(cmd, name, rtype).encode('ascii')
        if len(msg) > _MAX_MSG:
            raise ValueError('msg too long')
        with self._lock:
            if self._fd is not None:
                try:
                    nbytes = os.write(self._fd, msg)
                except OSError:
                    # Dead tracker (EPIPE) or a closed fd: take the slow path, which
                    # warns and starts a new tracker as ensure_running() does.
                    pass
                else:
                    assert nbytes == len(msg), nbytes
                    return
            self._ensure_running_locked()
            nbytes = os.write(self._fd, msg)
            assert nbytes == len(msg), nbytes


_resource_tracker = ResourceTracker()
ensure_running = _resource_tracker.ensure_running
register = _resource_tracker.register
unregister = _resource_tracker.unregister
getfd = _resource_tracker.getfd

if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_resource_tracker._after_fork_in_child)


def main(fd):
    """The tracker process: read messages from ``fd`` until EOF, then clean up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _HAVE_SIGMASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _IGNORED_SIGNALS)

    # Keep stderr for the warnings; let go of the terminal otherwise.
    for stream in (sys.stdin, sys.stdout):
        try:
            stream.close()
        except Exception:
            pass

    try:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except (ImportError, AttributeError, OSError):
        pass  # the default 64 KiB is plenty too

    registered = {rtype: set() for rtype in _CLEANUP_FUNCS}
    try:
        pending = b''
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            # Each message is one atomic write ending in a newline; a read may still
            # stop in the middle of one, which then waits for the next read.
            *lines, pending = (pending + chunk).split(b'\n')
            for line in lines:
                _handle_reporting(line, registered)
            time.sleep(_BATCH_DELAY)
        if pending:
            _handle_reporting(pending, registered)
        os.close(fd)
    finally:
        # EOF: every process of the program has exited. What is still registered
        # was leaked (its owner died or never unlinked it).
        _cleanup(registered)


def _handle_reporting(line, registered):
    # A bad message is reported on stderr and skipped; the tracker carries on.
    try:
        _handle(line, registered)
    except Exception:
        try:
            sys.excepthook(*sys.exc_info())
        except BaseException:
            pass


def _handle(line, registered):
    cmd, name, rtype = line.strip().decode('ascii').split(':')
    if rtype not in _CLEANUP_FUNCS:
        raise ValueError(f'Cannot register {name} for automatic cleanup: '
                         f'unknown resource type {rtype}')
    if cmd == 'REGISTER':
        registered[rtype].add(name)
    elif cmd == 'UNREGISTER':
        registered[rtype].remove(name)
    elif cmd != 'PROBE':
        raise RuntimeError('unrecognized command %r' % cmd)


def _cleanup(registered):
    for rtype, names in registered.items():
        if not names:
            continue
        try:
            warnings.warn('resource_tracker: There appear to be %d leaked %s objects '
                          'to clean up at shutdown' % (len(names), rtype), stacklevel=1)
        except Exception:
            pass
        cleanup = _CLEANUP_FUNCS[rtype]
        for name in names:
            try:
                cleanup(name)
            except Exception as e:
                try:
                    warnings.warn('resource_tracker: %r: %s' % (name, e), stacklevel=1)
                except Exception:
                    pass
