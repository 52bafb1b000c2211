"""The by-value fallback: lambdas, closures and interactive code, with cloudpickle.

What the standard pickler pickles by reference still goes by reference, byte for byte
the stdlib's pickle (``multiprocessing.reduction.ForkingPickler`` is the oracle). What
it refuses (a lambda, a closure, a class defined in a function) goes by value, through
every channel: Pool tasks, initializers and results, ``Process(target=...)``, queues
and pipes, under every start method. What an interactive ``__main__`` (``python -c``,
stdin) defines goes by value to spawn and forkserver children, which cannot import it;
those scripts run in a fresh interpreter. Without cloudpickle, or with the fallback
turned off, the error is the stdlib's (plus a one-line hint in the first case).
"""

import functools
import os
import pickle
import sys
import textwrap
import threading

import cloudpickle  # noqa: F401 (the test extra installs it; these tests need it)
import multiprocessing.pool
import multiprocessing.reduction as std_reduction
import pytest

import _helpers
import ferromp
from ferromp import pool as fpool
from ferromp import queues
from ferromp import reduction

pytestmark = pytest.mark.timeout(120)

GET = 30        # seconds any single get / recv may wait


def std_error(obj):
    """The error the stdlib's ForkingPickler raises for ``obj``."""
    with pytest.raises(Exception) as info:
        std_reduction.ForkingPickler.dumps(obj)
    return info.value


def assert_stdlib_error(err, obj):
    """``err`` is exactly the stdlib's error for ``obj``: same type, same message, no
    note."""
    std = std_error(obj)
    assert type(err) is type(std)
    assert str(err) == str(std)
    assert getattr(err, '__notes__', None) is None


def hint_of(err):
    """The hint ``err`` carries: its notes (3.11+) or the last line of its message."""
    notes = getattr(err, '__notes__', None)
    if notes is not None:
        return notes
    return str(err).splitlines()[-1:]


def make_adder(n):
    return lambda x: x + n


def make_closure_over(value):
    def closure(x):
        return (value, x)
    return closure


def locked_lambda():
    """A lambda no pickler can send: cloudpickle takes the lambda but not its lock."""
    lock = threading.Lock()
    return lambda *args: lock


@pytest.fixture
def fallback_off():
    ferromp.set_pickle_fallback(False)
    try:
        yield
    finally:
        ferromp.set_pickle_fallback(True)


@pytest.fixture
def no_cloudpickle(monkeypatch):
    """As if cloudpickle were not installed: importing it fails."""
    monkeypatch.setitem(sys.modules, 'cloudpickle', None)
    monkeypatch.setattr(reduction, '_cloudpickle', None)
    monkeypatch.setattr(reduction, '_ByValuePickler', None)


_SHARED = []


@pytest.fixture(scope="module")
def pool(start_method):
    """A Pool(2) of each start method, shared by the tests that do not break it."""
    with start_method.Pool(2) as p:
        _SHARED[:] = [p]
        yield p
        _SHARED[:] = []


@pytest.fixture(autouse=True)
def _reap_leftover_children():
    """Overrides conftest's reaper: kill what a failing test left behind, but not the
    workers of the shared pool (killed, they would be replaced at any moment, by a
    fork that could land in the middle of the next test's own fork)."""
    yield
    keep = set()
    for p in _SHARED:
        keep.update(id(w) for w in list(p._pool))
    for p in ferromp.active_children():
        if id(p) not in keep:
            p.kill()
            p.join(5)


#
# The by-reference path is the stdlib's
#

BY_REFERENCE = [
    _helpers.noop,
    os.path.join,
    len,
    _helpers.Adder,
    _helpers.Adder(3),
    _helpers.Adder(3).add,
    {'f': _helpers.noop, 'k': [1, 2.5, 'x', None]},
    (1, 'two', b'three', _helpers.noop),
    ValueError('boom'),
]


