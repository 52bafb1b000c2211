"""Start a child through the fork server: the stdlib's ``multiprocessing.popen_forkserver``."""

import os
from struct import error as struct_error

from . import _core
from . import forkserver
from . import popen_fork
from . import spawn
from . import util

__all__ = ['Popen']


class _DupFd(object):
    # In the child, the i-th fd the parent passed is the i-th inherited fd.
    def __init__(self, ind):
        self.ind = ind

    def detach(self):
        return forkserver.get_inherited_fds()[self.ind]


class Popen(popen_fork.Popen):
    method = 'forkserver'
    DupFd = _DupFd

    def __init__(self, process_obj):
        self._fds = []
        super().__init__(process_obj)

    def duplicate_for_child(self, fd):
        self._fds.append(fd)
        return len(self._fds) - 1

    def _launch(self, process_obj):
        buf = spawn._pickle_for_child(self, process_obj)
        self.pid, self.sentinel, data_w = forkserver.connect_to_new_process(self._fds)
        # data_w stays open for the parent's life: the child's parent sentinel.
        self.finalizer = util.Finalize(self, util.close_fds, (self.sentinel, data_w))
        view = buf.getbuffer()
        try:
            while view:
                view = view[os.write(data_w, view):]
        except BrokenPipeError:
            # The child died before reading; its exit code will say so.
            pass

    def poll(self, flag=os.WNOHANG):
        if self.returncode is None:
            timeout = 0 if flag == os.WNOHANG else None
            if not _core.wait([self.sentinel], timeout):
                return None
            try:
                data = os.read(self.sentinel, forkserver.SIGNED_STRUCT.size)
                self.returncode = forkserver.SIGNED_STRUCT.unpack(data)[0]
            except (OSError, struct_error):
                # The server died before it could report: the stdlib's 255.
                self.returncode = 255
        return self.returncode

