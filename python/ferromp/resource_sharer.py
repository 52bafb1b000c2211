"""Handing file descriptors to processes that were not started by us.

When a Connection (or socket) is pickled outside of a child's start, for example to
send it through a Pipe to an existing process, its fd cannot travel with the pickle.
Instead the sender registers a duplicate here; a background thread listens on a unix
socket, and the receiver's ``DupFd.detach()`` connects to it and gets the fd with
SCM_RIGHTS. This is the stdlib's ``multiprocessing.resource_sharer`` design.
"""

import os
import signal
import sys
import threading

from . import process
from . import reduction
from . import util

__all__ = ['stop', 'DupFd']


class DupFd(object):
    """A picklable handle for a duplicate of ``fd`` served by this process."""

    def __init__(self, fd):
        new_fd = os.dup(fd)

        def send(conn, pid):
            reduction.send_handle(conn, new_fd, pid)

        def close():
            os.close(new_fd)

        self._id = _resource_sharer.register(send, close)

    def detach(self):
        """Fetch the fd from the process that pickled it."""
        with _resource_sharer.get_connection(self._id) as conn:
            return reduction.recv_handle(conn)


class _ResourceSharer(object):
    """The per-process server thread that hands registered fds out once each."""

    def __init__(self):
        self._key = 0
        self._cache = {}
        self._lock = threading.Lock()
        self._listener = None
        self._address = None
        self._thread = None
        util.register_after_fork(self, _ResourceSharer._afterfork)

    def register(self, send, close):
        """Register a (send, close) pair; returns the identifier to pickle."""
        with self._lock:
            if self._address is None:
                self._start()
            self._key += 1
            self._cache[self._key] = (send, close)
            return (self._address, self._key)

    @staticmethod
    def get_connection(ident):
        """A connection to the process that registered ``ident``, key already sent."""
        from .connection import Client
        address, key = ident
        c = Client(address, authkey=process.current_process().authkey)
        c.send((key, os.getpid()))
        return c

    def stop(self, timeout=None):
        """Stop the server thread and drop every registered fd."""
        from .connection import Client
        with self._lock:
            if self._address is not None:
                c = Client(self._address, authkey=process.current_process().authkey)
                c.send(None)
                c.close()
                self._thread.join(timeout)
                if self._thread.is_alive():
                    util.sub_warning('_ResourceSharer thread did not stop when asked')
                self._listener.close()
                self._thread = None
                self._address = None
                self._listener = None
                for _send, close in self._cache.values():
                    close()
                self._cache.clear()

    def _afterfork(self):
        # The server thread does not exist in a forked child; nor should its fds.
        for _send, close in self._cache.values():
            close()
        self._cache.clear()
        self._lock._at_fork_reinit()
        if self._listener is not None:
            self._listener.close()
        self._listener = None
        self._address = None
        self._thread = None

    def _start(self):
        from .connection import Listener
        assert self._listener is None, "Already have Listener"
        util.debug('starting listener and thread for sending handles')
        self._listener = Listener(authkey=process.current_process().authkey, backlog=128)
        self._address = self._listener.address
        t = threading.Thread(target=self._serve)
        t.daemon = True
        t.start()
        self._thread = t

    def _serve(self):
        if hasattr(signal, 'pthread_sigmask'):
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            try:
                with self._listener.accept() as conn:
                    msg = conn.recv()
                    if msg is None:
                        break
                    key, destination_pid = msg
                    send, close = self._cache.pop(key)
                    try:
                        send(conn, destination_pid)
                    finally:
                        close()
            except Exception:
                if not util.is_exiting():
                    sys.excepthook(*sys.exc_info())


_resource_sharer = _ResourceSharer()
stop = _resource_sharer.stop
