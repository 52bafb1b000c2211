"""Child targets and registered types for tests/test_managers.py.

They live at module level so that they pickle by reference: a spawn or forkserver
child (and a manager's server process) imports this module to find them. So do the
custom manager classes: a spawned server process finds its class here.
"""

import os
import signal
import threading
import time

import multiprocessing.managers as std_managers

import ferromp.managers as fm_managers


def use_every_type(objs):
    """Exercise every SyncManager type from a child; the parent checks the effects."""
    d, lst, ns, val, arr, q, jq, lock, rlock, sem, bsem, cond, ev, pool = objs
    d['child'] = os.getpid()
    d.update(extra=[1, 2])
    lst.append('from child')
    lst.extend([7, 8])
    lst[0] = 'first'
    ns.x = 42
    val.value = 3.5
    arr[1] = 99
    q.put(('queued', len(lst)))
    jq.put('job')
    with lock:
        pass
    with rlock:
        with rlock:
            pass
    sem.acquire()
    bsem.acquire()
    bsem.release()
    with cond:
        cond.notify_all()
    ev.set()
    d['pool'] = pool.map(abs, [-1, -2, -3])


def square(x):
    return x * x


def add_under_lock(lock, value, n):
    for _ in range(n):
        with lock:
            value.value += 1


def wait_event_then_mark(ev, d, key):
    if ev.wait(30):
        d[key] = True


def barrier_party(barrier, d, key):
    d[key] = barrier.wait(30)


def condition_waiter(cond, d):
    with cond:
        ok = cond.wait_for(lambda: d.get('go'), 30)
    d['woken'] = bool(ok)


def joinable_worker(jq, out):
    while True:
        item = jq.get()
        if item is None:
            jq.task_done()
            return
        out.append(item * 10)
        jq.task_done()


def fill_nested(outer):
    inner = outer['inner']
    inner.append('child')
    outer['count'] = len(inner)


def hold_proxies_then_die(objs, conn):
    """Take references to the objects, report, and die without any cleanup."""
    d, lst = objs
    d['alive'] = True
    lst.append(1)
    conn.send('ready')
    os.kill(os.getpid(), signal.SIGKILL)


def get_from_queue(q, out):
    proxy = q.get(timeout=30)
    out.append(proxy[:])
    proxy.append('seen')


def use_remote(address, authkey, serializer, conn):
    from ferromp.managers import BaseManager, DictProxy

    class RemoteManager(BaseManager):
        pass

    RemoteManager.register('get_dict', proxytype=DictProxy)
    m = RemoteManager(address=address, authkey=authkey, serializer=serializer)
    try:
        m.connect()
        d = m.get_dict()
        d['remote'] = 'hello'
        conn.send(('ok', d['remote']))
    except Exception as e:
        conn.send(('error', type(e).__name__))


# A dict the remote manager's server hands out (the server is the only process
# where it lives).
_served_dict = {}


def served_dict():
    return _served_dict


def serve_remote(manager_cls, address, authkey, serializer, conn):
    manager_cls.register('get_dict', callable=served_dict,
                         proxytype=fm_managers.DictProxy)
    m = manager_cls(address=address, authkey=authkey, serializer=serializer)
    server = m.get_server()
    conn.send(server.address)
    server.serve_forever()


def set_namespace_flag(ns):
    ns.flag = os.getpid()


class Counter:
    """A registered type: public, private and generator-returning methods."""

    def __init__(self, start=0):
        self.n = start

    def incr(self, by=1):
        self.n += by
        return self.n

    def fail(self):
        raise KeyError('counter failure')

    def _secret(self):
        return 'secret'

    def numbers(self, k):
        for i in range(k):
            yield i

    def unpicklable(self):
        # A lambda alone would go by value (cloudpickle); not the lock it holds.
        lock = threading.Lock()
        return lambda: lock

    def child_counter(self):
        return Counter(self.n * 100)


def counter_in_child(counter, k):
    for _ in range(k):
        counter.incr()


def sleep_forever():
    while True:
        time.sleep(1)


def _register_counter(manager_cls, managers_module):
    exposed = ('incr', 'fail', 'numbers', 'unpicklable', 'child_counter')
    base = managers_module.MakeProxyType('CounterProxyBase', exposed)

    class CounterProxy(base):
        _method_to_typeid_ = {'numbers': 'Iterator', 'child_counter': 'ChildCounter'}

        def incr(self, by=1):
            return self._callmethod('incr', (by,))

        def __repr__(self):
            return '<CounterProxy %s>' % self._id

    manager_cls.register('Counter', Counter, CounterProxy)
    # What child_counter() returns: the server wraps the result (no callable).
    manager_cls.register('ChildCounter', proxytype=CounterProxy, create_method=False)
    # An AutoProxy with the default exposed list (public methods only).
    manager_cls.register('AutoCounter', Counter)
    # exposed names a private method; it becomes callable through the proxy.
    manager_cls.register('SecretCounter', Counter, exposed=('incr', '_secret'))
    return CounterProxy


class CounterManager(fm_managers.SyncManager):
    pass


class StdCounterManager(std_managers.SyncManager):
    pass


class NarrowInitProxy(fm_managers.BaseProxy):
    """A proxy whose __init__ takes only what the stdlib passes when creating."""

    _exposed_ = ('incr',)

    def __init__(self, token, serializer, manager=None, authkey=None, exposed=None):
        super().__init__(token, serializer, manager=manager, authkey=authkey,
                         exposed=exposed)

    def incr(self):
        return self._callmethod('incr')


def slow_dict():
    time.sleep(0.5)
    return {}


CounterManager.register('SlowDict', slow_dict, fm_managers.DictProxy)
CounterManager.register('NarrowCounter', Counter, NarrowInitProxy)
FmCounterProxy = _register_counter(CounterManager, fm_managers)
FmCounterProxy.__qualname__ = FmCounterProxy.__name__ = 'FmCounterProxy'
StdCounterProxy = _register_counter(StdCounterManager, std_managers)
StdCounterProxy.__qualname__ = StdCounterProxy.__name__ = 'StdCounterProxy'


class RemoteManager(fm_managers.BaseManager):
    pass


def acquire_then_die(lock, rlock, cond, conn):
    lock.acquire()
    rlock.acquire()
    rlock.acquire()
    cond.acquire()
    conn.send('held')
    os.kill(os.getpid(), signal.SIGKILL)


def _refuse_to_load():
    raise ValueError('this object does not unpickle')


class Unloadable:
    """Pickles fine, but raises when unpickled (in the server)."""

    def __reduce__(self):
        return _refuse_to_load, ()


class OwnRunServerManager(fm_managers.SyncManager):
    """Overrides _run_server with the stdlib's signature (no bound socket)."""

    @classmethod
    def _run_server(cls, registry, address, authkey, serializer, writer,
                    initializer=None, initargs=()):
        super()._run_server(registry, address, authkey, serializer, writer,
                            initializer, initargs)
