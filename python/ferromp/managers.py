"""ferromp.managers: a server process that owns objects, and proxies that reach them.

The API and the wire protocol are the stdlib's (``multiprocessing/managers.py``): a
request is ``(ident, methodname, args, kwds)``, a reply ``(kind, result)`` with kind
``'#RETURN'``, ``'#ERROR'``, ``'#TRACEBACK'``, ``'#PROXY'`` or ``'#UNSERIALIZABLE'``.
A stdlib client can use a ferromp server and a ferromp client a stdlib server.

Where ferromp differs (see ``docs/architecture.md``, "Managers"):

* **One control connection per process and server.** The stdlib opens a fresh,
  authenticated connection (and the server a fresh thread) for every ``create``,
  ``incref`` and ``decref``. A ferromp client opens one *control* connection per server
  and process and sends those calls over it (``ident`` ``None`` names a server method).
  The server tells a ferromp client it understands this by answering
  ``accept_connection`` with ``_EXTENDED`` where the stdlib answers ``None``; a ferromp
  client talking to a stdlib server falls back to the stdlib's way.
* **References die with their process.** Each client process has an owner id, sent
  when its control connection opens. The server counts each owner's references, and
  when the control connection closes (the process exited or was killed) it drops the
  references that owner still held, so a killed client does not leak objects forever.
* **A new proxy adopts the creation reference** instead of taking its own and then
  dropping the server's (two round trips fewer per object), when the server is ours.
* **Nothing waits on the dead.** An RLock whose connection closed is released; a
  call interrupted mid-exchange drops its connection (and the server gives back a
  lock it acquired for nobody); a server whose manager's process was killed exits
  once no client is left; objects kept only for the server's own proxies are let go.
* **Start is cheap.** ``start()`` binds the listening socket and hands it to the
  server process, so it need not wait for the server (unless there is an
  initializer); requests and replies go through one reusable pickler per thread.
"""

import array
import copyreg
import io
import itertools
import os
import pickle
import queue
import signal
import sys
import threading
import time
import types
import weakref

from . import _core
from . import connection
from . import process
from . import reduction
from . import util
from . import context
from .context import get_spawning_popen

__all__ = ['BaseManager', 'SyncManager', 'BaseProxy', 'Token', 'SharedMemoryManager']

# Shared memory is always available on the platforms ferromp supports (Linux); the
# module itself is imported lazily, by the code that uses it.
HAS_SHMEM = os.name == 'posix'

# What a ferromp server answers to 'accept_connection' (a stdlib server answers None):
# the client may then call server methods (ident None) on its connections.
_EXTENDED = 'ferromp-managers-1'


#
# Pickling of requests and replies
#
# A request or reply is pickled with ForkingPickler's reducers. Building a
# ForkingPickler per message (as Connection.send does) copies and merges its dispatch
# table and sets up a BytesIO: 1.7 us, where pickling a small request takes 0.3 us.
# So each thread keeps one plain C Pickler with the merged table, writing into a list,
# and reuses it with a cleared memo. The table is rebuilt when a reducer has been
# registered since: one of the source tables changed size, or (where reduction
# counts them) ForkingPickler.register ran again.

_COUNTS_REGISTRATIONS = hasattr(reduction, '_register_version')


def _table_key(_extra=reduction.ForkingPickler._extra_reducers,
               _copyreg=copyreg.dispatch_table, _modules=sys.modules):
    std = _modules.get('multiprocessing.reduction')
    return (len(_extra), len(_copyreg),
            -1 if std is None else len(std.ForkingPickler._extra_reducers),
            reduction._register_version if _COUNTS_REGISTRATIONS else 0)


class _Pickling(object):
    """One thread's reusable pickler."""

    __slots__ = ('parts', 'write', 'pickler', 'key', 'busy')

    def __init__(self):
        self.parts = []
        self.write = self.parts.append      # the pickler's "file"
        self.pickler = None
        self.key = None
        self.busy = False

    def dumps(self, obj):
        if self.busy:
            # Re-entered (a __reduce__ that calls a proxy): do it the slow way.
            return reduction._dumps_bytes(obj)
        key = _table_key()
        if key != self.key:
            pickler = pickle.Pickler(self, reduction._PROTOCOL)
            pickler.dispatch_table = reduction.ForkingPickler(io.BytesIO()).dispatch_table
            self.pickler = pickler
            self.key = key
        else:
            pickler = self.pickler
        parts = self.parts
        self.busy = True
        try:
            pickler.dump(obj)
            # Small pickles arrive in one write; a large buffer is written apart.
            return parts[0] if len(parts) == 1 else b''.join(parts)
        except reduction._FALLBACK_ERRORS as e:
            self.key = None
            # A lambda, a closure...: by value (or the stdlib's error).
            return reduction._dumps_by_value(obj, e)
        except BaseException:
            self.key = None         # start from a fresh pickler next time
            raise
        finally:
            # The memo holds the pickled objects: clear it now, not at the next
            # message, or a task's arguments would live on (cpython#73047).
            pickler.clear_memo()
            parts.clear()
            self.busy = False


_picklers = threading.local()


def _dumps(obj):
    try:
        pickling = _picklers.pickling
    except AttributeError:
        pickling = _picklers.pickling = _Pickling()
    return pickling.dumps(obj)


_loads = pickle.loads


def _format_exc():
    from traceback import format_exc
    return format_exc()


#
# Pickling of the types a managed dict or array hands back
#

def reduce_array(a):
    return array.array, (a.typecode, a.tobytes())


reduction.register(array.array, reduce_array)


def rebuild_as_list(obj):
    return list, (list(obj),)


view_types = [type(getattr({}, name)()) for name in ('items', 'keys', 'values')]
for _view_type in view_types:
    reduction.register(_view_type, rebuild_as_list)
del _view_type


#
# Tokens, errors, one-shot calls
#

class Token(object):
    """Identifies a shared object: its type id, the server's address, and its id."""

    __slots__ = ('typeid', 'address', 'id')

    def __init__(self, typeid, address, id):
        (self.typeid, self.address, self.id) = (typeid, address, id)

    def __getstate__(self):
        return (self.typeid, self.address, self.id)

    def __setstate__(self, state):
        (self.typeid, self.address, self.id) = state

    def __repr__(self):
        return '%s(typeid=%r, address=%r, id=%r)' % \
               (self.__class__.__name__, self.typeid, self.address, self.id)


class RemoteError(Exception):
    """A failure in the manager's server process, carrying the server's traceback."""

    def __str__(self):
        return ('\n' + '-' * 75 + '\n' + str(self.args[0]) + '-' * 75)


def dispatch(c, id, methodname, args=(), kwds={}):  # noqa: B006 (the stdlib's signature; never mutated)
    """Send one request over ``c`` and return the result (or raise the error)."""
    c.send((id, methodname, args, kwds))
    kind, result = c.recv()
    if kind == '#RETURN':
        return result
    raise convert_to_error(kind, result)


def convert_to_error(kind, result):
    if kind == '#ERROR':
        return result
    elif kind in ('#TRACEBACK', '#UNSERIALIZABLE'):
        if not isinstance(result, str):
            raise TypeError(
                "Result {0!r} (kind '{1}') type is {2}, not str".format(
                    result, kind, type(result)))
        if kind == '#UNSERIALIZABLE':
            return RemoteError('Unserializable message: %s\n' % result)
        return RemoteError(result)
    return ValueError('Unrecognized message type {!r}'.format(kind))


def all_methods(obj):
    """The names of the callable attributes of ``obj``."""
    return [name for name in dir(obj) if callable(getattr(obj, name))]


def public_methods(obj):
    """The names of the callable attributes of ``obj`` not starting with '_'."""
    return [name for name in all_methods(obj) if name[0] != '_']


#
# Server
#