@pytest.mark.parametrize("obj", BY_REFERENCE, ids=repr)
def test_by_reference_pickles_are_the_stdlibs(obj, monkeypatch):
    # The fallback is never consulted for what the stdlib pickles.
    def fail(*args):
        raise AssertionError("the by-value path ran")
    monkeypatch.setattr(reduction, '_dumps_by_value', fail)
    monkeypatch.setattr(reduction, '_dumps_main_by_value', fail)

    expected = bytes(std_reduction.ForkingPickler.dumps(obj, pickle.HIGHEST_PROTOCOL))
    assert reduction._dumps_bytes(obj) == expected
    assert queues._dumps_for_ring(obj) == expected
    if callable(obj) and not isinstance(obj, type):
        assert fpool._FuncCache().parent_key(obj) in (expected, obj)


@pytest.mark.timeout(60)
def test_by_reference_through_a_pipe_and_a_queue(start_method):
    a, b = start_method.Pipe()
    q = start_method.Queue()
    for obj in BY_REFERENCE:
        expected = bytes(std_reduction.ForkingPickler.dumps(obj, pickle.HIGHEST_PROTOCOL))
        a.send(obj)
        assert b.recv_bytes() == expected
        q.put(obj)
        got = q.get(timeout=GET)
        assert type(got) is type(obj)
    # Functions and classes come back as themselves.
    for obj in (_helpers.noop, os.path.join, _helpers.Adder):
        a.send(obj)
        assert b.recv() is obj
        q.put(obj)
        assert q.get(timeout=GET) is obj
    a.close()
    b.close()
    q.close()


def test_only_what_fails_goes_by_value():
    add = make_adder(1)
    data = reduction._dumps_bytes((add, _helpers.noop, os.path.join, _helpers.Adder(2)))
    got_add, noop, join, adder = pickle.loads(data)
    assert got_add is not add and got_add(1) == 2
    # The rest went by reference: the very same objects come back.
    assert noop is _helpers.noop and join is os.path.join
    assert type(adder) is _helpers.Adder and adder.base == 2


def test_by_value_kinds_round_trip():
    def nested(x):
        return x * 2

    class Local:
        def __init__(self, v):
            self.v = v

    for obj, check in [
            (lambda x: x + 1, lambda f: f(1) == 2),
            (make_adder(5), lambda f: f(1) == 6),
            (make_closure_over([1, 2]), lambda f: f(3) == ([1, 2], 3)),
            (nested, lambda f: f(4) == 8),
            (Local, lambda c: c(9).v == 9),
            (Local(4), lambda o: o.v == 4 and type(o).__name__ == 'Local'),
            (functools.partial(make_adder(2), 5), lambda p: p() == 7)]:
        for dumps in (reduction._dumps_bytes, queues._dumps_for_ring):
            assert check(pickle.loads(dumps(obj)))


#
# Pool
#

def test_pool_map_apply_imap(pool):
    double = lambda x: x * 2  # noqa: E731
    assert pool.map(double, range(10)) == [x * 2 for x in range(10)]
    assert pool.map(double, range(100), chunksize=7) == [x * 2 for x in range(100)]
    assert pool.map(make_adder(10), range(5), chunksize=1) == list(range(10, 15))
    assert pool.apply_async(make_adder(1), (41,)).get(GET) == 42
    assert pool.apply(make_closure_over('v'), ('x',)) == ('v', 'x')
    assert pool.apply_async(lambda a, b=0: a - b, (5,), {'b': 2}).get(GET) == 3
    assert list(pool.imap(make_adder(3), range(6))) == list(range(3, 9))
    assert list(pool.imap(make_adder(3), range(6), chunksize=4)) == list(range(3, 9))
    assert sorted(pool.imap_unordered(double, range(6))) == [0, 2, 4, 6, 8, 10]
    assert pool.starmap(lambda a, b: a * b, [(2, 3), (4, 5)]) == [6, 20]
    assert pool.map(_helpers.Adder(1).add, [1]) == [2]  # by reference, unchanged


