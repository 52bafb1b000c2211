"""Start a child from a fresh interpreter: the stdlib's ``multiprocessing.popen_spawn_posix``.

The core fork+execs the interpreter with exactly the fds the child needs; the
preparation data and the pickled Process follow over a pipe.
"""

import os

from . import popen_fork
from . import spawn
from . import util

__all__ = ['Popen']


class _DupFd(object):
    # A spawn child inherits passed fds under the same numbers.
    def __init__(self, fd):
        self.fd = fd

    def detach(self):
        return self.fd


class Popen(popen_fork.Popen):
    method = 'spawn'
    DupFd = _DupFd

    def __init__(self, process_obj):
        self._fds = []
        super().__init__(process_obj)

    def duplicate_for_child(self, fd):
        self._fds.append(fd)
        return fd

    def _launch(self, process_obj):
        tracker_fd = _tracker_fd()
        if tracker_fd is not None:
            self._fds.append(tracker_fd)
        fp = spawn._pickle_for_child(self, process_obj)

        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
            self._fds.extend([child_r, child_w])
            self.pid = util.spawnv_passfds(spawn.get_executable(), cmd, self._fds)
            self.sentinel = parent_r
            _write_all(parent_w, fp.getbuffer())
        finally:
            # parent_w stays open for the parent's life: the child's parent sentinel.
            self.finalizer = util.Finalize(
                self, util.close_fds, [fd for fd in (parent_r, parent_w) if fd is not None])
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)


def _tracker_fd():
    try:
        from . import resource_tracker
        getfd = resource_tracker.getfd
    except (ImportError, AttributeError):
        return None
    return getfd()


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