class Server(object):
    """Owns the shared objects and serves requests; runs in the manager's process.

    One thread accepts connections; each accepted connection gets one thread that
    reads a request, calls the method and sends the reply, in a loop. That thread may
    block in the call (a Lock's ``acquire``, a Queue's ``get``) without holding up any
    other client, which is why the stdlib's one-thread-per-connection shape stays.
    """

    public = ['shutdown', 'create', 'accept_connection', 'get_methods',
              'debug_info', 'number_of_objects', 'dummy', 'incref', 'decref']

    def __init__(self, registry, address, authkey, serializer):
        if not isinstance(authkey, bytes):
            raise TypeError(
                "Authkey {0!r} is type {1!s}, not bytes".format(
                    authkey, type(authkey)))
        self.registry = registry
        self.authkey = process.AuthenticationString(authkey)
        Listener, Client = listener_client[serializer]

        # Authentication happens in the connection's own thread, so that a slow or
        # hostile peer cannot stall the accepting thread.
        self.listener = _take_bound_listener(Listener, address)
        if self.listener is None:
            self.listener = Listener(address=address, backlog=16)
        self.address = self.listener.address
        self._fast = serializer == 'pickle'

        self.id_to_obj = {'0': (None, ())}
        self.id_to_refcount = {}
        self.id_to_local_proxy_obj = {}
        self.mutex = threading.Lock()
        # owner id -> {ident: references that owner holds}, for live owners only.
        self.owner_refs = {}
        # owner -> reply rings of its ring-upgraded connections (see _RingLink)
        self._owner_rings = {}
        # connection -> owner id, for the connections of ferromp clients.
        self.conn_owner = {}
        self._ids = itertools.count(1)
        # ident -> number of live proxies inside the server, and the ids of those
        # that died since last looked at (see _note_local_proxy)
        self._local_proxy_counts = {}
        self._dead_local_proxies = []
        self._aging_local_proxies = []
        # RLock / Condition -> [connection holding it, depth]
        self._lock_holders = {}
        self._stopping = False
        self._open_connections = 0
        # Set by BaseManager._run_server: exit when the manager's process is gone.
        self._exit_with_parent = False

    def serve_forever(self):
        """Serve until shut down, then exit the process (``sys.exit(0)``)."""
        self.stop_event = threading.Event()
        process.current_process()._manager_server = self
        try:
            accepter = threading.Thread(target=self.accepter, daemon=True,
                                        name='ferromp-manager-accepter')
            accepter.start()
            try:
                while not self.stop_event.is_set():
                    self.stop_event.wait(1)
                    self._collect_local_proxies()
                    if self._exit_with_parent and self._orphaned():
                        util.info('manager exiting: parent gone, no clients left')
                        break
            except (KeyboardInterrupt, SystemExit):
                pass
        finally:
            if sys.stdout != sys.__stdout__:
                util.debug('resetting stdout, stderr')
                sys.stdout = sys.__stdout__
                sys.stderr = sys.__stderr__
            sys.exit(0)

    def _orphaned(self):
        # The stdlib's server lives forever when the process that started it is
        # killed (nobody sends 'shutdown'). Ours exits once that process is gone
        # and no client is connected any more (children of the dead parent may
        # still be using it).
        parent = process.parent_process()
        return (parent is not None and not parent.is_alive()
                and self._open_connections == 0)

    def accepter(self):
        while True:
            try:
                c = self.listener.accept()
            except OSError:
                if self.listener._listener is None:
                    return
                # Out of fds, or the like: try again, without spinning.
                time.sleep(0.01)
                continue
            t = threading.Thread(target=self.handle_request, args=(c,), daemon=True)
            t.start()

    def handle_request(self, c):
        """Authenticate a new connection and serve its first request (and, for
        'accept_connection', every later one)."""
        with self.mutex:
            self._open_connections += 1
        try:
            self._handle_request(c)
        except SystemExit:
            pass
        finally:
            c.close()
            with self.mutex:
                self._open_connections -= 1

    def _handle_request(self, c):
        request = None
        try:
            connection.deliver_challenge(c, self.authkey)
            connection.answer_challenge(c, self.authkey)
        except Exception as e:
            # Nothing more is said to a peer that failed authentication.
            util.info('manager connection failed authentication: %r', e)
            return
        try:
            request = c.recv()
            ignore, funcname, args, kwds = request
            assert funcname in self.public, '%r unrecognized' % funcname
            func = getattr(self, funcname)
        except Exception:
            msg = ('#TRACEBACK', _format_exc())
        else:
            if funcname == 'accept_connection':
                try:
                    self._accept_connection(c, *args, **kwds)
                except Exception:
                    msg = ('#TRACEBACK', _format_exc())
                else:
                    return
            else:
                try:
                    result = func(c, *args, **kwds)
                except Exception:
                    msg = ('#TRACEBACK', _format_exc())
                else:
                    msg = ('#RETURN', result)
        try:
            c.send(msg)
        except Exception as e:
            try:
                c.send(('#TRACEBACK', _format_exc()))
            except Exception:
                pass
            util.info('Failure to send message: %r', msg)
            util.info(' ... request was %r', request)
            util.info(' ... exception was %r', e)
        self._after_reply()

    def _after_reply(self):
        if self._stopping:
            self.stop_event.set()

    def serve_client(self, conn):
        """Handle the requests of one connection until it closes.

        This is the per-request path: one ``recv``, a dictionary lookup, the call,
        one ``send``. Nothing is logged, no thread is started."""
        if self._fast:
            recv_bytes = conn.recv_bytes
            send_bytes = conn.send_bytes

            def recv():
                return _loads(recv_bytes())

            def send(obj):
                send_bytes(_dumps(obj))
        else:
            recv = conn.recv
            send = conn.send
        id_to_obj = self.id_to_obj
        extended = conn in self.conn_owner

        while True:
            try:
                request = recv()
            except (EOFError, OSError):
                util.debug('got EOF -- exiting thread serving %r',
                           threading.current_thread().name)
                self._release_locks_of(conn)
                return
            except Exception:
                # A whole frame arrived but did not unpickle (a class the server
                # cannot import, say): the stream is still in step, so say why.
                if not self._send(send, ('#TRACEBACK', _format_exc()), conn):
                    return
                continue
            methodname = None
            try:
                ident, methodname, args, kwds = request
                try:
                    obj, exposed, gettypeid = id_to_obj[ident]
                except KeyError:
                    if ident is None and extended and methodname == '#use_rings':
                        rings = self._take_rings(conn)
                        if not self._send(send, ('#RETURN', rings is not None), conn):
                            self._release_locks_of(conn)
                            return
                        if rings is not None:
                            recv, send = _ring_endpoints(conn, *rings)
                        continue
                    if ident is None and extended:
                        msg = self._call_public(conn, methodname, args, kwds)
                        self._send(send, msg, conn)
                        if self._stopping:
                            self.stop_event.set()
                        continue
                    try:
                        obj, exposed, gettypeid = self.id_to_local_proxy_obj[ident]
                    except KeyError:
                        raise KeyError(ident) from None
                if methodname not in exposed:
                    msg = self._fallback(conn, ident, obj, methodname, args, kwds, exposed)
                else:
                    try:
                        res = getattr(obj, methodname)(*args, **kwds)
                    except Exception as e:
                        msg = ('#ERROR', e)
                    else:
                        if methodname in _LOCK_METHODS and \
                                type(obj) in _RECOVERABLE_LOCKS:
                            self._track_lock(conn, obj, methodname, res)
                        typeid = gettypeid and gettypeid.get(methodname, None)
                        if typeid:
                            rident, rexposed = self.create(conn, typeid, res)
                            token = Token(typeid, self.address, rident)
                            msg = ('#PROXY', (rexposed, token))
                        else:
                            msg = ('#RETURN', res)
            except Exception:
                msg = ('#TRACEBACK', _format_exc())
            if not self._send(send, msg, conn):
                # The client went away (or gave up: Ctrl-C) before it learnt the
                # result. A lock it acquired meanwhile is one it does not know it
                # holds, so give it back.
                if methodname == 'acquire' and msg[0] == '#RETURN' and msg[1] \
                        and type(obj) in _UNDOABLE_ACQUIRES:
                    obj.release()
                self._release_locks_of(conn)
                return

    def _take_rings(self, conn):
        """The client of ``conn`` sends the fds of two rings (requests, replies) right
        after its '#use_rings' request; map them, or None if that fails."""
        try:
            fds = reduction.recvfds(conn, 6)
        except Exception as e:
            util.info('ring upgrade failed: %r', e)
            return None
        try:
            req = _core.Ring.attach(*fds[:3])
            rep = _core.Ring.attach(*fds[3:])
        except Exception as e:
            util.info('ring upgrade failed: %r', e)
            return None
        owner = self.conn_owner.get(conn)
        if owner is not None:
            with self.mutex:
                self._owner_rings.setdefault(owner, []).append(rep)
        return req, rep

    def _track_lock(self, conn, obj, methodname, res):
        # Which connection holds which RLock, and how deeply (see
        # _release_locks_of). A Condition counts when its lock is an RLock.
        if type(obj) is threading.Condition and type(obj._lock) is not _RLOCK_TYPE:
            return
        holders = self._lock_holders
        if methodname == 'acquire':
            if res:
                held = holders.get(obj)
                if held is not None and held[0] is conn:
                    held[1] += 1
                else:
                    holders[obj] = [conn, 1]
        else:
            held = holders.get(obj)
            if held is not None:
                held[1] -= 1
                if held[1] <= 0:
                    del holders[obj]

    def _release_locks_of(self, conn):
        """Release the RLocks (and Conditions over one) still held through a
        connection that has closed.

        An RLock belongs to the server thread that acquired it, which is the
        thread serving that one connection, and only it can release it. Once the
        connection is gone (its client thread ended, or its process died), nobody
        ever can, and every other client would block forever. This runs in that
        thread, so the release is allowed."""
        for obj, held in list(self._lock_holders.items()):
            if held[0] is not conn:
                continue
            del self._lock_holders[obj]
            util.info('releasing %r, held by a closed connection', obj)
            for _ in range(held[1]):
                try:
                    obj.release()
                except RuntimeError:
                    break

    def _send(self, send, msg, conn):
        try:
            try:
                send(msg)
            except Exception:
                send(('#UNSERIALIZABLE', _format_exc()))
        except Exception as e:
            util.info('exception in thread serving %r',
                      threading.current_thread().name)
            util.info(' ... message was %r', msg)
            util.info(' ... exception was %r', e)
            conn.close()
            return False
        return True

    def _call_public(self, conn, methodname, args, kwds):
        try:
            if methodname not in self.public or methodname == 'accept_connection':
                raise AttributeError('%r is not a server method' % (methodname,))
            return ('#RETURN', getattr(self, methodname)(conn, *args, **kwds))
        except Exception:
            return ('#TRACEBACK', _format_exc())

    def _fallback(self, conn, ident, obj, methodname, args, kwds, exposed):
        try:
            fallback = self.fallback_mapping[methodname]
        except KeyError:
            try:
                raise AttributeError(
                    'method %r of %r object is not in exposed=%r' %
                    (methodname, type(obj), exposed))
            except AttributeError:
                return ('#TRACEBACK', _format_exc())
        try:
            return ('#RETURN', fallback(self, conn, ident, obj, *args, **kwds))
        except Exception:
            return ('#TRACEBACK', _format_exc())

    def fallback_getvalue(self, conn, ident, obj):
        return obj

    def fallback_str(self, conn, ident, obj):
        return str(obj)

    def fallback_repr(self, conn, ident, obj):
        return repr(obj)

    fallback_mapping = {
        '__str__': fallback_str,
        '__repr__': fallback_repr,
        '#GETVALUE': fallback_getvalue,
        }

    def dummy(self, c):
        pass

    def debug_info(self, c):
        """A description of the live objects and their reference counts."""
        with self.mutex:
            lines = []
            for ident in sorted(self.id_to_refcount):
                if ident != '0':
                    lines.append('  %s:       refcount=%s\n    %s' %
                                 (ident, self.id_to_refcount[ident],
                                  str(self.id_to_obj[ident][0])[:75]))
            return '\n'.join(lines)

    def number_of_objects(self, c):
        """The number of shared objects."""
        # Not counting id '0', the placeholder for the server itself.
        return len(self.id_to_refcount)

    def shutdown(self, c):
        """Stop the server once the reply to this request is sent."""
        util.debug('manager received shutdown message')
        self._stopping = True

    def create(self, c, typeid, /, *args, **kwds):
        """Create a new shared object; return its id and its exposed methods.

        The caller holds one reference to it, the creation reference."""
        callable, exposed, method_to_typeid, proxytype = self.registry[typeid]
        if callable is None:
            if kwds or (len(args) != 1):
                raise ValueError(
                    "Without callable, must have one non-keyword argument")
            obj = args[0]
        else:
            obj = callable(*args, **kwds)

        if exposed is None:
            exposed = public_methods(obj)
        if method_to_typeid is not None:
            if not isinstance(method_to_typeid, dict):
                raise TypeError(
                    "Method_to_typeid {0!r}: type {1!s}, not dict".format(
                        method_to_typeid, type(method_to_typeid)))
            exposed = list(exposed) + list(method_to_typeid)

        # Ids are never reused, so a late decref from a dead proxy cannot hit a new
        # object (the stdlib uses id(obj), which is reused after the object dies).
        ident = '%x' % next(self._ids)
        with self.mutex:
            self.id_to_obj[ident] = (obj, frozenset(exposed), method_to_typeid)
            self.id_to_refcount[ident] = 0
        self.incref(c, ident)
        return ident, tuple(exposed)

    def _note_local_proxy(self, ident, proxy):
        """Count a proxy that lives in the server (a managed object stored in
        another); when the last one for ``ident`` dies, the server stops keeping
        the object for it. The stdlib keeps it forever, so every managed object
        ever stored in another one leaks."""
        with self.mutex:
            self._local_proxy_counts[ident] = \
                self._local_proxy_counts.get(ident, 0) + 1
        # The callback only queues the id: it may run from the GC at any point,
        # even while this thread holds the mutex.
        weakref.finalize(proxy, self._dead_local_proxies.append, ident)

    def _collect_local_proxies(self):
        """Let go of objects whose last local proxy died before the previous call
        (serve_forever calls this every second).

        The grace period covers a reply in flight: a client may be about to take
        a reference to an object that the server pickled from a local proxy
        which has died since."""
        ready, self._aging_local_proxies = self._aging_local_proxies, []
        dead = self._dead_local_proxies
        count = len(dead)
        self._aging_local_proxies = dead[:count]
        del dead[:count]
        for ident in ready:
            with self.mutex:
                left = self._local_proxy_counts.get(ident, 0) - 1
                if left > 0:
                    self._local_proxy_counts[ident] = left
                    continue
                self._local_proxy_counts.pop(ident, None)
                entry = self.id_to_local_proxy_obj.pop(ident, None)
            # Outside the mutex: the object may hold proxies of its own.
            del entry

    def get_methods(self, c, token):
        """The methods of the shared object ``token`` that its proxy may call."""
        return tuple(self.id_to_obj[token.id][1])

    def accept_connection(self, c, name, owner=None, control=False):
        """Serve the proxies of one thread of a client process over ``c``."""
        self._accept_connection(c, name, owner, control)

    def _accept_connection(self, c, name, owner=None, control=False):
        threading.current_thread().name = name
        if owner is not None:
            with self.mutex:
                if control:
                    self.owner_refs.setdefault(owner, {})
                self.conn_owner[c] = owner
        c.send(('#RETURN', _EXTENDED))
        try:
            self.serve_client(c)
        finally:
            if owner is not None:
                with self.mutex:
                    self.conn_owner.pop(c, None)
                if control:
                    self._drop_owner(owner)

    def _drop_owner(self, owner):
        """Release what a client process still held when its control connection
        closed (it exited, maybe without running its finalizers, or was killed)."""
        with self.mutex:
            held = self.owner_refs.pop(owner, {})
            rings = self._owner_rings.pop(owner, ())
        for ring in rings:
            # A reply still being written for the dead client never gets read.
            ring.abandon()
        for ident, count in held.items():
            util.debug('dropping %d references of dead owner %s to %r',
                       count, owner, ident)
            for _ in range(count):
                try:
                    self._decref(ident)
                except Exception as e:
                    util.info('dropping reference to %r failed: %r', ident, e)

    def incref(self, c, ident, owner=None):
        if owner is None:
            owner = self.conn_owner.get(c)
        with self.mutex:
            try:
                self.id_to_refcount[ident] += 1
            except KeyError:
                # No client holds it any more, but a proxy inside the server does
                # (a managed object stored in another), and a client is getting a
                # new proxy to it: track it again.
                if ident in self.id_to_local_proxy_obj:
                    self.id_to_refcount[ident] = 1
                    self.id_to_obj[ident] = self.id_to_local_proxy_obj[ident]
                    util.debug('Server re-enabled tracking & INCREF %r', ident)
                else:
                    raise
            if owner is not None:
                refs = self.owner_refs.get(owner)
                if refs is not None:
                    refs[ident] = refs.get(ident, 0) + 1

    def decref(self, c, ident, owner=None):
        if owner is None:
            owner = self.conn_owner.get(c)
        if owner is not None:
            # Every reference a ferromp client drops was counted for its owner. If
            # the count is gone, the owner's references were dropped already (its
            # control connection closed): do not drop them twice.
            with self.mutex:
                refs = self.owner_refs.get(owner)
                count = 0 if refs is None else refs.get(ident, 0)
                if count == 0:
                    util.debug('DECREF %r by %s skipped: not held', ident, owner)
                    return
                if count == 1:
                    del refs[ident]
                else:
                    refs[ident] = count - 1
        self._decref(ident)

    def _decref(self, ident):
        if ident not in self.id_to_refcount and \
                ident in self.id_to_local_proxy_obj:
            util.debug('Server DECREF skipping %r', ident)
            return
        with self.mutex:
            if self.id_to_refcount[ident] <= 0:
                raise AssertionError(
                    "Id {0!s} ({1!r}) has refcount {2:n}, not 1+".format(
                        ident, self.id_to_obj[ident],
                        self.id_to_refcount[ident]))
            self.id_to_refcount[ident] -= 1
            if self.id_to_refcount[ident] == 0:
                del self.id_to_refcount[ident]
                # Take the object out of the table but destroy it only after the
                # mutex is released: it may hold proxies (a managed list in a managed
                # dict) whose finalizers call back into this server.
                entry = self.id_to_obj.pop(ident, None)
            else:
                entry = None
        del entry


