"""Tests for ferromp.reduction: objects of ours crossing a process boundary.

Connections passed as Process arguments travel with the child's start (the Popen
decides how: inherited under fork, passed fds under spawn/forkserver); Connections and
sockets pickled later travel through the resource sharer; send_handle/recv_handle
pass raw fds. The stdlib doing the same thing is the oracle, and where the wire
format is shared (SCM_RIGHTS messages) a ferromp end talks to a stdlib end.
"""

import functools
import io
import multiprocessing
import multiprocessing.reduction as std_reduction
import os
import pickle
import signal
import socket
import threading
import time

import pytest

import _helpers
from _helpers import child_peer, lib_name, outcome
from ferromp import connection, reduction

pytestmark = pytest.mark.timeout(60)


def both(ctx, std_ctx):
    return (ctx, std_ctx)


def reduction_of(ctx):
    return reduction if lib_name(ctx) == "ferromp" else std_reduction


def same_file(fd1, fd2):
    s1, s2 = os.fstat(fd1), os.fstat(fd2)
    return (s1.st_dev, s1.st_ino) == (s2.st_dev, s2.st_ino)


# --- Connections as Process arguments --------------------------------------------------

@pytest.mark.timeout(30)
def test_simplex_ends_as_process_arguments(start_method, std_ctx):
    results = {}
    for ctx in both(start_method, std_ctx):
        r, w = ctx.Pipe(duplex=False)
        writer_child = ctx.Process(target=_helpers.use_simplex, args=(w,))
        r2, w2 = ctx.Pipe(duplex=False)
        reader_child = ctx.Process(target=_helpers.use_simplex, args=(r2,))
        writer_child.start()
        reader_child.start()
        w.close()
        r2.close()
        got = r.recv()
        w2.send("from parent")
        writer_child.join(30)
        reader_child.join(30)
        results[lib_name(ctx)] = (got, writer_child.exitcode, reader_child.exitcode)
    assert results["ferromp"] == results["multiprocessing"] == ("from child", 0, 0)


@pytest.mark.timeout(30)
def test_duplex_end_as_process_argument(start_method):
    with child_peer(start_method, _helpers.echo, _helpers.STOP) as c:
        c.send(("round", "trip"))
        assert c.recv() == ("round", "trip")


# --- Connections and sockets pickled after the child started ---------------------------

@pytest.mark.timeout(30)
def test_connection_sent_to_running_process(start_method, std_ctx):
    results = {}
    for ctx in both(start_method, std_ctx):
        got = []
        with child_peer(ctx, _helpers.serve_connections, _helpers.STOP) as ctrl:
            for i in range(3):
                a, b = ctx.Pipe()
                ctrl.send(b)
                b.close()  # the sender may let go at once: the sharer holds a duplicate
                a.send(("msg", i))
                got.append(a.recv())
                got.append(ctrl.recv())
                a.close()
            s1, s2 = socket.socketpair()
            ctrl.send(s2)
            s2.close()
            s1.sendall(b"sock")
            got.append(s1.recv(100))
            got.append(ctrl.recv())
            s1.close()
        results[lib_name(ctx)] = got
    expected = []
    for i in range(3):
        expected += [("echo", ("msg", i), True, True), "done"]
    expected += [b"echo:sock", "done"]
    assert results["ferromp"] == results["multiprocessing"] == expected