def test_pool_nested_function_and_local_class(pool):
    def nested(x):
        return x - 1

    class Box:
        def __init__(self, v):
            self.v = v

    assert pool.map(nested, [1, 2, 3]) == [0, 1, 2]
    boxes = pool.map(Box, [1, 2])
    # The class comes back as the class it was sent as.
    assert [type(b) for b in boxes] == [Box, Box] and [b.v for b in boxes] == [1, 2]


def test_pool_closures_of_one_code_stay_apart(pool):
    # The function cache keys a function by its pickle: two closures over different
    # values are two functions, in the parent and in the workers.
    for n in (1, 2, 3):
        assert pool.apply(make_adder(n), (0,)) == n
        assert pool.map(make_adder(n), range(3), chunksize=1) == [n, n + 1, n + 2]


def test_pool_result_that_is_a_lambda(pool, std_ctx):
    # A result goes back by value only when the task's code came by value...
    add = pool.apply(lambda n: make_adder(n), (7,))
    assert add(1) == 8
    # ...otherwise a result that does not pickle fails as in the stdlib (CPython's
    # suite checks it: a module function returning a lambda gets MaybeEncodingError).
    with pytest.raises(fpool.MaybeEncodingError):
        pool.apply(make_adder, (7,))
    with std_ctx.Pool(1) as sp:
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            sp.apply(make_adder, (7,))


def test_pool_initializer_closure(start_method):
    value = 'set by a closure'

    def init():
        _helpers.STATE['init'] = value

    with start_method.Pool(2, initializer=init) as p:
        assert p.map(_helpers.state_of, ['init'] * 4) == [value] * 4
    with start_method.Pool(1, initializer=lambda k, v: _helpers.STATE.update({k: v}),
                           initargs=('lam', 5)) as p:
        assert p.apply(_helpers.state_of, ('lam',)) == 5


def test_pool_function_nothing_can_pickle_fails_at_the_call(pool):
    bad = locked_lambda()
    for call in (lambda: pool.apply_async(bad, (1,)),
                 lambda: pool.map(bad, [1, 2]),
                 lambda: pool.map_async(bad, range(50), chunksize=5),
                 lambda: pool.imap(bad, [1]),
                 lambda: pool.starmap(bad, [(1,)])):
        with pytest.raises(TypeError, match="_thread.lock") as info:
            call()
        # The stdlib's refusal of the lambda is the context.
        assert_stdlib_error(info.value.__context__, bad)
    # An argument nobody can pickle, next to a lambda that goes by value.
    with pytest.raises(TypeError):
        pool.apply_async(make_adder(1), (threading.Lock(),))
    # Nothing lingers and the pool still works.
    assert pool.map(make_adder(1), range(4)) == [1, 2, 3, 4]
    assert pool.apply(abs, (-3,)) == 3
    assert not pool._cache


#
# Process(target=...)
#

def test_process_target_lambda(start_method):
    out = start_method.Queue()
    p = start_method.Process(target=lambda q, x: q.put(x * 2), args=(out, 21))
    p.start()
    assert out.get(timeout=GET) == 42
    p.join(GET)
    assert p.exitcode == 0


def test_process_target_closure_over_our_objects(start_method):
    # The closure holds a Queue and a Connection of ours: they reduce as ferromp's
    # always do (their fds go with the child), inside the by-value pickle.
    out = start_method.Queue()
    a, b = start_method.Pipe()

    def closure(x):
        out.put(('closure', x))
        b.send(x + 1)

    p = start_method.Process(target=closure, args=(5,))
    p.start()
    assert out.get(timeout=GET) == ('closure', 5)
    assert a.poll(GET) and a.recv() == 6
    p.join(GET)
    assert p.exitcode == 0
    a.close()
    b.close()