# The locks whose holder the server tracks (see Server._track_lock). Only owned
# locks: a Lock or a semaphore may legitimately be released by another client than
# the one that acquired it, even after that one has exited (CPython's own suite
# hands a Lock over that way), so its holder cannot be known.
_LOCK_METHODS = frozenset(('acquire', 'release'))
_RLOCK_TYPE = type(threading.RLock())
_RECOVERABLE_LOCKS = frozenset((_RLOCK_TYPE, threading.Condition))
# Acquired for a client whose connection closed before the reply reached it: undone
# on the spot (RLocks and Conditions are undone by _release_locks_of).
_UNDOABLE_ACQUIRES = frozenset((type(threading.Lock()), threading.Semaphore,
                                threading.BoundedSemaphore))


class _BoundSocket(object):
    """A listening socket bound by a manager's start() for its server process."""

    def __init__(self, sock, address, family):
        self.sock = sock
        self.address = address
        self.family = family

    @classmethod
    def detach_from(cls, listener):
        inner = listener._listener
        # The server process will own the socket file; this process must not
        # remove it when its Listener object goes.
        if inner._unlink is not None:
            inner._unlink.cancel()
            inner._unlink = None
        bound = cls(inner._socket, inner._address, inner._family)
        inner._socket = None
        listener._listener = None
        return bound

    def close(self):
        self.sock.close()

    def make_listener(self, Listener):
        """A Listener of class ``Listener`` (the serializer's) around the socket."""
        inner = connection.SocketListener.__new__(connection.SocketListener)
        inner._socket = self.sock
        inner._address = self.address
        inner._family = self.family
        inner._last_accepted = None
        if self.family == 'AF_UNIX' and \
                not util.is_abstract_socket_namespace(self.address):
            inner._unlink = util.Finalize(inner, os.unlink, args=(self.address,),
                                          exitpriority=0)
        else:
            inner._unlink = None
        listener = Listener.__new__(Listener)
        listener._listener = inner
        listener._authkey = None
        return listener