def test_connection_pickled_outside_process_start(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        pickler = reduction_of(ctx).ForkingPickler
        a, b = ctx.Pipe()
        data = pickler.dumps(b)
        b2 = pickler.loads(data)
        assert b2.fileno() != b.fileno()
        assert same_file(b2.fileno(), b.fileno())
        assert (b2.readable, b2.writable) == (True, True)
        a.send("via the copy")
        assert b2.recv() == "via the copy"
        for c in (a, b, b2):
            c.close()


def test_dupfd_outside_process_start(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        r, w = os.pipe()
        try:
            df = reduction_of(ctx).DupFd(w)
            new = df.detach()
            assert new not in (r, w) and same_file(new, w)
            os.write(new, b"x")
            assert os.read(r, 1) == b"x"
            os.close(new)
        finally:
            os.close(r)
            os.close(w)


# --- send_handle / recv_handle ---------------------------------------------------------

@pytest.mark.timeout(30)
def test_send_handle_to_child(start_method, std_ctx, tmp_path):
    results = {}
    for ctx in both(start_method, std_ctx):
        lib = lib_name(ctx)
        path = tmp_path / (lib + ".dat")
        path.write_bytes(b"parent data")
        fd = os.open(path, os.O_RDWR)
        try:
            a, b = ctx.Pipe()
            p = ctx.Process(target=_helpers.recv_fd_and_use, args=(b, lib))
            p.start()
            reduction_of(ctx).send_handle(a, fd, p.pid)
            got = a.recv()
            p.join(30)
            results[lib] = (got, p.exitcode, path.read_bytes())
        finally:
            os.close(fd)
    assert results["ferromp"] == results["multiprocessing"] == (
        b"parent data", 0, b"parent data+child")


@pytest.mark.parametrize("sender,receiver", [
    (reduction, std_reduction), (std_reduction, reduction), (reduction, reduction)],
    ids=["ours-to-std", "std-to-ours", "ours-to-ours"])
def test_send_handle_in_process_interop(start_method, sender, receiver):
    s1, s2 = socket.socketpair()
    c1 = connection.Connection(s1.detach())
    c2 = multiprocessing.connection.Connection(s2.detach())
    r, w = os.pipe()
    try:
        sender.send_handle(c1 if sender is reduction else c2, w, os.getpid())
        got = receiver.recv_handle(c2 if sender is reduction else c1)
        assert got not in (r, w) and same_file(got, w)
        os.write(got, b"y")
        assert os.read(r, 1) == b"y"
        os.close(got)
        # The connection carries ordinary messages afterwards.
        c1.send("still framed")
        assert c2.recv() == "still framed"
    finally:
        c1.close()
        c2.close()
        os.close(r)
        os.close(w)


def send_handle_after(conn, fd, delay, done):
    """Unless ``done`` is set within ``delay`` s, send ``fd`` over ``conn``."""
    if not done.wait(delay):
        std_reduction.send_handle(conn, fd, os.getpid())


@pytest.mark.timeout(30)
def test_recv_handle_interrupted_by_sigint(start_method, std_ctx):
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.main_thread().ident
    try:
        for ctx in both(std_ctx, start_method):
            a, b = ctx.Pipe()
            r, w = os.pipe()
            done = threading.Event()
            # Safety valve: should recv_handle ignore the signal, an fd arrives after
            # 2.5 s, so the test fails on time instead of hanging.
            rescue = threading.Thread(target=send_handle_after, args=(a, w, 2.5, done))
            interrupt = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
            rescue.start()
            interrupt.start()
            t0 = time.monotonic()
            try:
                with pytest.raises(KeyboardInterrupt):
                    fd = reduction_of(ctx).recv_handle(b)
                    os.close(fd)
            finally:
                elapsed = time.monotonic() - t0
                done.set()
                interrupt.cancel()
                interrupt.join()
                rescue.join()
                for x in (a, b):
                    x.close()
                os.close(r)
                os.close(w)
            assert elapsed < 2.0, (lib_name(ctx), elapsed)
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("ours_send", [True, False])
def test_sendfds_recvfds_interop(start_method, ours_send):
    sender, receiver = (reduction, std_reduction) if ours_send else (std_reduction, reduction)
    s1, s2 = socket.socketpair()
    pipes = [os.pipe() for _ in range(3)]
    try:
        sender.sendfds(s1, [w for _, w in pipes])
        fds = receiver.recvfds(s2, 3)
        assert len(fds) == 3
        for fd, (_, w) in zip(fds, pipes):
            assert same_file(fd, w)
            os.close(fd)
    finally:
        s1.close()
        s2.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)


# --- ForkingPickler --------------------------------------------------------------------

@pytest.fixture
def reduced_registered():
    """Register the custom reducer for _helpers.Reduced with both ForkingPicklers."""
    for lib in (reduction, std_reduction):
        lib.ForkingPickler.register(_helpers.Reduced, _helpers.reduce_reduced)
    yield
    for lib in (reduction, std_reduction):
        lib.ForkingPickler._extra_reducers.pop(_helpers.Reduced, None)


def test_register_custom_reducer(start_method, std_ctx, reduced_registered):
    for ctx in both(start_method, std_ctx):
        red = reduction_of(ctx)
        obj = red.ForkingPickler.loads(red.ForkingPickler.dumps(_helpers.Reduced(21)))
        assert (type(obj), obj.value, obj.rebuilt) == (_helpers.Reduced, 42, True)
        buf = io.BytesIO()
        red.dump(_helpers.Reduced(1), buf)
        obj = pickle.loads(buf.getvalue())
        assert (obj.value, obj.rebuilt) == (2, True)
        # The plain pickler is not affected.
        obj = pickle.loads(pickle.dumps(_helpers.Reduced(21)))
        assert (obj.value, obj.rebuilt) == (21, False)
        # Connection.send pickles with ForkingPickler.
        a, b = ctx.Pipe()
        a.send(_helpers.Reduced(5))
        obj = b.recv()
        assert (obj.value, obj.rebuilt) == (10, True)
    assert type(reduction.ForkingPickler.dumps(1)) is type(std_reduction.ForkingPickler.dumps(1))


@pytest.mark.timeout(30)
def test_custom_reducer_through_child(start_method, std_ctx, reduced_registered):
    # Reduced once on the way out; on the way back only a forked child (which inherits
    # the registration) reduces it again. The stdlib shows which.
    results = {}
    for ctx in both(start_method, std_ctx):
        with child_peer(ctx, _helpers.echo, _helpers.STOP) as c:
            c.send(_helpers.Reduced(3))
            obj = c.recv()
        results[lib_name(ctx)] = (obj.value, obj.rebuilt)
    assert results["ferromp"] == results["multiprocessing"]
    expected = 12 if start_method.get_start_method() == "fork" else 6
    assert results["ferromp"] == (expected, True)


def test_bound_methods_partials_and_descriptors(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        pickler = reduction_of(ctx).ForkingPickler
        add = pickler.loads(pickler.dumps(_helpers.Adder(5).add))
        assert add(3) == 8
        part = pickler.loads(pickler.dumps(functools.partial(_helpers.Adder(1).add, 2)))
        assert isinstance(part, functools.partial) and part() == 3
        part = pickler.loads(pickler.dumps(functools.partial(pow, 2, mod=1000)))
        assert part(10) == 24
        assert pickler.loads(pickler.dumps(list.append)) is list.append
        assert pickler.loads(pickler.dumps(int.__add__)) is int.__add__
        assert pickler.loads(pickler.dumps([].append)).__name__ == "append"


@pytest.mark.timeout(30)
def test_bound_method_and_partial_as_targets(start_method, std_ctx):
    results = {}
    for ctx in both(start_method, std_ctx):
        r, w = ctx.Pipe(duplex=False)
        procs = [ctx.Process(target=_helpers.Greeter(w, "hi").greet, args=("!",)),
                 ctx.Process(target=functools.partial(_helpers.send_value, w, "partial"))]
        got = []
        for p in procs:
            p.start()
            got.append(r.recv())
            p.join(30)
            got.append(p.exitcode)
        results[lib_name(ctx)] = got
    assert results["ferromp"] == results["multiprocessing"] == ["hi!", 0, "partial", 0]


def test_authkey_refuses_pickling_outside_spawn(start_method, std_ctx):
    import ferromp

    ours = outcome(pickle.dumps, ferromp.current_process().authkey)
    theirs = outcome(pickle.dumps, multiprocessing.current_process().authkey)
    assert ours == theirs == (
        TypeError, "Pickling an AuthenticationString object is disallowed for security "
                   "reasons")
    ours = outcome(reduction.ForkingPickler.dumps, ferromp.current_process().authkey)
    assert ours[0] is TypeError
