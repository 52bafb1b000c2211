"""Pickling for inter-process transfer: the stdlib's ``multiprocessing.reduction`` API.

``ForkingPickler`` is the C pickler plus a table of extra reducers (connections,
sockets, bound methods, partials). Objects backed by a file descriptor reduce to a
``DupFd``: while a child is being started the fd travels with the child (the
spawning Popen decides how), otherwise ``resource_sharer`` hands a duplicate to
whichever process unpickles it.

What the standard pickler can only pickle by reference and cannot (a lambda, a
closure, a class defined in a function) or a child cannot resolve (what an
interactive ``__main__`` defines, in a spawn or forkserver child) goes by value,
with cloudpickle when it is installed: see "By value" below.
"""

import copyreg
import functools
import io
import os
import pickle
import sys
import types
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
    try:
        _FastPickler(buf, _PROTOCOL).dump(obj)
    except _FALLBACK_ERRORS as e:
        return _dumps_by_value(obj, e)
    return buf.getvalue()


#
# By value: lambdas, closures and interactive code, with cloudpickle
#
# The standard pickler pickles a function or a class by reference (module and
# qualified name) and refuses one it cannot find that way: a lambda, a nested function
# or closure, a class defined in a function. And what an interactive __main__ (the
# REPL, python -c, stdin, a notebook) defines pickles, but a spawn or forkserver child
# cannot import it. cloudpickle pickles such objects by value (code, closure, the
# globals they use).
#
# The pickles of every message keep coming from the C pickler without a
# reducer_override: one would be called for every object that is not a builtin
# container or scalar. Instead the callers catch the standard pickler's failure and
# call _dumps_by_value, which pickles once more with a cloudpickle Pickler that keeps
# ferromp's dispatch table (Connections, locks and queues reduce as they always do) and
# sends by value only the functions and classes that the standard pickler cannot send
# by reference. Where the receiver is known to be a spawn or forkserver child of an
# interactive __main__ (a Process being started, the tasks of such a Pool, queues and
# pipes of such a context), _dumps_main_by_value sends __main__'s own functions and
# classes by value too.

_FALLBACK_ERRORS = (pickle.PicklingError, AttributeError, TypeError)
_HINT = ("ferromp pickles lambdas, closures and interactive code by value once "
         "cloudpickle is installed: pip install 'ferromp[cloudpickle]'")


def _env_fallback():
    return os.environ.get('FERROMP_CLOUDPICKLE', '1').strip().lower() not in (
        '0', 'false', 'no', 'off')


_fallback = _env_fallback()


def set_pickle_fallback(enabled):
    """Turn the by-value fallback (cloudpickle) on or off in this process and in the
    processes it starts from now on. Off, pickling is exactly the stdlib's. The
    environment variable ``FERROMP_CLOUDPICKLE=0`` turns it off from the start."""
    global _fallback
    _fallback = bool(enabled)


def get_pickle_fallback():
    """Whether functions and classes that the standard pickler cannot send by
    reference go by value (with cloudpickle, when it is installed)."""
    return _fallback


_cloudpickle = None          # the module once imported; False if it is not installed
_ByValuePickler = None


def _by_value_pickler():
    """The by-value Pickler class, or None without cloudpickle."""
    global _cloudpickle, _ByValuePickler
    if _ByValuePickler is not None or _cloudpickle is False:
        return _ByValuePickler
    try:
        import cloudpickle
    except ImportError:
        _cloudpickle = False
        return None
    from collections import ChainMap
    _cloudpickle = cloudpickle
    base = cloudpickle.Pickler

    class ByValuePickler(base):
        """cloudpickle's Pickler, sending by value only what the standard pickler
        cannot send by reference (and, if ``main_by_value``, what __main__
        defines), with ferromp's reducers ahead of cloudpickle's."""

        def __init__(self, file, main_by_value):
            _refresh_table()
            # Before the C Pickler's __init__, which reads it: cloudpickle's class
            # attribute hides the C-level slot from a later assignment.
            self.dispatch_table = ChainMap(_FastPickler.dispatch_table, base.dispatch_table)
            super().__init__(file, _PROTOCOL)
            self.main_by_value = main_by_value
            self.by_value = False       # whether anything went by value

        def reducer_override(self, obj):
            if not isinstance(obj, (types.FunctionType, type)) or _by_reference(
                    obj, self.main_by_value):
                return NotImplemented
            reduced = super().reducer_override(obj)
            if reduced is not NotImplemented:
                self.by_value = True
            return reduced

    _ByValuePickler = ByValuePickler
    return ByValuePickler


# Classes the C pickler saves itself, never by name.
_SAVED_BY_PICKLE = (type(None), type(NotImplemented), type(Ellipsis))