# address -> _BoundSocket, in a server process started by BaseManager.start()
_bound_sockets = {}


def _take_bound_listener(Listener, address):
    bound = _bound_sockets.pop(address, None)
    return None if bound is None else bound.make_listener(Listener)


#
# Manager
#

class State(object):
    __slots__ = ['value']
    INITIAL = 0
    STARTED = 1
    SHUTDOWN = 2


listener_client = {
    'pickle': (connection.Listener, connection.Client),
    'xmlrpclib': (connection.XmlListener, connection.XmlClient),
    }


def _check_initial(state):
    if state.value != State.INITIAL:
        if state.value == State.STARTED:
            raise context.ProcessError("Already started server")
        elif state.value == State.SHUTDOWN:
            raise context.ProcessError("Manager has shut down")
        else:
            raise context.ProcessError("Unknown state {!r}".format(state.value))


class BaseManager(object):
    """Base class for managers: starts (or connects to) a server and makes proxies."""

    _registry = {}
    _Server = Server

    def __init__(self, address=None, authkey=None, serializer='pickle',
                 ctx=None, *, shutdown_timeout=1.0):
        if authkey is None:
            authkey = process.current_process().authkey
        self._address = address     # the real address is known once started
        self._authkey = process.AuthenticationString(authkey)
        self._state = State()
        self._state.value = State.INITIAL
        self._serializer = serializer
        self._Listener, self._Client = listener_client[serializer]
        self._ctx = ctx or context._default_context.get_context()
        self._shutdown_timeout = shutdown_timeout
        self._process = None

    def get_server(self):
        """A Server for this manager's registry, to run with ``serve_forever()``."""
        _check_initial(self._state)
        return self._Server(self._registry, self._address,
                            self._authkey, self._serializer)

    def connect(self):
        """Connect to a server that is already running at ``address``."""
        Listener, Client = listener_client[self._serializer]
        conn = Client(self._address, authkey=self._authkey)
        try:
            dispatch(conn, None, 'dummy')
        finally:
            conn.close()
        self._state.value = State.STARTED

    def start(self, initializer=None, initargs=()):
        """Start a server process for this manager.

        The listening socket is bound here and handed to the server process, so
        the address is known at once and, without an initializer, ``start`` does
        not wait for the server to come up: a client that connects early waits in
        the socket's backlog. If the server dies before serving, the socket closes
        and clients get ConnectionRefusedError / EOFError. With an initializer,
        ``start`` returns once it has run (it reports over a pipe), as the stdlib's.
        """
        _check_initial(self._state)
        if initializer is not None and not callable(initializer):
            raise TypeError('initializer must be a callable')

        # A subclass that overrides _run_server has the stdlib's signature in mind:
        # its server binds its own socket and reports the address, as in the stdlib.
        ours = getattr(type(self)._run_server, '__func__', None) is \
            BaseManager._run_server.__func__
        if ours:
            listener = self._Listener(address=self._address, backlog=16)
            bound = _BoundSocket.detach_from(listener)
            address, kwargs = bound.address, {'bound_socket': bound}
        else:
            bound = None
            address, kwargs = self._address, {}
        if initializer is not None or not ours:
            reader, writer = connection.Pipe(duplex=False)
        else:
            reader = writer = None
        try:
            self._process = self._ctx.Process(
                target=type(self)._run_server,
                args=(self._registry, address, self._authkey,
                      self._serializer, writer, initializer, initargs),
                kwargs=kwargs,
                )
            ident = ':'.join(str(i) for i in self._process._identity)
            self._process.name = type(self).__name__ + '-' + ident
            self._process.start()
        finally:
            # The server process has its own copy of the socket now.
            if bound is not None:
                bound.close()
            if writer is not None:
                writer.close()
        if reader is not None:
            try:
                address = reader.recv()
            finally:
                reader.close()
        self._address = address

        self._state.value = State.STARTED
        self.shutdown = util.Finalize(
            self, type(self)._finalize_manager,
            args=(self._process, self._address, self._authkey, self._state,
                  self._Client, self._shutdown_timeout),
            exitpriority=0
            )

    @classmethod
    def _run_server(cls, registry, address, authkey, serializer, writer,
                    initializer=None, initargs=(), *, bound_socket=None):
        """The server process's target: make the server, report its address, serve."""
        # A Ctrl-C meant for the parent's process group must not kill the server
        # under the parent's feet (bpo-36368); the parent shuts it down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if bound_socket is not None:
            _bound_sockets[bound_socket.address] = bound_socket
        if initializer is not None:
            initializer(*initargs)
        server = cls._Server(registry, address, authkey, serializer)
        server._exit_with_parent = True
        if writer is not None:
            writer.send(server.address)
            writer.close()
        util.info('manager serving at %r', server.address)
        server.serve_forever()

    def _link(self):
        return _link_for(self._address, self._authkey, self._serializer)

    def _create(self, typeid, /, *args, **kwds):
        """Create a shared object; return its token and exposed methods."""
        assert self._state.value == State.STARTED, 'server not yet started'
        id, exposed = self._link().call('create', (typeid,) + args, kwds)
        return Token(typeid, self._address, id), exposed

    def join(self, timeout=None):
        """Wait for the server process (if this manager started one)."""
        if self._process is not None:
            self._process.join(timeout)
            if not self._process.is_alive():
                self._process = None

    def _debug_info(self):
        """A description of the server's shared objects."""
        return self._link().call('debug_info')

    def _number_of_objects(self):
        """The number of shared objects the server holds."""
        return self._link().call('number_of_objects')

    def __enter__(self):
        if self._state.value == State.INITIAL:
            self.start()
        if self._state.value != State.STARTED:
            if self._state.value == State.INITIAL:
                raise context.ProcessError("Unable to start server")
            elif self._state.value == State.SHUTDOWN:
                raise context.ProcessError("Manager has shut down")
            else:
                raise context.ProcessError("Unknown state {!r}".format(self._state.value))
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.shutdown()

    @staticmethod
    def _finalize_manager(process, address, authkey, state, _Client,
                          shutdown_timeout):
        """Shut the server process down (the manager's finalizer)."""
        if process.is_alive():
            util.info('sending shutdown message to manager')
            try:
                conn = _Client(address, authkey=authkey)
                try:
                    dispatch(conn, None, 'shutdown')
                finally:
                    conn.close()
            except Exception:
                pass

            process.join(timeout=shutdown_timeout)
            if process.is_alive():
                util.info('manager still alive')
                if hasattr(process, 'terminate'):
                    util.info('trying to `terminate()` manager process')
                    process.terminate()
                    process.join(timeout=shutdown_timeout)
                    if process.is_alive():
                        util.info('manager still alive after terminate')
                        process.kill()
                        process.join()

        state.value = State.SHUTDOWN
        link = BaseProxy._address_to_local.pop(address, None)
        if link is not None:
            link.close()

    @property
    def address(self):
        return self._address

    @classmethod
    def register(cls, typeid, callable=None, proxytype=None, exposed=None,
                 method_to_typeid=None, create_method=True):
        """Register a type (or callable) that the manager's server can create."""
        if '_registry' not in cls.__dict__:
            cls._registry = cls._registry.copy()

        if proxytype is None:
            proxytype = AutoProxy

        exposed = exposed or getattr(proxytype, '_exposed_', None)
        method_to_typeid = method_to_typeid or \
            getattr(proxytype, '_method_to_typeid_', None)

        if method_to_typeid:
            for key, value in list(method_to_typeid.items()):
                assert type(key) is str, '%r is not a string' % key
                assert type(value) is str, '%r is not a string' % value

        cls._registry[typeid] = (callable, exposed, method_to_typeid, proxytype)

        if create_method:
            def temp(self, /, *args, **kwds):
                util.debug('requesting creation of a shared %r object', typeid)
                token, exp = self._create(typeid, *args, **kwds)
                return _proxy_for_new(proxytype, token, self._serializer, self,
                                      self._authkey, exp, self._link())
            temp.__name__ = typeid
            setattr(cls, typeid, temp)


