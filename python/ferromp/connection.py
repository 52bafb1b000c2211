"""Connections, Pipe, Listener/Client and wait(): the stdlib's ``multiprocessing.connection``.

A Connection owns one file descriptor (a pipe end or a socket). Framing, reading and
writing happen in the Rust core (``src/connection.rs``) with the GIL released and the
stdlib's wire format, so ferromp and stdlib Connections can share a pipe. Pickling
stays here, in the C pickler.
"""

__all__ = ['Client', 'Listener', 'Pipe', 'wait']

import io
import itertools
import os
import sys
import time

from . import _core
from . import context
from . import reduction
from . import util

_ForkingPickler = reduction.ForkingPickler
_dumps = reduction._dumps_bytes
_loads = reduction.ForkingPickler.loads

BUFSIZE = 8192
# A listener that is never accepted from should not make a client hang forever.
CONNECTION_TIMEOUT = 20.

_mmap_counter = itertools.count()

default_family = 'AF_UNIX'
families = ['AF_INET', 'AF_UNIX']
if sys.platform == 'win32':
    default_family = 'AF_PIPE'
    families += ['AF_PIPE']


def _init_timeout(timeout=CONNECTION_TIMEOUT):
    return time.monotonic() + timeout


def _check_timeout(t):
    return time.monotonic() > t


def arbitrary_address(family):
    """A fresh address of the given family for a Listener."""
    import tempfile  # here, not at the top: a spawned child seldom needs it (~6 ms)
    if family == 'AF_INET':
        return ('localhost', 0)
    if family == 'AF_UNIX':
        return tempfile.mktemp(prefix='listener-', dir=util.get_temp_dir())
    if family == 'AF_PIPE':
        return tempfile.mktemp(prefix=r'\\.\pipe\pyc-%d-%d-' %
                               (os.getpid(), next(_mmap_counter)), dir="")
    raise ValueError('unrecognized family')


def _validate_family(family):
    if sys.platform != 'win32' and family == 'AF_PIPE':
        raise ValueError('Family %s is not recognized.' % family)
    if sys.platform == 'win32' and family == 'AF_UNIX':
        import socket
        if not hasattr(socket, family):
            raise ValueError('Family %s is not recognized.' % family)


def address_type(address):
    """The family ('AF_INET', 'AF_UNIX' or 'AF_PIPE') an address belongs to."""
    if type(address) is tuple:
        return 'AF_INET'
    if type(address) is str and address.startswith('\\\\'):
        return 'AF_PIPE'
    if type(address) is str or util.is_abstract_socket_namespace(address):
        return 'AF_UNIX'
    raise ValueError('address type of %r unrecognized' % address)


class _ConnectionBase:
    """A message-oriented endpoint over one file descriptor."""

    _handle = None
    # How send pickles: as the stdlib does, but a Pipe of a spawn or forkserver
    # context made by an interactive __main__ sends what __main__ defines by value
    # (BaseContext.Pipe sets reduction._dumps_bytes_main).
    _dumps = staticmethod(_dumps)

    def __init__(self, handle, readable=True, writable=True):
        handle = handle.__index__()
        if handle < 0:
            raise ValueError("invalid handle")
        if not readable and not writable:
            raise ValueError(
                "at least one of `readable` and `writable` must be True")
        self._handle = handle
        self._readable = readable
        self._writable = writable

    def __del__(self):
        if self._handle is not None:
            self._close()

    def _check_closed(self):
        if self._handle is None:
            raise OSError("handle is closed")

    def _check_readable(self):
        if not self._readable:
            raise OSError("connection is write-only")

    def _check_writable(self):
        if not self._writable:
            raise OSError("connection is read-only")

    def _bad_message_length(self):
        # The unread body makes the stream unusable for reading; a duplex connection
        # may still send.
        if self._writable:
            self._readable = False
        else:
            self.close()
        raise OSError("bad message length")

    @property
    def closed(self):
        """True if the connection is closed."""
        return self._handle is None

    @property
    def readable(self):
        """True if the connection is readable."""
        return self._readable

    @property
    def writable(self):
        """True if the connection is writable."""
        return self._writable

    def fileno(self):
        """The file descriptor of the connection."""
        self._check_closed()
        return self._handle

    def close(self):
        """Close the connection."""
        if self._handle is not None:
            try:
                self._close()
            finally:
                self._handle = None

    def _close(self, _close=os.close):
        # os.close bound now: at interpreter exit __del__ may run after the module's
        # globals are gone.
        _close(self._handle)

    def send_bytes(self, buf, offset=0, size=None):
        """Send the bytes of a bytes-like object as one message."""
        self._check_closed()
        self._check_writable()
        if type(buf) is bytes and offset == 0 and size is None:
            _core.send_bytes(self._handle, buf)
            return
        m = memoryview(buf)
        if m.itemsize > 1:
            m = m.cast('B')
        n = m.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        _core.send_bytes(self._handle, m[offset:offset + size].tobytes())

    def send(self, obj):
        """Send a picklable object."""
        self._check_closed()
        self._check_writable()
        _core.send_bytes(self._handle, self._dumps(obj))

    def recv_bytes(self, maxlength=None):
        """Receive one message as bytes."""
        self._check_closed()
        self._check_readable()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        buf = _core.recv_bytes(self._handle, maxlength)
        if buf is None:
            self._bad_message_length()
        return buf

    def recv_bytes_into(self, buf, offset=0):
        """Receive one message into a writable buffer; returns its length in bytes.

        Raises BufferTooShort (carrying the whole message) when it does not fit."""
        self._check_closed()
        self._check_readable()
        with memoryview(buf) as m:
            itemsize = m.itemsize
            bytesize = itemsize * len(m)
            if offset < 0:
                raise ValueError("negative offset")
            elif offset > bytesize:
                raise ValueError("offset too large")
            data = _core.recv_bytes(self._handle, None)
            size = len(data)
            if bytesize < offset + size:
                raise context.BufferTooShort(data)
            with m.cast('B') as flat:
                flat[offset:offset + size] = data
        return size

    def recv(self):
        """Receive a picklable object."""
        self._check_closed()
        self._check_readable()
        return _loads(_core.recv_bytes(self._handle, None))

    def poll(self, timeout=0.0):
        """Whether there is data to read, waiting up to ``timeout`` seconds
        (None waits forever)."""
        self._check_closed()
        self._check_readable()
        return _core.poll(self._handle, timeout)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        self.close()