def test_process_lambda_in_args(start_method):
    out = start_method.SimpleQueue()
    p = start_method.Process(target=_helpers.call_and_put,
                             args=(lambda *a: sum(a), out, 1, 2, 3))
    p.start()
    assert out.get() == 6
    p.join(GET)
    assert p.exitcode == 0


def test_process_target_nothing_can_pickle(start_method, start_method_name):
    bad = locked_lambda()
    p = start_method.Process(target=bad)
    if start_method_name == 'fork':
        # A forked child inherits its target: nothing is pickled, as in the stdlib.
        p.start()
        p.join(GET)
        assert p.exitcode == 0
        return
    with pytest.raises(TypeError, match="_thread.lock"):
        p.start()
    # The next start works.
    _helpers.run_to_completion(start_method, make_adder(1), 1)


#
# Queues and pipes
#

@pytest.mark.parametrize("kind", ["Queue", "SimpleQueue", "JoinableQueue"])
def test_queue_carries_lambdas_and_closures(start_method, kind):
    q = getattr(start_method, kind)()
    out = start_method.Queue()
    p = start_method.Process(target=_helpers.get_call_put, args=(q, out))
    p.start()
    q.put(make_adder(4))
    assert out.get(timeout=GET) == 7
    p.join(GET)
    assert p.exitcode == 0
    # In the same process too.
    q.put(lambda x: x * 5)
    got = q.get(timeout=GET) if kind != 'SimpleQueue' else q.get()
    assert got(2) == 10
    if kind == 'JoinableQueue':
        q.task_done()
        q.task_done()


def test_pipe_carries_lambdas_and_closures(start_method):
    ours, theirs = start_method.Pipe()
    p = start_method.Process(target=_helpers.recv_call_send, args=(theirs,))
    p.start()
    ours.send(make_closure_over('p'))
    assert ours.poll(GET) and ours.recv() == ('p', 3)
    p.join(GET)
    assert p.exitcode == 0
    a, b = start_method.Pipe(duplex=False)
    b.send(lambda: 'local')
    assert a.recv()() == 'local'


def test_put_and_send_of_what_nothing_can_pickle(start_method):
    q = start_method.Queue()
    a, b = start_method.Pipe()
    bad = locked_lambda()
    with pytest.raises(TypeError, match="_thread.lock"):
        q.put(bad)
    with pytest.raises(TypeError, match="_thread.lock"):
        a.send([1, bad])
    # Nothing was written: both still work.
    q.put('after')
    assert q.get(timeout=GET) == 'after'
    assert not b.poll(0)
    a.send('after')
    assert b.recv() == 'after'


def test_manager_stores_and_returns_lambdas(start_method):
    with start_method.Manager() as manager:
        d = manager.dict()
        d['add'] = make_adder(3)
        assert d['add'](1) == 4
        ns = manager.Namespace()
        ns.f = lambda: 'by value'
        assert ns.f() == 'by value'
        # Nothing can pickle it: raised at the call, the proxy still works.
        with pytest.raises(TypeError, match="_thread.lock"):
            d['bad'] = locked_lambda()
        assert sorted(d.keys()) == ['add']


#
# Without cloudpickle, and with the fallback off
#

def test_without_cloudpickle_the_stdlib_error_and_a_hint(start_method, pool,
                                                        no_cloudpickle):
    lam = lambda: 0  # noqa: E731
    nested = make_adder(1)
    a, b = start_method.Pipe()
    q = start_method.Queue()
    for obj in (lam, nested, [1, nested]):
        std = std_error(obj)
        for call in (lambda obj=obj: a.send(obj), lambda obj=obj: q.put(obj),
                     lambda obj=obj: pool.apply_async(_helpers.noop, (obj,))):
            with pytest.raises(type(std)) as info:
                call()
            err = info.value
            assert str(err).splitlines()[0] == str(std)
            assert hint_of(err) == [reduction._HINT]
    with pytest.raises(type(std_error(nested))) as info:
        pool.map(nested, [1])
    assert hint_of(info.value) == [reduction._HINT]
    # A failure that has nothing to do with functions gets no hint.
    lock = threading.Lock()
    with pytest.raises(TypeError) as info:
        q.put(lock)
    assert_stdlib_error(info.value, lock)
    # Ordinary objects go as always.
    q.put(_helpers.noop)
    assert q.get(timeout=GET) is _helpers.noop
    assert pool.map(abs, [-1]) == [1]