def _proxy_for_new(proxytype, token, serializer, manager, authkey, exposed, link):
    """A proxy for an object just created, which holds one (creation) reference.

    With a ferromp server, the proxy adopts that reference: the server already
    counted it for this process. Otherwise (a stdlib server, or a proxy type that
    is not ours to call with ``incref``: a factory, or a subclass with an
    ``__init__`` of its own) the proxy takes its own reference and the creation
    reference is dropped, as the stdlib does."""
    if link.extended and (proxytype is AutoProxy or
                          (isinstance(proxytype, type) and
                           issubclass(proxytype, BaseProxy) and
                           proxytype.__init__ is BaseProxy.__init__)):
        proxy = proxytype(token, serializer, manager=manager, authkey=authkey,
                          exposed=exposed, incref=False)
        proxy._adopt_reference()
        return proxy
    proxy = proxytype(token, serializer, manager=manager, authkey=authkey,
                      exposed=exposed)
    link.call('decref', (token.id,))
    return proxy


#
# The client side of a server: control connection and per-thread connections
#

class ProcessLocalSet(set):
    """A set that empties itself in a child process after fork."""

    def __init__(self):
        util.register_after_fork(self, lambda obj: obj.clear())

    def __reduce__(self):
        return type(self), ()


class _ServerLink(object):
    """What one process knows about one server: its per-thread connections (``tls``),
    the ids it holds proxies for (``idset``), and its control connection.

    The control connection carries create / incref / decref / get_methods and the
    like, under a lock. Its opening tells the server this process's owner id; its
    closing (at exit, or when the process is killed) tells the server to drop what
    this process still held. Method calls on objects go over the calling thread's own
    connection, so a blocking call holds up nobody else."""

    def __init__(self, address, authkey, serializer):
        self.address = address
        self.authkey = process.AuthenticationString(authkey)
        self.serializer = serializer
        self.Client = listener_client[serializer][1]
        if serializer == 'pickle':
            self.encode, self.decode = _dumps, _loads
        else:
            self.encode = connection._xml_dumps
            self.decode = connection._xml_loads
        self.tls = util.ForkAwareLocal()
        self.idset = ProcessLocalSet()
        self._reset()
        _links.add(self)

    def _reset(self):
        # Reentrant, for the GC: see call().
        self.lock = threading.RLock()
        self.depth = 0
        self.conn = None
        self.pending_reply = False
        self.owner = self._new_owner()
        # None until the server has told us whether it is a ferromp server.
        self.extended = None

    @staticmethod
    def _new_owner():
        return '%d-%s' % (os.getpid(), os.urandom(6).hex())

    def _after_fork_in_child(self):
        # The inherited control connection is the parent's: close our copy of the
        # fd (else the server would not see the parent go) and become a new owner.
        conn = self.conn
        self._reset()
        # So are the forking thread's method-call connection (the only thread in
        # the child). ForkAwareLocal does this too, but only in ferromp's children.
        self.tls.__dict__.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self):
        self._drop()
        _links.discard(self)

    def _drop(self):
        conn, self.conn = self.conn, None
        self.pending_reply = False
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _open(self):
        conn = self.Client(self.address, authkey=self.authkey)
        try:
            reply = dispatch(conn, None, 'accept_connection',
                             (_connection_name(),),
                             {'owner': self.owner, 'control': True})
        except RemoteError:
            # A stdlib server (its accept_connection takes no owner).
            conn.close()
            self.extended = False
            return
        except BaseException:
            conn.close()
            raise
        if reply == _EXTENDED:
            self.conn = conn
            self.extended = True
        else:
            conn.close()
            self.extended = False

    def ensure_open(self):
        """Open the control connection if needed; return whether it is extended."""
        if self.extended is None:
            with self.lock:
                if self.extended is None:
                    self._open()
        return self.extended

    def call(self, methodname, args=(), kwds={}):  # noqa: B006 (the stdlib's signature; never mutated)
        """Call a server method (``create``, ``incref``, ...) and return its result."""
        with self.lock:
            if self.depth:
                # Re-entered by this thread, from a finalizer the GC ran in the
                # middle of an exchange on the control connection: leave that
                # exchange alone and use a one-off connection.
                return self._call_fresh(methodname, args, kwds)
            self.depth += 1
            try:
                if self.extended is None:
                    self._open()
                conn = self.conn
                if conn is None:
                    if self.extended:
                        # The control connection broke (the server died, or a call
                        # was interrupted mid-exchange): open a new one, as a new
                        # owner. The server dropped what the old owner held.
                        self.owner = self._new_owner()
                        self._open()
                        conn = self.conn
                    if conn is None:
                        return self._call_fresh(methodname, args, kwds)
                # Encoded first: an argument that does not pickle raises here,
                # with nothing sent.
                request = self.encode((None, methodname, args, kwds))
                try:
                    if self.pending_reply:
                        # The reply to a call that was interrupted (below).
                        conn.recv_bytes()
                        self.pending_reply = False
                    conn.send_bytes(request)
                except BaseException:
                    self._drop()
                    raise
                try:
                    self.pending_reply = True
                    reply = conn.recv_bytes()
                    self.pending_reply = False
                except (EOFError, OSError):
                    self._drop()
                    raise
                # Anything else (a signal handler raising, Ctrl-C) leaves the
                # reply on its way: the next call reads and discards it first. A
                # new connection would be a new owner, and the server would drop
                # every reference this process holds with the old one.
            finally:
                self.depth -= 1
        kind, result = self.decode(reply)
        if kind == '#RETURN':
            return result
        raise convert_to_error(kind, result)

    def _call_fresh(self, methodname, args, kwds):
        if self.extended and methodname in ('incref', 'decref'):
            args = tuple(args) + (self.owner,)
        conn = self.Client(self.address, authkey=self.authkey)
        try:
            return dispatch(conn, None, methodname, args, kwds)
        finally:
            conn.close()

    def connect_thread(self):
        """Open this thread's connection for method calls."""
        kwds = {'owner': self.owner} if self.ensure_open() else {}
        conn = self.Client(self.address, authkey=self.authkey)
        try:
            reply = dispatch(conn, None, 'accept_connection', (_connection_name(),), kwds)
            if reply == _EXTENDED and self.serializer == 'pickle' and _local(self.address):
                conn = _RingLink.upgrade(conn)
        except BaseException:
            conn.close()
            raise
        self.tls.connection = conn
        return conn