class Connection(_ConnectionBase):
    """A Connection over a pipe end or a socket (the same on both: reads and writes
    go through the core, which does not care which it is)."""


def Pipe(duplex=True):
    """A pair of Connections: duplex over a socketpair, else (reader, writer) over a pipe."""
    if duplex:
        fd1, fd2 = _core.socketpair()
        return Connection(fd1), Connection(fd2)
    fd1, fd2 = os.pipe()
    return Connection(fd1, writable=False), Connection(fd2, readable=False)


#
# Listener and Client
#

class Listener(object):
    """A socket listening for Client connections, optionally authenticated."""

    def __init__(self, address=None, family=None, backlog=1, authkey=None):
        family = family or (address and address_type(address)) or default_family
        address = address or arbitrary_address(family)
        _validate_family(family)
        if family == 'AF_PIPE':
            raise ValueError('Family AF_PIPE is not recognized.')
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError('authkey should be a byte string')
        self._listener = SocketListener(address, family, backlog)
        self._authkey = authkey

    def accept(self):
        """Accept a connection; raises AuthenticationError if the peer's key is wrong."""
        if self._listener is None:
            raise OSError('listener is closed')
        c = self._listener.accept()
        if self._authkey:
            deliver_challenge(c, self._authkey)
            answer_challenge(c, self._authkey)
        return c

    def close(self):
        """Stop listening (and remove a unix socket file)."""
        listener = self._listener
        if listener is not None:
            self._listener = None
            listener.close()

    @property
    def address(self):
        return self._listener._address

    @property
    def last_accepted(self):
        return self._listener._last_accepted

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        self.close()


def Client(address, family=None, authkey=None):
    """Connect to a Listener at ``address``."""
    family = family or address_type(address)
    _validate_family(family)
    c = SocketClient(address)
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError('authkey should be a byte string')
    if authkey is not None:
        answer_challenge(c, authkey)
        deliver_challenge(c, authkey)
    return c


class SocketListener(object):
    """A bound, listening socket that returns Connections from accept()."""

    def __init__(self, address, family, backlog=1):
        import socket
        self._socket = socket.socket(getattr(socket, family))
        try:
            if os.name == 'posix':
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.setblocking(True)
            self._socket.bind(address)
            self._socket.listen(backlog)
            self._address = self._socket.getsockname()
        except OSError:
            self._socket.close()
            raise
        self._family = family
        self._last_accepted = None
        if family == 'AF_UNIX' and not util.is_abstract_socket_namespace(address):
            self._unlink = util.Finalize(self, os.unlink, args=(address,),
                                         exitpriority=0)
        else:
            self._unlink = None

    def accept(self):
        while True:
            try:
                s, self._last_accepted = self._socket.accept()
                break
            except InterruptedError:
                pass
        s.setblocking(True)
        return Connection(s.detach())

    def close(self):
        try:
            self._socket.close()
        finally:
            unlink = self._unlink
            if unlink is not None:
                self._unlink = None
                unlink()