def _by_reference(obj, main_by_value=False):
    """Whether the function or class ``obj`` pickles by reference: the standard
    pickler finds it as ``module.qualname``, and (``main_by_value``) that module is not
    ``__main__``."""
    for t in _SAVED_BY_PICKLE:
        if obj is t:
            return True
    name = getattr(obj, '__qualname__', None)
    if type(name) is not str:
        return False
    try:
        module_name = pickle.whichmodule(obj, name)
    except Exception:
        return False
    if main_by_value and module_name == '__main__':
        return False
    found = sys.modules.get(module_name)
    for part in name.split('.'):
        if found is None or part == '<locals>':
            return False
        try:
            found = getattr(found, part)
        except Exception:
            return False
    return found is obj


class _ByValueNeeded(Exception):
    pass


class _Probe(pickle.Pickler):
    """Finds whether a message holds a function or class that only goes by value."""

    def reducer_override(self, obj):
        if isinstance(obj, (types.FunctionType, type)) and not _by_reference(obj):
            raise _ByValueNeeded
        return NotImplemented


class _Discard(object):
    __slots__ = ()

    def write(self, b):
        pass


def _needs_by_value(obj):
    _refresh_table()
    probe = _Probe(_Discard(), _PROTOCOL)
    probe.dispatch_table = _FastPickler.dispatch_table
    try:
        probe.dump(obj)
    except _ByValueNeeded:
        return True
    except Exception:
        pass
    return False


def _add_hint(exc):
    if hasattr(exc, 'add_note'):                          # 3.11+
        if _HINT not in getattr(exc, '__notes__', ()):
            exc.add_note(_HINT)
    elif exc.args and type(exc.args[0]) is str and _HINT not in exc.args[0]:
        exc.args = (exc.args[0] + '\n' + _HINT,) + exc.args[1:]


def _dumps_by_value(obj, exc):
    """``obj``'s pickle after the standard pickler refused it with ``exc`` (one of
    ``_FALLBACK_ERRORS``), its functions and classes that have no importable name
    going by value; called by every pickling entry point on that failure. Raises
    ``exc`` again, as the stdlib raised it, when the fallback is off or ``obj`` holds
    no such function or class (nothing by value would help); also when cloudpickle is
    not installed, with a note saying how to get it. When the by-value pickle fails
    too, its error is raised (the stdlib's as its context)."""
    if not _fallback:
        raise exc
    pickler = _by_value_pickler()
    if pickler is None:
        if _needs_by_value(obj):
            _add_hint(exc)
        raise exc
    buf = io.BytesIO()
    p = pickler(buf, False)
    failed = None
    try:
        p.dump(obj)
    except Exception as e:
        failed = e
    if not p.by_value:
        raise exc
    if failed is not None:
        raise failed
    return buf.getvalue()


def _dumps_main_by_value(obj):
    """``obj``'s pickle for a spawn or forkserver child of an interactive ``__main__``,
    which cannot import it: what ``__main__`` defines (and what has no importable name)
    by value. None when the fallback is off or cloudpickle is not installed."""
    if not _fallback:
        return None
    pickler = _by_value_pickler()
    if pickler is None:
        return None
    buf = io.BytesIO()
    pickler(buf, True).dump(obj)
    return buf.getvalue()


def _mentions_main(inband):
    # A pickle that refers to anything of __main__ holds the module's name (the first
    # reference writes it, later ones point back to it). A str '__main__' in the data
    # matches too: then the object is pickled once more, to the same effect.
    return b'__main__' in inband


def _dumps_bytes_main(obj):
    """``_dumps_bytes`` for a receiver that may be a spawn or forkserver child of an
    interactive ``__main__`` (see ``_main_by_value``)."""
    data = _dumps_bytes(obj)
    if _mentions_main(data):
        return _dumps_main_by_value(obj) or data
    return data


def _main_by_value(start_method):
    """Whether children of ``start_method`` must get what ``__main__`` defines by
    value: spawn and forkserver children of an interactive ``__main__``, which they
    cannot import. Asked where the receiving processes are known, once (a Process at
    start, a Pool, a queue or pipe of a context), never per message."""
    if start_method == 'fork' or start_method is None:
        return False
    from . import spawn
    return spawn._main_interactive()


def _dump_for_child(obj, file, start_method):
    """``dump(obj, file)`` for a child of ``start_method`` being started: by value what
    it cannot import (see ``_dumps_by_value`` and ``_main_by_value``)."""
    # Pickling registers the fds that go with the child (DupFd); a second pickle
    # registers them again, so the first one's registrations are dropped first.
    fds = getattr(context.get_spawning_popen(), '_fds', None)
    mark = len(fds) if fds is not None else 0

    def rewind():
        if fds is not None:
            del fds[mark:]

    buf = io.BytesIO()
    try:
        ForkingPickler(buf).dump(obj)
    except _FALLBACK_ERRORS as e:
        rewind()
        data = _dumps_by_value(obj, e)
    else:
        data = buf.getvalue()
    if (_mentions_main(data) and _main_by_value(start_method) and _fallback
            and _by_value_pickler() is not None):
        rewind()
        data = _dumps_main_by_value(obj)
    file.write(data)


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