#
# Ring transport for local connections
#
# A manager connection to a server on this machine (AF_UNIX) and of the pickle
# serializer starts as the stdlib's socket connection; once the server has said it is
# a ferromp server (accept_connection answered _EXTENDED), the client offers two
# shared-memory rings (requests, replies) by sending their fds over the socket, and
# from then on requests and replies travel through them: no syscall per message when
# both sides are awake, which halves a round trip. The socket stays open as the
# liveness channel: a side waiting on a ring looks at it every 100 ms, and its EOF
# means the peer is gone.

_RING_BYTES = 1 << 20
_LIVENESS = 0.1


def _local(address):
    try:
        return connection.address_type(address) == 'AF_UNIX'
    except Exception:
        return False




def _ring_get(ring, sock, loads):
    """The next message of ``ring``; EOFError once ``sock`` says the peer is gone."""
    get = ring.get_obj
    while True:
        try:
            return get(loads, True, _LIVENESS)
        except queue.Empty:
            if sock.closed or sock.poll(0):
                raise EOFError('peer closed the connection') from None


def _ring_endpoints(sock, req, rep):
    """The server's (recv, send) over a client's rings."""
    put = rep.put
    poll = sock.poll

    def recv():
        return _ring_get(req, sock, _loads)

    def send(obj):
        # A reply to a client that is gone must fail, as a socket send would: the
        # server then undoes what the call did (an acquire nobody will release).
        if poll(0):
            raise EOFError('peer closed the connection')
        put(_dumps(obj))
    return recv, send


class _RingLink(object):
    """A client thread's connection to a local ferromp server over two rings (the
    socket kept for liveness)."""

    __slots__ = ('_sock', '_req', '_rep', '_put')

    @classmethod
    def upgrade(cls, sock):
        """``sock`` upgraded to rings, or ``sock`` itself if the server declines."""
        req = _core.Ring(_RING_BYTES, 0)
        rep = _core.Ring(_RING_BYTES, 0)
        sock.send((None, '#use_rings', (), {}))
        reduction.sendfds(sock, list(req.fds) + list(rep.fds))
        kind, result = sock.recv()
        if kind != '#RETURN' or result is not True:
            return sock
        self = cls()
        self._sock, self._req, self._rep = sock, req, rep
        self._put = req.put
        return self

    def roundtrip(self, request):
        """Send a pickled request; the unpickled reply."""
        self._put(request)
        return _ring_get(self._rep, self._sock, _loads)

    def close(self):
        self._sock.close()


def _connection_name():
    name = process.current_process().name
    thread = threading.current_thread()
    if thread is not threading.main_thread():
        name += '|' + thread.name
    return name


_links = set()


def _links_after_fork():
    for link in list(_links):
        link._after_fork_in_child()


os.register_at_fork(after_in_child=_links_after_fork)


def _link_for(address, authkey, serializer):
    with BaseProxy._mutex:
        link = BaseProxy._address_to_local.get(address)
        if link is None:
            link = _ServerLink(address, authkey, serializer)
            BaseProxy._address_to_local[address] = link
        return link


#
# Proxies
#

class BaseProxy(object):
    """Base class of proxies: stands in a process for an object a server owns."""

    # address -> _ServerLink of this process
    _address_to_local = {}
    _mutex = util.ForkAwareThreadLock()

    def __init__(self, token, serializer, manager=None,
                 authkey=None, exposed=None, incref=True, manager_owned=False):
        if authkey is not None:
            authkey = process.AuthenticationString(authkey)
        elif manager is not None:
            authkey = manager._authkey
        else:
            authkey = process.current_process().authkey
        self._authkey = authkey
        link = _link_for(token.address, authkey, serializer)
        self._link = link
        self._tls = link.tls
        self._idset = link.idset
        self._token = token
        self._id = token.id
        self._manager = manager
        self._serializer = serializer
        self._Client = listener_client[serializer][1]
        self._fast = serializer == 'pickle'

        # A proxy the server makes of its own object (a managed object stored in
        # another) holds no reference: the server keeps the object while it needs it.
        self._owned_by_manager = manager_owned

        if incref:
            self._incref()

        util.register_after_fork(self, BaseProxy._after_fork)

    def _connect(self):
        util.debug('making connection to manager')
        return self._link.connect_thread()

    def _callmethod(self, methodname, args=(), kwds={}):  # noqa: B006 (the stdlib's signature; never mutated)
        """Call ``methodname`` on the referent and return the result (or raise)."""
        try:
            conn = self._tls.connection
        except AttributeError:
            util.debug('thread %r does not own a connection',
                       threading.current_thread().name)
            conn = self._connect()

        if self._fast:
            request = _dumps((self._id, methodname, args, kwds))
            try:
                if type(conn) is _RingLink:
                    kind, result = conn.roundtrip(request)
                else:
                    conn.send_bytes(request)
                    kind, result = _loads(conn.recv_bytes())
            except BaseException:
                # Interrupted (Ctrl-C) or broken mid-exchange: a late reply would
                # answer the next call, so this connection is done with.
                self._drop_connection(conn)
                raise
        else:
            conn.send((self._id, methodname, args, kwds))
            kind, result = conn.recv()

        if kind == '#RETURN':
            return result
        elif kind == '#PROXY':
            exposed, token = result
            # A proxy unpickled in another process has no manager; the registry
            # is then the SyncManager's (the stdlib raises AttributeError here).
            registry = (self._manager or SyncManager)._registry
            proxytype = registry.get(token.typeid, (AutoProxy,))[-1]
            token.address = self._token.address
            return _proxy_for_new(proxytype, token, self._serializer, self._manager,
                                  self._authkey, exposed, self._link)
        raise convert_to_error(kind, result)

    def _drop_connection(self, conn):
        if getattr(self._tls, 'connection', None) is conn:
            del self._tls.connection
        try:
            conn.close()
        except Exception:
            pass

    def _getvalue(self):
        """A copy of the referent."""
        return self._callmethod('#GETVALUE')

    def _incref(self):
        if self._owned_by_manager:
            util.debug('owned_by_manager skipped INCREF of %r', self._token.id)
            return
        self._link.call('incref', (self._id,))
        util.debug('INCREF %r', self._token.id)
        self._adopt_reference()

    def _adopt_reference(self):
        """Record that this process holds a reference, dropped when the proxy dies."""
        self._idset.add(self._id)
        state = self._manager and self._manager._state
        self._close = util.Finalize(
            self, BaseProxy._decref,
            args=(self._token, self._link, state, self._tls, self._idset),
            exitpriority=10
            )

    @staticmethod
    def _decref(token, link, state, tls, idset):
        idset.discard(token.id)

        # Tell the server, unless the manager is known to be shut down.
        if state is None or state.value == State.STARTED:
            try:
                util.debug('DECREF %r', token.id)
                link.call('decref', (token.id,))
            except Exception as e:
                util.debug('... decref failed %s', e)
        else:
            util.debug('DECREF %r -- manager already shutdown', token.id)

        # The process holds no more proxies for this server: close this thread's
        # connection, which frees the server thread behind it.
        if not idset and hasattr(tls, 'connection'):
            util.debug('thread %r has no more proxies so closing conn',
                       threading.current_thread().name)
            tls.connection.close()
            del tls.connection

    def _after_fork(self):
        self._manager = None
        try:
            self._incref()
        except Exception as e:
            # The proxy is still usable if the object survives.
            util.info('incref failed: %s' % e)

    def __reduce__(self):
        kwds = {}
        if get_spawning_popen() is not None:
            kwds['authkey'] = self._authkey

        if getattr(self, '_isauto', False):
            kwds['exposed'] = self._exposed_
            return (RebuildProxy,
                    (AutoProxy, self._token, self._serializer, kwds))
        else:
            return (RebuildProxy,
                    (type(self), self._token, self._serializer, kwds))

    def __deepcopy__(self, memo):
        return self._getvalue()

    def __repr__(self):
        return '<%s object, typeid %r at %#x>' % \
               (type(self).__name__, self._token.typeid, id(self))

    def __str__(self):
        """The referent's repr(), from the server."""
        try:
            return self._callmethod('__repr__')
        except Exception:
            return repr(self)[:-1] + "; '__str__()' failed>"