def test_without_cloudpickle_process_start(non_fork_start_method, no_cloudpickle):
    lam = lambda: 0  # noqa: E731
    std = std_error(lam)
    with pytest.raises(type(std)) as info:
        non_fork_start_method.Process(target=lam).start()
    assert str(info.value).splitlines()[0] == str(std)
    assert hint_of(info.value) == [reduction._HINT]


def test_fallback_off_gives_the_stdlib_error_unchanged(start_method, pool, fallback_off):
    assert not ferromp.get_pickle_fallback()
    a, b = start_method.Pipe()
    q = start_method.SimpleQueue()
    for obj in (lambda: 0, make_adder(1), (1, make_closure_over(2))):
        for call in (lambda obj=obj: a.send(obj), lambda obj=obj: q.put(obj),
                     lambda obj=obj: pool.apply_async(_helpers.noop, (obj,))):
            with pytest.raises(Exception) as info:
                call()
            assert_stdlib_error(info.value, obj)
            assert info.value.__context__ is None
    lam = lambda: 0  # noqa: E731
    with pytest.raises(Exception) as info:
        pool.map(lam, [1])
    assert_stdlib_error(info.value, lam)
    assert pool.apply(abs, (-2,)) == 2


def test_fallback_off_process_start(start_method, std_ctx, start_method_name,
                                    fallback_off):
    lam = lambda: None  # noqa: E731
    if start_method_name == 'fork':
        _helpers.run_to_completion(start_method, lam)
        return
    with pytest.raises(Exception) as info:
        start_method.Process(target=lam).start()
    with pytest.raises(Exception) as std_info:
        std_ctx.Process(target=lam).start()
    assert type(info.value) is type(std_info.value)
    assert str(info.value) == str(std_info.value)
    assert getattr(info.value, '__notes__', None) is None


def test_the_switch_goes_to_children(start_method):
    out = start_method.SimpleQueue()
    for enabled in (False, True):
        ferromp.set_pickle_fallback(enabled)
        try:
            _helpers.run_to_completion(start_method, _helpers.put_pickle_fallback, out)
        finally:
            ferromp.set_pickle_fallback(True)
        assert out.get() is enabled


def test_environment_variable_turns_it_off():
    code = textwrap.dedent("""
        import ferromp
        print(ferromp.get_pickle_fallback())
        a, b = ferromp.Pipe()
        a.send(lambda: 0)
    """)
    env = _helpers.child_env()
    env['FERROMP_CLOUDPICKLE'] = '0'
    r = _helpers.run_script(['-c', code], timeout=60, env=env)
    assert r.returncode == 1
    assert r.stdout.split() == ['False']
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("_pickle.PicklingError: Can't pickle <function <lambda>")
    assert 'cloudpickle' not in r.stderr


def test_without_cloudpickle_the_traceback_says_how_to_get_it():
    # What the user sees: the stdlib's error, then one line with the way out.
    code = textwrap.dedent("""
        import sys
        sys.modules['cloudpickle'] = None
        import ferromp
        q = ferromp.Queue()
        q.put(lambda: 0)
    """)
    r = _helpers.run_script(['-c', code], timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-2].startswith("_pickle.PicklingError: Can't pickle <function <lambda>")
    assert lines[-1] == reduction._HINT


#
# Interactive __main__: python -c and stdin
#

