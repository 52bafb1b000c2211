"""Start a child by forking: the stdlib's ``multiprocessing.popen_fork``.

The fork itself happens in the Rust core, bracketed by the interpreter's fork hooks
(``PyOS_BeforeFork`` / ``PyOS_AfterFork_*``), so ``os.register_at_fork`` callbacks run
as they do for ``os.fork()``.
"""

import os
import signal

from . import _core
from . import util

__all__ = ['Popen']


class Popen(object):
    """Handle on a forked child: poll / wait / terminate / kill / close."""

    method = 'fork'

    def __init__(self, process_obj):
        util._flush_std_streams()
        self.returncode = None
        self.finalizer = None
        self._launch(process_obj)

    def duplicate_for_child(self, fd):
        # A forked child inherits every fd under its own number.
        return fd

    def poll(self, flag=os.WNOHANG):
        """The exit code if the child has exited (reaping it), else None.
        ``flag=0`` waits for it."""
        if self.returncode is None:
            try:
                code = _core.waitpid(self.pid, flag != os.WNOHANG)
            except OSError:
                # ECHILD: somebody else reaped it (or it is not ours to reap).
                return None
            if code is not None:
                self.returncode = code
        return self.returncode

    def wait(self, timeout=None):
        """Wait up to ``timeout`` seconds (None: forever); the exit code or None."""
        if self.returncode is None:
            if timeout is not None:
                if not _core.wait([self.sentinel], timeout):
                    return None
                # The sentinel fired: the child is gone or about to be reaped.
                return self.poll(0 if timeout != 0.0 else os.WNOHANG)
            return self.poll(0)
        return self.returncode

    def _send_signal(self, sig):
        if self.returncode is None:
            try:
                _core.kill(self.pid, sig)
            except ProcessLookupError:
                pass
            except OSError:
                if self.wait(timeout=0.1) is None:
                    raise

    def terminate(self):
        self._send_signal(signal.SIGTERM)

    def kill(self):
        self._send_signal(signal.SIGKILL)

    def _launch(self, process_obj):
        code = 1
        # parent_r turns readable when the child exits (it holds child_w);
        # child_r turns readable when the parent goes away (it holds parent_w).
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        self.pid = _core.fork()
        if self.pid == 0:
            try:
                os.close(parent_r)
                os.close(parent_w)
                code = process_obj._bootstrap(parent_sentinel=child_r)
            finally:
                os._exit(code)
        else:
            os.close(child_w)
            os.close(child_r)
            self.finalizer = util.Finalize(self, util.close_fds,
                                           (parent_r, parent_w,))
            self.sentinel = parent_r

    def close(self):
        if self.finalizer is not None:
            self.finalizer()