def SocketClient(address):
    """A Connection to the listening socket at ``address``."""
    import socket
    family = address_type(address)
    with socket.socket(getattr(socket, family)) as s:
        s.setblocking(True)
        s.connect(address)
        return Connection(s.detach())


#
# Authentication: the stdlib 3.11 challenge (HMAC-MD5 over 20 random bytes), so a
# ferromp Client can talk to a stdlib Listener and back.
#

MESSAGE_LENGTH = 20
CHALLENGE = b'#CHALLENGE#'
WELCOME = b'#WELCOME#'
FAILURE = b'#FAILURE#'


def deliver_challenge(connection, authkey):
    """Challenge the peer to prove it knows ``authkey``."""
    if not isinstance(authkey, bytes):
        raise ValueError(
            "Authkey must be bytes, not {0!s}".format(type(authkey)))
    import hmac     # here: its import (hashlib) costs every process start 2 ms
    message = os.urandom(MESSAGE_LENGTH)
    connection.send_bytes(CHALLENGE + message)
    digest = hmac.new(authkey, message, 'md5').digest()
    response = connection.recv_bytes(256)
    if hmac.compare_digest(response, digest):
        connection.send_bytes(WELCOME)
    else:
        connection.send_bytes(FAILURE)
        raise context.AuthenticationError('digest received was wrong')


def answer_challenge(connection, authkey):
    """Prove to the peer that we know ``authkey``."""
    if not isinstance(authkey, bytes):
        raise ValueError(
            "Authkey must be bytes, not {0!s}".format(type(authkey)))
    message = connection.recv_bytes(256)
    if message[:len(CHALLENGE)] != CHALLENGE:
        raise context.AuthenticationError('message = %r' % message)
    message = message[len(CHALLENGE):]
    import hmac
    digest = hmac.new(authkey, message, 'md5').digest()
    connection.send_bytes(digest)
    response = connection.recv_bytes(256)
    if response != WELCOME:
        raise context.AuthenticationError('digest sent was rejected')


#
# XML-RPC serialised connections (the managers' 'xmlrpclib' serializer)
#

class ConnectionWrapper(object):
    """Wraps a Connection with a dumps/loads pair of another serializer."""

    def __init__(self, conn, dumps, loads):
        self._conn = conn
        self._dumps = dumps
        self._loads = loads
        for attr in ('fileno', 'close', 'poll', 'recv_bytes', 'send_bytes'):
            setattr(self, attr, getattr(conn, attr))

    def send(self, obj):
        self._conn.send_bytes(self._dumps(obj))

    def recv(self):
        return self._loads(self._conn.recv_bytes())


def _xml_dumps(obj):
    import xmlrpc.client as xmlrpclib
    return xmlrpclib.dumps((obj,), None, None, None, 1).encode('utf-8')


def _xml_loads(s):
    import xmlrpc.client as xmlrpclib
    (obj,), method = xmlrpclib.loads(s.decode('utf-8'))
    return obj


class XmlListener(Listener):
    def accept(self):
        obj = Listener.accept(self)
        return ConnectionWrapper(obj, _xml_dumps, _xml_loads)


def XmlClient(*args, **kwds):
    return ConnectionWrapper(Client(*args, **kwds), _xml_dumps, _xml_loads)


#
# wait()
#

def _fileno_of(obj):
    return obj if isinstance(obj, int) else obj.fileno()


def wait(object_list, timeout=None):
    """Wait until some of ``object_list`` are ready; return those that are.

    Objects are Connections, sockets, process sentinels or raw file descriptors; a
    Connection is ready when it has data or its peer closed."""
    objs = list(object_list)
    if not objs:
        if timeout is None:
            raise ValueError('wait() with an empty list and no timeout would never end')
        time.sleep(max(timeout, 0))
        return []
    fds = [_fileno_of(o) for o in objs]
    if timeout is not None and timeout < 0:
        timeout = 0
    return [objs[i] for i in _core.wait(fds, timeout)]


#
# Pickling connections
#

def reduce_connection(conn):
    df = reduction.DupFd(conn.fileno())
    return rebuild_connection, (df, conn.readable, conn.writable)


def rebuild_connection(df, readable, writable):
    fd = df.detach()
    return Connection(fd, readable, writable)


reduction.register(Connection, reduce_connection)

# Unused by ferromp itself; kept because code written against the stdlib reads it.
_BytesIO = io.BytesIO