# Everything a spawn or forkserver child cannot import: functions, a lambda, a closure
# and a class defined in an interactive __main__.
INTERACTIVE = textwrap.dedent("""
    import os
    import sys
    import ferromp

    method = sys.argv[1]
    ctx = ferromp.get_context(method)


    class Point:
        def __init__(self, x):
            self.x = x


    def triple(x):
        return x * 3


    def make_adder(n):
        return lambda x: x + n


    def init(value):
        # A function sent by value gets its own copy of the globals it uses: state
        # shared with the tasks lives in a module.
        os.environ['INTERACTIVE_STATE'] = value


    def read_state(_):
        return os.environ.get('INTERACTIVE_STATE')


    def get_call_put(q, out):
        out.put(q.get()(2))


    def recv_call_send(conn):
        conn.send(conn.recv()(2))


    def target(out, fn):
        out.put(('target', fn(5)))


    with ctx.Pool(2, initializer=init, initargs=('ready',)) as pool:
        print('map', pool.map(triple, range(5)))
        print('chunks', pool.map(triple, range(20), chunksize=3)[-3:])
        print('apply', pool.apply_async(triple, (4,)).get(30),
              pool.apply_async(make_adder(1), (4,)).get(30),
              pool.apply(lambda x: -x, (4,)))
        print('imap', list(pool.imap(make_adder(2), range(3))),
              list(pool.imap(triple, range(6), chunksize=2)))
        print('init', pool.map(read_state, range(2)))
        point = pool.apply(Point, (7,))
        print('class', type(point) is Point, point.x)
        print('argument', pool.apply(getattr, (Point(1), 'x')))

    out = ctx.Queue()
    p = ctx.Process(target=target, args=(out, triple))
    p.start()
    print('process-target', out.get(timeout=30))
    p.join()
    p = ctx.Process(target=lambda q: q.put(('lambda', 1)), args=(out,))
    p.start()
    print('process-lambda', out.get(timeout=30))
    p.join()

    for kind in ('Queue', 'SimpleQueue'):
        q = getattr(ctx, kind)()
        p = ctx.Process(target=get_call_put, args=(q, out))
        p.start()
        q.put(triple)
        print(kind, out.get(timeout=30))
        p.join()
    a, b = ctx.Pipe()
    p = ctx.Process(target=recv_call_send, args=(b,))
    p.start()
    a.send(make_adder(10))
    print('Pipe', a.recv())
    p.join()

    # The rule for queues and pipes: by value when they belong to a spawn or forkserver
    # context, by reference (the very object comes back) under fork.
    q = ctx.SimpleQueue()
    q.put(triple)
    a.send(triple)
    print('same', q.get() is triple, b.recv() is triple)
""")

EXPECTED = {
    'map': "[0, 3, 6, 9, 12]",
    'chunks': "[51, 54, 57]",
    'apply': "12 5 -4",
    'imap': "[2, 3, 4] [0, 3, 6, 9, 12, 15]",
    'init': "['ready', 'ready']",
    'class': "True 7",
    'argument': "1",
    'process-target': "('target', 15)",
    'process-lambda': "('lambda', 1)",
    'Queue': "6",
    'SimpleQueue': "6",
    'Pipe': "12",
}


def check_interactive_output(r, method):
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(' ', 1) for line in r.stdout.splitlines())
    for key, value in EXPECTED.items():
        assert lines[key] == value, (key, r.stdout, r.stderr)
    assert lines['same'] == ("True True" if method == 'fork' else "False False")


@pytest.mark.timeout(120)
def test_interactive_main_python_c(start_method_name):
    r = _helpers.run_script(['-c', INTERACTIVE, start_method_name], timeout=100)
    check_interactive_output(r, start_method_name)


@pytest.mark.timeout(120)
def test_interactive_main_stdin(start_method_name):
    r = _helpers.run_script(['-', start_method_name], timeout=100, input=INTERACTIVE)
    check_interactive_output(r, start_method_name)
