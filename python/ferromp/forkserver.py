"""The fork server: the stdlib's ``multiprocessing.forkserver``, on ferromp's core.

A parent that uses the forkserver start method starts one server process (a fresh
interpreter that has imported ferromp and the preload modules) and keeps a socketpair
to it. To start a child, the parent sends the server, in one SCM_RIGHTS message, the
read end of a data pipe, the write end of a status pipe and the fds the child must
inherit; the server forks, answers with the pid, and when it reaps the child writes
its exit code to the status pipe. The message also carries the resource tracker's
fd, which the child keeps as its own (``resource_tracker``). The parent then writes
the preparation data and the pickled Process into the data pipe.

Differences from the stdlib, for speed: one persistent channel instead of a new unix
socket connection per child, and a per-child status pipe as the child's sentinel.
"""

import os
import signal
import struct
import sys
import threading

from . import _core
from . import process
from . import resource_tracker
from . import spawn
from . import util

__all__ = ['ensure_running', 'get_inherited_fds', 'connect_to_new_process',
           'set_forkserver_preload']

MAXFDS_TO_SEND = 256
SIGNED_STRUCT = struct.Struct('q')     # large enough for pid_t


class ForkServer(object):
    """The parent's handle on its fork server."""

    def __init__(self):
        self._forkserver_address = None
        self._forkserver_alive_fd = None
        self._forkserver_pid = None
        self._ctl_fd = None
        self._inherited_fds = None
        self._lock = threading.Lock()
        self._preload_modules = ['__main__']

    def _stop(self):
        with self._lock:
            self._stop_unlocked()

    def _stop_unlocked(self):
        if self._forkserver_pid is None:
            return
        # Closing both channels makes the server exit; then reap it.
        for fd in (self._ctl_fd, self._forkserver_alive_fd):
            if fd is not None:
                os.close(fd)
        self._ctl_fd = self._forkserver_alive_fd = None
        try:
            _core.waitpid(self._forkserver_pid, True)
        except ChildProcessError:
            pass
        self._forkserver_pid = None

    def _forget(self):
        # In a forked child: the server belongs to the parent. Drop our copies of its
        # channels so the server sees EOF when the parent goes, and start afresh.
        for fd in (self._ctl_fd, self._forkserver_alive_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._ctl_fd = self._forkserver_alive_fd = self._forkserver_pid = None
        self._lock = threading.Lock()

    def set_forkserver_preload(self, modules_names):
        """Modules the server imports before forking children."""
        if not all(type(mod) is str for mod in modules_names):
            raise TypeError('module_names must be a list of strings')
        self._preload_modules = modules_names

    def get_inherited_fds(self):
        """In a forkserver child: the fds the parent passed, in order (else None)."""
        return self._inherited_fds

    def connect_to_new_process(self, fds):
        """Have the server fork a child that inherits ``fds``.

        Returns ``(pid, status_r, data_w)``: the child's pid, the fd that turns
        readable with its exit code, and the pipe to write its start data into."""
        if len(fds) + 3 >= MAXFDS_TO_SEND:
            raise ValueError('too many fds')
        for attempt in (0, 1):
            self.ensure_running()
            # Each child gets the current tracker's fd (a dead tracker is replaced
            # between two children), as the stdlib passes it with every request.
            tracker_fd = resource_tracker.getfd()
            data_r, data_w = os.pipe()
            status_r, status_w = os.pipe()
            try:
                with self._lock:
                    _core.sendfds(self._ctl_fd, b'F',
                                  [data_r, status_w, tracker_fd] + list(fds))
                    pid = SIGNED_STRUCT.unpack(_read_exact(self._ctl_fd, 8))[0]
            except (OSError, EOFError):
                os.close(data_w)
                os.close(status_r)
                if attempt:
                    raise
                # The server died since ensure_running() looked; start a new one.
                continue
            finally:
                os.close(data_r)
                os.close(status_w)
            return pid, status_r, data_w

    def ensure_running(self):
        """Start the server unless it runs already (restarting a dead one)."""
        with self._lock:
            if self._forkserver_pid is not None:
                try:
                    alive = _core.waitpid(self._forkserver_pid, False) is None
                except ChildProcessError:
                    alive = False
                if alive:
                    return
                for fd in (self._ctl_fd, self._forkserver_alive_fd):
                    if fd is not None:
                        os.close(fd)
                self._ctl_fd = self._forkserver_alive_fd = self._forkserver_pid = None

            cmd = 'from ferromp.forkserver import main; main(%d, %d, %r, **%r)'
            data = {}
            if self._preload_modules:
                prep = spawn.get_preparation_data('ignore')
                data['sys_path'] = prep['sys_path']
                if '__main__' in self._preload_modules and 'init_main_from_path' in prep:
                    # Import the main script once in the server, with the parent's
                    # argv and cwd, so children skip re-importing it (the stdlib 3.11
                    # means to do this but passes the wrong key and never does).
                    data.update(main_path=prep['init_main_from_path'],
                                sys_argv=prep['sys_argv'], dir=prep['dir'])
            # The server itself uses the parent's tracker too (a preloaded main
            # module may create a SharedMemory or a spawn-context lock).
            data['tracker_fd'] = tracker_fd = resource_tracker.getfd()
            ours, theirs = _core.socketpair()
            alive_r, alive_w = os.pipe()
            try:
                exe = spawn.get_executable()
                args = [exe] + util._args_from_interpreter_flags()
                args += ['-c', cmd % (theirs, alive_r, self._preload_modules, data)]
                pid = util.spawnv_passfds(exe, args, [theirs, alive_r, tracker_fd])
            except BaseException:
                os.close(ours)
                os.close(alive_w)
                raise
            finally:
                os.close(theirs)
                os.close(alive_r)
            self._ctl_fd = ours
            self._forkserver_alive_fd = alive_w
            self._forkserver_pid = pid


def _read_exact(fd, n):
    buf = b''
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError('fork server closed the connection')
        buf += chunk
    return buf


def main(ctl_fd, alive_r, preload, main_path=None, sys_path=None, sys_argv=None,
         dir=None, tracker_fd=None):
    """The server's loop: fork a child per request, report exit codes."""
    server_tracker_fd = tracker_fd
    resource_tracker._resource_tracker._fd = tracker_fd
    if preload:
        if sys_path is not None:
            sys.path[:] = sys_path
        if sys_argv is not None:
            sys.argv[:] = sys_argv
        if dir is not None:
            os.chdir(dir)
        if '__main__' in preload and main_path is not None:
            _preload_main(main_path)
        for modname in preload:
            if modname == '__main__':
                continue
            try:
                __import__(modname)
            except ImportError:
                pass
    util._close_stdin()

    sig_r, sig_w = os.pipe()
    os.set_blocking(sig_r, False)
    os.set_blocking(sig_w, False)

    def sigchld_handler(*_unused):
        # The wakeup fd carries the news; the handler only has to exist.
        pass

    handlers = {
        signal.SIGCHLD: sigchld_handler,
        # A Ctrl-C meant for the parent's process group must not kill the server.
        signal.SIGINT: signal.SIG_IGN,
    }
    old_handlers = {sig: signal.signal(sig, val) for (sig, val) in handlers.items()}
    signal.set_wakeup_fd(sig_w)
    status_fds = {}

    while True:
        ready = _core.wait([ctl_fd, alive_r, sig_r], None)
        if 1 in ready:
            # The parent is gone: stop serving. Running children carry on.
            sys.exit(0)
        if 2 in ready:
            try:
                while os.read(sig_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap(status_fds)
        if 0 in ready:
            try:
                msg, fds = _core.recvfds(ctl_fd, 16)
            except EOFError:
                sys.exit(0)
            if msg != b'F' or len(fds) < 3:
                for fd in fds:
                    os.close(fd)
                continue
            data_r, status_w, tracker_fd, inherited = fds[0], fds[1], fds[2], fds[3:]
            pid = _core.fork()
            if pid == 0:
                code = 1
                try:
                    signal.set_wakeup_fd(-1)
                    for sig, val in old_handlers.items():
                        signal.signal(sig, val)
                    for fd in (ctl_fd, alive_r, sig_r, sig_w, status_w,
                               *status_fds.values()):
                        os.close(fd)
                    if server_tracker_fd is not None:
                        os.close(server_tracker_fd)
                    _forkserver._inherited_fds = inherited
                    resource_tracker._resource_tracker._fd = tracker_fd
                    code = spawn._main(data_r, os.dup(data_r))
                except Exception:
                    # E.g. the RuntimeError of a main module that starts a process
                    # at import: the parent's stderr must show it.
                    sys.excepthook(*sys.exc_info())
                    sys.stderr.flush()
                finally:
                    util._flush_std_streams()
                    os._exit(code)
            os.close(data_r)
            os.close(tracker_fd)
            for fd in inherited:
                os.close(fd)
            status_fds[pid] = status_w
            os.write(ctl_fd, SIGNED_STRUCT.pack(pid))


def _preload_main(main_path):
    # A main module that fails to import here (it may need something only the real
    # child has) is not an error: each child then imports it itself, as the stdlib's do.
    original = sys.modules['__main__']
    process.current_process()._inheriting = True
    try:
        spawn.import_main_path(main_path)
    except BaseException:
        sys.modules['__main__'] = original
        sys.modules.pop('__mp_main__', None)
        if spawn.old_main_modules and spawn.old_main_modules[-1] is original:
            spawn.old_main_modules.pop()
    finally:
        del process.current_process()._inheriting


def _reap(status_fds):
    while True:
        try:
            pid, sts = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        w = status_fds.pop(pid, None)
        if w is not None:
            try:
                os.write(w, SIGNED_STRUCT.pack(os.waitstatus_to_exitcode(sts)))
            except OSError:
                pass
            os.close(w)


_forkserver = ForkServer()
ensure_running = _forkserver.ensure_running
get_inherited_fds = _forkserver.get_inherited_fds
connect_to_new_process = _forkserver.connect_to_new_process
set_forkserver_preload = _forkserver.set_forkserver_preload

if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=lambda: _forkserver._forget())