def RebuildProxy(func, token, serializer, kwds):
    """Rebuild a proxy that was pickled (into a child, a queue, or the server)."""
    server = getattr(process.current_process(), '_manager_server', None)
    if server and server.address == token.address:
        util.debug('Rebuild a proxy owned by manager, token=%r', token)
        kwds['manager_owned'] = True
        if token.id not in server.id_to_local_proxy_obj:
            entry = server.id_to_obj.get(token.id)
            if entry is not None:
                server.id_to_local_proxy_obj[token.id] = entry
        kwds.pop('incref', None)
        proxy = func(token, serializer, incref=False, **kwds)
        server._note_local_proxy(token.id, proxy)
        return proxy
    # A child being started takes its reference after it has finished unpickling
    # (BaseProxy._after_fork); meanwhile its parent holds one.
    incref = (
        kwds.pop('incref', True) and
        not getattr(process.current_process(), '_inheriting', False)
        )
    return func(token, serializer, incref=incref, **kwds)


def _make_proxy_method(name):
    def method(self, /, *args, **kwds):
        return self._callmethod(name, args, kwds)
    method.__name__ = method.__qualname__ = name
    return method


def MakeProxyType(name, exposed, _cache={}):  # noqa: B006 (a deliberate per-process cache)
    """A subclass of BaseProxy with one method for each name in ``exposed``."""
    exposed = tuple(exposed)
    try:
        return _cache[(name, exposed)]
    except KeyError:
        pass
    namespace = {meth: _make_proxy_method(meth) for meth in exposed}
    ProxyType = type(name, (BaseProxy,), namespace)
    ProxyType._exposed_ = exposed
    _cache[(name, exposed)] = ProxyType
    return ProxyType


def AutoProxy(token, serializer, manager=None, authkey=None,
              exposed=None, incref=True, manager_owned=False):
    """A proxy whose methods are those the server exposes for the object."""
    if authkey is None and manager is not None:
        authkey = manager._authkey
    if authkey is None:
        authkey = process.current_process().authkey
    if exposed is None:
        exposed = _link_for(token.address, authkey, serializer).call(
            'get_methods', (token,))
    ProxyType = MakeProxyType('AutoProxy[%s]' % token.typeid, exposed)
    proxy = ProxyType(token, serializer, manager=manager, authkey=authkey,
                      incref=incref, manager_owned=manager_owned)
    proxy._isauto = True
    return proxy


#
# Types and callables that SyncManager registers
#

class Namespace(object):
    """A plain attribute bag; repr() shows the attributes not starting with '_'."""

    def __init__(self, /, **kwds):
        self.__dict__.update(kwds)

    def __repr__(self):
        shown = sorted('%s=%r' % (name, value)
                       for name, value in list(self.__dict__.items())
                       if not name.startswith('_'))
        return '%s(%s)' % (self.__class__.__name__, ', '.join(shown))


class Value(object):
    """A box with a typecode, as ``Manager().Value`` serves it (no shared memory)."""

    def __init__(self, typecode, value, lock=True):
        self._typecode = typecode
        self._value = value

    def get(self):
        return self._value

    def set(self, value):
        self._value = value

    def __repr__(self):
        return '%s(%r, %r)' % (type(self).__name__, self._typecode, self._value)

    value = property(get, set)


def Array(typecode, sequence, lock=True):
    return array.array(typecode, sequence)


# The server imports these modules only when a client asks for the type, which keeps
# the server's start cheap (the pool module pulls in a good deal).

def _Queue(maxsize=0):
    import queue
    return queue.Queue(maxsize)


def _Pool(*args, **kwds):
    from . import pool
    return pool.Pool(*args, **kwds)


#
# Proxy types used by SyncManager
#

class IteratorProxy(BaseProxy):
    _exposed_ = ('__next__', 'send', 'throw', 'close')

    def __iter__(self):
        return self

    def __next__(self, *args):
        return self._callmethod('__next__', args)

    def send(self, *args):
        return self._callmethod('send', args)

    def throw(self, *args):
        return self._callmethod('throw', args)

    def close(self, *args):
        return self._callmethod('close', args)


class AcquirerProxy(BaseProxy):
    _exposed_ = ('acquire', 'release')

    def acquire(self, blocking=True, timeout=None):
        args = (blocking,) if timeout is None else (blocking, timeout)
        return self._callmethod('acquire', args)

    def release(self):
        return self._callmethod('release')

    def __enter__(self):
        return self._callmethod('acquire')

    def __exit__(self, exc_type, exc_val, exc_tb):
        return self._callmethod('release')


class ConditionProxy(AcquirerProxy):
    _exposed_ = ('acquire', 'release', 'wait', 'notify', 'notify_all')

    def wait(self, timeout=None):
        return self._callmethod('wait', (timeout,))

    def notify(self, n=1):
        return self._callmethod('notify', (n,))

    def notify_all(self):
        return self._callmethod('notify_all')

    def wait_for(self, predicate, timeout=None):
        # Evaluated here, not in the server: the predicate is the caller's code.
        result = predicate()
        if result:
            return result
        deadline = None if timeout is None else time.monotonic() + timeout
        waittime = None
        while not result:
            if deadline is not None:
                waittime = deadline - time.monotonic()
                if waittime <= 0:
                    break
            self.wait(waittime)
            result = predicate()
        return result


class EventProxy(BaseProxy):
    _exposed_ = ('is_set', 'set', 'clear', 'wait')

    def is_set(self):
        return self._callmethod('is_set')

    def set(self):
        return self._callmethod('set')

    def clear(self):
        return self._callmethod('clear')

    def wait(self, timeout=None):
        return self._callmethod('wait', (timeout,))


class BarrierProxy(BaseProxy):
    _exposed_ = ('__getattribute__', 'wait', 'abort', 'reset')

    def wait(self, timeout=None):
        return self._callmethod('wait', (timeout,))

    def abort(self):
        return self._callmethod('abort')

    def reset(self):
        return self._callmethod('reset')

    @property
    def parties(self):
        return self._callmethod('__getattribute__', ('parties',))

    @property
    def n_waiting(self):
        return self._callmethod('__getattribute__', ('n_waiting',))

    @property
    def broken(self):
        return self._callmethod('__getattribute__', ('broken',))


