"""Pickling for inter-process transfer: the stdlib's ``multiprocessing.reduction`` API.

``ForkingPickler`` is the C pickler plus a table of extra reducers (connections,
sockets, bound methods, partials). Objects backed by a file descriptor reduce to a
``DupFd``: while a child is being started the fd travels with the child (the
spawning Popen decides how), otherwise ``resource_sharer`` hands a duplicate to
whichever process unpickles it.
"""

import copyreg
import functools
import io
import os
import pickle
import sys
from abc import ABCMeta

from . import _core
from . import context

__all__ = ['send_handle', 'recv_handle', 'ForkingPickler', 'register', 'dump',
           'DupFd', 'sendfds', 'recvfds']

HAVE_SEND_HANDLE = sys.platform != 'win32'

_PROTOCOL = pickle.HIGHEST_PROTOCOL


_register_version = 0


class ForkingPickler(pickle.Pickler):
    """Pickler that knows how to reduce multiprocessing objects."""

    _extra_reducers = {}
    _copyreg_dispatch_table = copyreg.dispatch_table

    def __init__(self, *args):
        super().__init__(*args)
        # Sockets get their reducer once something has imported socket: importing it
        # here would cost every spawn child a few ms at start.
        if _socket_unregistered and 'socket' in sys.modules:
            _register_socket()
        table = self._copyreg_dispatch_table.copy()
        # Stdlib objects built on a ferromp context (the stdlib ProcessPoolExecutor's
        # queues hold stdlib Connections) must pickle as the stdlib would pickle them.
        std = sys.modules.get('multiprocessing.reduction')
        if std is not None:
            table.update(std.ForkingPickler._extra_reducers)
        table.update(self._extra_reducers)
        self.dispatch_table = table

    @classmethod
    def register(cls, type, reduce):
        """Use ``reduce`` to pickle objects of ``type``."""
        global _register_version
        cls._extra_reducers[type] = reduce
        _register_version += 1

    @classmethod
    def dumps(cls, obj, protocol=None):
        buf = io.BytesIO()
        cls(buf, protocol).dump(obj)
        return buf.getbuffer()

    loads = pickle.loads


register = ForkingPickler.register


def dump(obj, file, protocol=None):
    """Pickle ``obj`` to ``file`` with ForkingPickler."""
    ForkingPickler(file, protocol).dump(obj)


# The hot path of Connection.send / Queue.put pickles to a bytes object for the core.
# Building a ForkingPickler copies and merges its dispatch table on every call (about
# 1 us); the hot path instead keeps the merged table, rebuilt only when one of its
# sources changed size or ForkingPickler.register ran, in a C-level Pickler subclass.
# The pickle bytes are exactly ForkingPickler's.

class _FastPickler(pickle.Pickler):
    dispatch_table = {}


_table_key = None
# Plain objects (``_core.is_plain``, defined in src/py/ring.rs): exact ints, floats,
# bools, None, and str or bytes of at most ``_core.PLAIN_MAX`` characters or bytes. The C
# pickler writes these itself, never consulting a dispatch table, so the plain
# pickle.dumps gives the same bytes, and the rings carry them natively. Not long
# strings: pickle.dumps grows its buffer by reallocation, while a pickler over a file
# writes a large payload straight through (16x faster for 1 MiB), and a ring moves a
# large payload out of band.
is_plain = _core.is_plain
_plain_dumps = pickle.dumps


_modules = sys.modules
_copyreg_table = copyreg.dispatch_table


def _refresh_table():
    # The key sums the sizes of the table's three sources, each shifted into its own
    # bits (no tuple to build on the hot path).
    global _table_key
    if _socket_unregistered and 'socket' in _modules:
        _register_socket()
    std = _modules.get('multiprocessing.reduction')
    key = len(_copyreg_table) + (_register_version << 20)
    if std is not None:
        key += len(std.ForkingPickler._extra_reducers) << 40
    if key != _table_key:
        table = dict(_copyreg_table)
        if std is not None:
            table.update(std.ForkingPickler._extra_reducers)
        table.update(ForkingPickler._extra_reducers)
        _FastPickler.dispatch_table = table
        _table_key = key


def _dumps_bytes(obj):
    if is_plain(obj):
        return _plain_dumps(obj, _PROTOCOL)
    _refresh_table()
    buf = io.BytesIO()
    _FastPickler(buf, _PROTOCOL).dump(obj)
    return buf.getvalue()


#
# File descriptors across processes
#

def sendfds(sock, fds):
    """Send the descriptors ``fds`` over the unix socket ``sock``."""
    fds = list(fds)
    _core.sendfds(sock.fileno(), bytes([len(fds) % 256]), fds)


def recvfds(sock, size):
    """Receive ``size`` descriptors from the unix socket ``sock``."""
    data, fds = _core.recvfds(sock.fileno(), 1)
    if not data and not fds:
        raise EOFError
    if len(fds) != size or len(data) != 1 or data[0] != len(fds) % 256:
        for fd in fds:
            os.close(fd)
        raise RuntimeError('Received %d items of ancdata, expected %d'
                           % (len(fds), size))
    return list(fds)


def send_handle(conn, handle, destination_pid):
    """Send the file descriptor ``handle`` over the Connection ``conn``."""
    import socket
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
        sendfds(s, [handle])


def recv_handle(conn):
    """Receive a file descriptor sent with ``send_handle``."""
    import socket
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
        return recvfds(s, 1)[0]


def DupFd(fd):
    """A picklable stand-in for ``fd`` whose ``detach()`` yields a usable duplicate."""
    popen_obj = context.get_spawning_popen()
    if popen_obj is not None:
        return popen_obj.DupFd(popen_obj.duplicate_for_child(fd))
    if HAVE_SEND_HANDLE:
        from . import resource_sharer
        return resource_sharer.DupFd(fd)
    raise ValueError('SCM_RIGHTS appears not to be available')


#
# Reducers for builtin types the plain pickler refuses
#

def _reduce_method(m):
    if m.__self__ is None:
        return getattr, (m.__class__, m.__func__.__name__)
    return getattr, (m.__self__, m.__func__.__name__)


class _C:
    def f(self):
        pass


register(type(_C().f), _reduce_method)


def _reduce_method_descriptor(m):
    return getattr, (m.__objclass__, m.__name__)


register(type(list.append), _reduce_method_descriptor)
register(type(int.__add__), _reduce_method_descriptor)


def _rebuild_partial(func, args, keywords):
    return functools.partial(func, *args, **keywords)


def _reduce_partial(p):
    return _rebuild_partial, (p.func, p.args, p.keywords or {})


register(functools.partial, _reduce_partial)


def _rebuild_socket(df, family, type, proto):
    import socket
    fd = df.detach()
    return socket.socket(family, type, proto, fileno=fd)


def _reduce_socket(s):
    df = DupFd(s.fileno())
    return _rebuild_socket, (df, s.family, s.type, s.proto)


_socket_unregistered = True


def _register_socket():
    global _socket_unregistered
    import socket
    register(socket.socket, _reduce_socket)
    _socket_unregistered = False


class AbstractReducer(metaclass=ABCMeta):  # noqa: B024 (the stdlib shape)
    """Base for alternative reducers installed with ``context.reducer = ...``."""

    ForkingPickler = ForkingPickler
    register = register
    dump = dump
    send_handle = send_handle
    recv_handle = recv_handle
    DupFd = DupFd
    _reduce_method = _reduce_method
    _reduce_method_descriptor = _reduce_method_descriptor
    _rebuild_partial = _rebuild_partial
    _reduce_socket = _reduce_socket
    _rebuild_socket = _rebuild_socket

    def __init__(self, *args):
        register(type(_C().f), _reduce_method)
        register(type(list.append), _reduce_method_descriptor)
        register(type(int.__add__), _reduce_method_descriptor)
        register(functools.partial, _reduce_partial)
        import socket
        register(socket.socket, _reduce_socket)