class NamespaceProxy(BaseProxy):
    _exposed_ = ('__getattribute__', '__setattr__', '__delattr__')

    # Names starting with '_' are the proxy's own; the rest live in the server.
    def __getattr__(self, key):
        if key[0] == '_':
            return object.__getattribute__(self, key)
        callmethod = object.__getattribute__(self, '_callmethod')
        return callmethod('__getattribute__', (key,))

    def __setattr__(self, key, value):
        if key[0] == '_':
            return object.__setattr__(self, key, value)
        callmethod = object.__getattribute__(self, '_callmethod')
        return callmethod('__setattr__', (key, value))

    def __delattr__(self, key):
        if key[0] == '_':
            return object.__delattr__(self, key)
        callmethod = object.__getattribute__(self, '_callmethod')
        return callmethod('__delattr__', (key,))


class ValueProxy(BaseProxy):
    _exposed_ = ('get', 'set')

    def get(self):
        return self._callmethod('get')

    def set(self, value):
        return self._callmethod('set', (value,))

    value = property(get, set)

    __class_getitem__ = classmethod(types.GenericAlias)


BaseListProxy = MakeProxyType('BaseListProxy', (
    '__add__', '__contains__', '__delitem__', '__getitem__', '__len__',
    '__mul__', '__reversed__', '__rmul__', '__setitem__',
    'append', 'count', 'extend', 'index', 'insert', 'pop', 'remove',
    'reverse', 'sort', '__imul__'
    ))


class ListProxy(BaseListProxy):
    # In-place operators return the proxy, not the server's list.
    def __iadd__(self, value):
        self._callmethod('extend', (value,))
        return self

    def __imul__(self, value):
        self._callmethod('__imul__', (value,))
        return self


DictProxy = MakeProxyType('DictProxy', (
    '__contains__', '__delitem__', '__getitem__', '__iter__', '__len__',
    '__setitem__', 'clear', 'copy', 'get', 'items',
    'keys', 'pop', 'popitem', 'setdefault', 'update', 'values'
    ))
DictProxy._method_to_typeid_ = {
    '__iter__': 'Iterator',
    }


ArrayProxy = MakeProxyType('ArrayProxy', (
    '__len__', '__getitem__', '__setitem__'
    ))


BasePoolProxy = MakeProxyType('PoolProxy', (
    'apply', 'apply_async', 'close', 'imap', 'imap_unordered', 'join',
    'map', 'map_async', 'starmap', 'starmap_async', 'terminate',
    ))
BasePoolProxy._method_to_typeid_ = {
    'apply_async': 'AsyncResult',
    'map_async': 'AsyncResult',
    'starmap_async': 'AsyncResult',
    'imap': 'Iterator',
    'imap_unordered': 'Iterator'
    }


class PoolProxy(BasePoolProxy):
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()


#
# SyncManager
#

class SyncManager(BaseManager):
    """A manager serving the stdlib's synchronisation types, dict, list, Namespace,
    Value, Array, queues and Pool. ``ferromp.Manager()`` returns a started one."""


SyncManager.register('Queue', _Queue)
SyncManager.register('JoinableQueue', _Queue)
SyncManager.register('Event', threading.Event, EventProxy)
SyncManager.register('Lock', threading.Lock, AcquirerProxy)
SyncManager.register('RLock', threading.RLock, AcquirerProxy)
SyncManager.register('Semaphore', threading.Semaphore, AcquirerProxy)
SyncManager.register('BoundedSemaphore', threading.BoundedSemaphore,
                     AcquirerProxy)
SyncManager.register('Condition', threading.Condition, ConditionProxy)
SyncManager.register('Barrier', threading.Barrier, BarrierProxy)
SyncManager.register('Pool', _Pool, PoolProxy)
SyncManager.register('list', list, ListProxy)
SyncManager.register('dict', dict, DictProxy)
SyncManager.register('Value', Value, ValueProxy)
SyncManager.register('Array', Array, ArrayProxy)
SyncManager.register('Namespace', Namespace, NamespaceProxy)

# Types returned by methods of PoolProxy (and DictProxy.__iter__).
SyncManager.register('Iterator', proxytype=IteratorProxy, create_method=False)
SyncManager.register('AsyncResult', create_method=False)


#
# SharedMemoryManager
#

def _shared_memory():
    # Imported on use: the server of a SyncManager never needs it.
    from . import shared_memory
    return shared_memory


if HAS_SHMEM:
    class _SharedMemoryTracker:
        """The names of the segments a SharedMemoryServer unlinks at shutdown."""

        def __init__(self, name, segment_names=None):
            self.shared_memory_context_name = name
            self.segment_names = [] if segment_names is None else segment_names

        def register_segment(self, segment_name):
            util.debug(f"Register segment {segment_name!r} in pid {os.getpid()}")
            self.segment_names.append(segment_name)

        def destroy_segment(self, segment_name):
            """Unlink the segment and stop tracking it."""
            util.debug(f"Destroy segment {segment_name!r} in pid {os.getpid()}")
            self.segment_names.remove(segment_name)
            segment = _shared_memory().SharedMemory(segment_name)
            segment.close()
            segment.unlink()

        def unlink(self):
            """Unlink every tracked segment."""
            for segment_name in self.segment_names[:]:
                self.destroy_segment(segment_name)

        def __del__(self):
            util.debug(f"Call {self.__class__.__name__}.__del__ in {os.getpid()}")
            self.unlink()

        def __getstate__(self):
            return (self.shared_memory_context_name, self.segment_names)

        def __setstate__(self, state):
            self.__init__(*state)

    class SharedMemoryServer(Server):
        """A Server that also tracks shared memory segments and unlinks them when
        it shuts down."""

        public = Server.public + \
            ['track_segment', 'release_segment', 'list_segments']

        def __init__(self, *args, **kwargs):
            Server.__init__(self, *args, **kwargs)
            address = self.address
            if isinstance(address, bytes):
                address = os.fsdecode(address)
            self.shared_memory_context = \
                _SharedMemoryTracker(f"shm_{address}_{os.getpid()}")
            util.debug(f"SharedMemoryServer started by pid {os.getpid()}")

        def create(self, c, typeid, /, *args, **kwargs):
            """Create an object; a proxy type marked ``_shared_memory_proxy`` gets
            the tracker as ``shared_memory_context``."""
            if hasattr(self.registry[typeid][-1], "_shared_memory_proxy"):
                kwargs['shared_memory_context'] = self.shared_memory_context
            return Server.create(self, c, typeid, *args, **kwargs)

        def shutdown(self, c):
            """Unlink every tracked segment, then stop."""
            self.shared_memory_context.unlink()
            return Server.shutdown(self, c)

        def track_segment(self, c, segment_name):
            """Track a segment by name, to unlink it at shutdown."""
            self.shared_memory_context.register_segment(segment_name)

        def release_segment(self, c, segment_name):
            """Unlink a tracked segment now and stop tracking it."""
            self.shared_memory_context.destroy_segment(segment_name)

        def list_segments(self, c):
            """The names of the tracked segments."""
            return self.shared_memory_context.segment_names

    class SharedMemoryManager(BaseManager):
        """A manager whose server unlinks, at shutdown, every SharedMemory and
        ShareableList created through it."""

        _Server = SharedMemoryServer

        def __init__(self, *args, **kwargs):
            # Start this process's resource tracker now, so that the server
            # process started later shares it (bpo-36867): else the server's
            # unlinks would go to a tracker of its own, and ours would warn at
            # exit about segments it believes leaked.
            from . import resource_tracker
            resource_tracker.ensure_running()
            BaseManager.__init__(self, *args, **kwargs)
            util.debug(f"{self.__class__.__name__} created by pid {os.getpid()}")

        def __del__(self):
            util.debug(f"{self.__class__.__name__}.__del__ by pid {os.getpid()}")

        def _track(self, name):
            with self._Client(self._address, authkey=self._authkey) as conn:
                dispatch(conn, None, 'track_segment', (name,))

        def SharedMemory(self, size):
            """A new SharedMemory of ``size`` bytes, unlinked at shutdown."""
            sms = _shared_memory().SharedMemory(None, create=True, size=size)
            try:
                self._track(sms.name)
            except BaseException:
                sms.unlink()
                raise
            return sms

        def ShareableList(self, sequence):
            """A new ShareableList of ``sequence``, unlinked at shutdown."""
            sl = _shared_memory().ShareableList(sequence)
            try:
                self._track(sl.shm.name)
            except BaseException:
                sl.shm.unlink()
                raise
            return sl
