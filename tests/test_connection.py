"""Tests for ferromp.connection: Pipe, Connection, wait(), Listener and Client.

Each test takes the ``start_method`` fixture (a ferromp context) and ``std_ctx`` (the
stdlib context of the same method) and does the same with both: the stdlib is the
oracle for return values, exception types and messages. Tests that need a peer
process reuse one echo child for many round trips, since a spawn child costs ~50 ms.
Wire compatibility is checked by putting a ferromp Connection and a stdlib one on the
two ends of one pipe or socketpair, and by writing frames by hand with os.write.
"""

import array
import contextlib
import functools
import gc
import multiprocessing
import multiprocessing.connection as std_connection
import os
import pickle
import random
import signal
import socket
import stat
import struct
import threading
import time

import pytest

import _helpers
from _helpers import Point, child_peer, lib_name, outcome
from ferromp import connection

pytestmark = pytest.mark.timeout(60)

BufferTooShort = multiprocessing.BufferTooShort
AuthenticationError = multiprocessing.AuthenticationError

OBJECTS = [
    None, True, False, 0, 1, -1, 2 ** 31, 2 ** 63 + 1, -(2 ** 64), 10 ** 100,
    0.0, -1.5, float("inf"), 1e308, 5e-324, complex(1, -2),
    "", "ascii", "ünïcødé ☃ 𝄞 \x00", b"", b"\x00\xff" * 10, bytearray(b"abc"),
    [], [1, [2, [3, [4]]]], (), (1, "a", None), {}, {"a": 1, 2: [3], (4,): {5: 6}},
    set(), {1, 2, 3}, frozenset({"x", "y"}), range(3, 30, 3), slice(1, 2),
    Point(1, 2), {"nested": [(1, {2: Point(3, [4, {"five": (6,)}])})]},
    _helpers.CustomError("bad", 3), ValueError("v"), KeyError("k"), StopIteration(7),
    b"x" * (1 << 20), ["y" * 1000] * 100,
]

SIZES = [0, 1, 16383, 16384, 16385, 65535, 65536, 65537, 1 << 20, 64 << 20]


def same(a, b):
    """Equality that also holds for exceptions (compared by type and args)."""
    if isinstance(a, BaseException):
        return type(a) is type(b) and a.args == b.args
    return type(a) is type(b) and a == b


def both(ctx, std_ctx):
    return (ctx, std_ctx)


def payload(n, seed=0):
    return random.Random(seed + n).randbytes(n)


def raw_pipe_pair(ours_reads):
    """A ferromp and a stdlib Connection on the two ends of one os.pipe()."""
    r, w = os.pipe()
    if ours_reads:
        return (connection.Connection(r, writable=False),
                std_connection.Connection(w, readable=False))
    return (std_connection.Connection(r, writable=False),
            connection.Connection(w, readable=False))


def in_thread(fn, *args):
    """Run ``fn`` in a thread; returns a function that joins it and returns its outcome."""
    box = {}

    def run():
        try:
            box["result"] = ("ok", fn(*args))
        except BaseException as e:
            box["result"] = (type(e), str(e), e)

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join(timeout=30):
        t.join(timeout)
        assert not t.is_alive(), "thread did not finish"
        return box["result"]
    return join


# --- Pipe basics -----------------------------------------------------------------------

def test_duplex_pipe_flags_and_fileno(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        a, b = ctx.Pipe()
        assert (a.readable, a.writable, b.readable, b.writable) == (True,) * 4
        assert not a.closed
        assert isinstance(a.fileno(), int) and a.fileno() != b.fileno()
        assert stat.S_ISSOCK(os.fstat(a.fileno()).st_mode)
        a.send("ping")
        assert b.recv() == "ping"
        b.send("pong")
        assert a.recv() == "pong"
        a.close()
        b.close()


def test_simplex_pipe_flags_and_errors(start_method, std_ctx):
    results = []
    for ctx in both(start_method, std_ctx):
        r, w = ctx.Pipe(duplex=False)
        assert (r.readable, r.writable, w.readable, w.writable) == (True, False, False, True)
        assert stat.S_ISFIFO(os.fstat(r.fileno()).st_mode)
        w.send("one way")
        assert r.recv() == "one way"
        results.append([outcome(r.send, 1), outcome(r.send_bytes, b"x"),
                        outcome(w.recv), outcome(w.recv_bytes), outcome(w.poll),
                        outcome(w.recv_bytes_into, bytearray(4))])
        r.close()
        w.close()
    assert results[0] == results[1]
    ro, wo = (OSError, "connection is read-only"), (OSError, "connection is write-only")
    assert results[0] == [ro, ro, wo, wo, wo, wo]


def test_connection_constructor_errors(start_method, std_ctx):
    r, w = os.pipe()
    try:
        for args in [(-1,), (r, False, False)]:
            ours = outcome(connection.Connection, *args)
            assert ours == outcome(std_connection.Connection, *args)
            assert ours[0] is ValueError
        c = connection.Connection(r, writable=False)
        assert c.fileno() == r
        c.close()
    finally:
        os.close(w)


def test_send_recv_objects_in_process(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        a, b = ctx.Pipe()
        for obj in OBJECTS:
            for sender, receiver in ((a, b), (b, a)):
                # Send from a thread: the big objects do not fit in the socket buffer.
                join = in_thread(sender.send, obj)
                assert same(receiver.recv(), obj), (lib_name(ctx), obj)
                assert join() == ("ok", None)
        a.close()
        b.close()


def test_unpicklable_object_raises_at_send(start_method, std_ctx):
    # A lambda alone would go by value (cloudpickle); not the lock it holds.
    lock = threading.Lock()
    unpicklable = lambda: lock  # noqa: E731
    for ctx in both(start_method, std_ctx):
        a, b = ctx.Pipe()
        with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
            a.send(unpicklable)
        # Nothing was written: the stream is still in sync.
        assert not b.poll(0)
        a.send("after")
        assert b.recv() == "after"


@pytest.mark.timeout(60)
def test_objects_round_trip_through_child(start_method):
    with child_peer(start_method, _helpers.echo, _helpers.STOP) as c:
        for obj in OBJECTS:
            c.send(obj)
            assert same(c.recv(), obj), obj


@pytest.mark.timeout(90)
def test_sizes_round_trip_through_child(start_method):
    with child_peer(start_method, _helpers.echo_bytes, _helpers.STOP_BYTES) as c:
        for n in SIZES:
            data = payload(n)
            c.send_bytes(data)
            got = c.recv_bytes()
            assert len(got) == n and got == data, n
        # Pickled objects of the big sizes too (the large path of send()).
        for n in (65537, 1 << 20):
            data = payload(n, seed=1)
            c.send_bytes(data)
            assert c.recv_bytes() == data
        # send_bytes with offset/size through the child.
        c.send_bytes(b"0123456789", 2, 5)
        assert c.recv_bytes() == b"23456"
        buf = bytearray(32)
        c.send_bytes(b"abcdef")
        assert c.recv_bytes_into(buf, 3) == 6
        assert bytes(buf[3:9]) == b"abcdef"


@pytest.mark.timeout(60)
def test_many_small_round_trips_through_child(start_method):
    with child_peer(start_method, _helpers.echo, _helpers.STOP) as c:
        for i in range(2000):
            c.send(i)
            assert c.recv() == i


# --- send_bytes / recv_bytes / recv_bytes_into -----------------------------------------

SEND_BYTES_CASES = [
    ((b"abcdef",), b"abcdef"),
    ((b"abcdef", 2), b"cdef"),
    ((b"abcdef", 1, 2), b"bc"),
    ((b"abc", 3), b""),
    ((b"abc", 0, 0), b""),
    ((bytearray(b"xyz"), 1), b"yz"),
    ((memoryview(b"hello world")[6:],), b"world"),
    ((array.array("i", [1, 2, 3]), 4, 4), array.array("i", [2]).tobytes()),
    ((array.array("d", [1.5]),), array.array("d", [1.5]).tobytes()),
    ((b"abcdef", -1), (ValueError, "offset is negative")),
    ((b"abc", 4), (ValueError, "buffer length < offset")),
    ((b"abc", 1, -1), (ValueError, "size is negative")),
    ((b"abc", 1, 3), (ValueError, "buffer length < offset + size")),
    ((array.array("i", [1, 2]), 0, 9), (ValueError, "buffer length < offset + size")),
]


def test_send_bytes_offset_size(start_method, std_ctx):
    for args, expected in SEND_BYTES_CASES:
        got = []
        for ctx in both(start_method, std_ctx):
            a, b = ctx.Pipe()
            res = outcome(a.send_bytes, *args)
            if res[0] == "ok":
                res = b.recv_bytes()
            # A rejected send wrote nothing.
            assert not b.poll(0)
            got.append(res)
        assert got[0] == got[1] == expected, args


def test_recv_bytes_maxlength(start_method, std_ctx):
    results = []
    for ctx in both(start_method, std_ctx):
        got = []
        a, b = ctx.Pipe()
        a.send_bytes(b"0123456789")
        got.append(outcome(b.recv_bytes, 10))
        got.append(outcome(b.recv_bytes, -1))
        a.send_bytes(b"0123456789")
        got.append(outcome(b.recv_bytes, 9))
        # The unread body spoils the read side; a duplex end may still send.
        got.append(outcome(b.recv_bytes))
        got.append(outcome(b.send_bytes, b"still"))
        got.append(outcome(a.recv_bytes))
        got.append(b.closed)
        r, w = ctx.Pipe(duplex=False)
        w.send_bytes(b"too long")
        got.append(outcome(r.recv_bytes, 3))
        got.append(r.closed)
        results.append(got)
    assert results[0] == results[1]
    assert results[0] == [
        ("ok", b"0123456789"), (ValueError, "negative maxlength"),
        (OSError, "bad message length"), (OSError, "connection is write-only"),
        ("ok", None), ("ok", b"still"), False,
        (OSError, "bad message length"), True,
    ]


def test_recv_bytes_into(start_method, std_ctx):
    results = []
    for ctx in both(start_method, std_ctx):
        got = []
        a, b = ctx.Pipe()
        buf = bytearray(10)
        a.send_bytes(b"abc")
        got.append(b.recv_bytes_into(buf))
        a.send_bytes(b"xyz")
        got.append(b.recv_bytes_into(buf, 5))
        a.send_bytes(b"1234567")
        got.append(b.recv_bytes_into(buf, 3))  # exactly fills the buffer
        got.append(bytes(buf))
        arr = array.array("i", [0] * 4)
        a.send_bytes(array.array("i", [7, 8]))
        got.append(b.recv_bytes_into(arr, 4))  # offset in bytes, result in bytes
        got.append(arr.tolist())
        a.send_bytes(b"")
        got.append(b.recv_bytes_into(bytearray(0)))
        got.append(outcome(b.recv_bytes_into, bytearray(4), -1))
        got.append(outcome(b.recv_bytes_into, bytearray(4), 5))
        # The ValueErrors above read nothing; the next message is intact.
        a.send_bytes(b"next")
        got.append(b.recv_bytes(4))
        results.append(got)
    assert results[0] == results[1]
    assert results[0] == [3, 3, 7, b"abc1234567", 8, [0, 7, 8, 0], 0,
                          (ValueError, "negative offset"), (ValueError, "offset too large"),
                          b"next"]


def test_recv_bytes_into_buffer_too_short(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        a, b = ctx.Pipe()
        msg = b"0123456789" * 3
        for args in [(bytearray(4),), (bytearray(40), 20)]:
            a.send_bytes(msg)
            with pytest.raises(BufferTooShort) as info:
                b.recv_bytes_into(*args)
            # The stdlib's class, carrying the whole message.
            assert type(info.value) is multiprocessing.BufferTooShort
            assert info.value.args[0] == msg
            # The message was consumed whole: the stream stays in sync.
            a.send_bytes(b"after")
            assert b.recv_bytes() == b"after"


# --- poll, EOF, close ------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_poll_timing(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        a, b = ctx.Pipe()
        t0 = time.monotonic()
        assert b.poll() is False
        assert b.poll(0) is False
        assert b.poll(-1) is False
        assert time.monotonic() - t0 < 0.2
        t0 = time.monotonic()
        assert b.poll(0.3) is False
        elapsed = time.monotonic() - t0
        assert 0.28 <= elapsed < 2.0, (lib_name(ctx), elapsed)
        a.send("data")
        t0 = time.monotonic()
        assert b.poll(5) is True
        assert b.poll(None) is True
        assert b.poll() is True
        assert time.monotonic() - t0 < 0.5
        assert b.recv() == "data"
        assert b.poll(0) is False
        # Data arriving during a poll wakes it up.
        threading.Timer(0.2, a.send, ("late",)).start()
        t0 = time.monotonic()
        assert b.poll(10) is True
        assert time.monotonic() - t0 < 3
        assert b.recv() == "late"
        # EOF counts as readable.
        a.close()
        t0 = time.monotonic()
        assert b.poll(5) is True
        assert b.poll(None) is True
        assert time.monotonic() - t0 < 0.5
        with pytest.raises(EOFError):
            b.recv()


def test_eof_when_peer_closes(start_method, std_ctx):
    results = []
    for ctx in both(start_method, std_ctx):
        got = []
        a, b = ctx.Pipe()
        a.send("last words")
        a.send_bytes(b"")
        a.close()
        got.append(b.recv())
        got.append(b.recv_bytes())
        got.append(outcome(b.recv))
        got.append(outcome(b.recv_bytes))
        got.append(outcome(b.recv_bytes_into, bytearray(8)))
        r, w = ctx.Pipe(duplex=False)
        w.close()
        got.append(outcome(r.recv))
        results.append(got)
    eof = (EOFError, "")
    assert results[0] == results[1] == ["last words", b"", eof, eof, eof, eof]


@pytest.mark.timeout(30)
def test_recv_from_dead_child_raises_eof(start_method, std_ctx):
    """A child that dies without answering wakes the parent's recv with EOFError."""
    results = {}
    for ctx in both(start_method, std_ctx):
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=_helpers.exit_with, args=(7,))
        p2 = ctx.Process(target=_helpers.send_value, args=(theirs, "only message"))
        p.start()
        p2.start()
        theirs.close()
        got = [ours.recv(), outcome(ours.recv), outcome(ours.poll, 0)]
        p.join(30)
        p2.join(30)
        results[lib_name(ctx)] = got + [p.exitcode, p2.exitcode]
        ours.close()
    assert results["ferromp"] == results["multiprocessing"] == [
        "only message", (EOFError, ""), ("ok", True), 7, 0]


def test_send_to_closed_peer_raises_broken_pipe(start_method, std_ctx):
    results = []
    for ctx in both(start_method, std_ctx):
        got = []
        for duplex in (True, False):
            a, b = ctx.Pipe(duplex)
            reader, writer = (a, b) if not duplex else (b, a)
            reader.close()
            got.append([outcome(writer.send, "x")[0], outcome(writer.send_bytes, b"y" * 300000)[0]])
            writer.close()
        results.append(got)
    assert results[0] == results[1] == [[BrokenPipeError] * 2] * 2


@pytest.mark.timeout(30)
def test_blocked_send_ends_when_child_dies(start_method, std_ctx):
    """A send blocked because the child does not read ends with an error when the
    child exits, instead of hanging."""
    for ctx in both(start_method, std_ctx):
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=_helpers.hold_then_exit, args=(theirs, 0.3))
        p.start()
        theirs.close()
        t0 = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            ours.send_bytes(payload(32 << 20))
        assert time.monotonic() - t0 < 10
        p.join(30)
        assert p.exitcode == 0
        ours.close()


def test_pipe_fds_are_not_inheritable(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        for duplex in (True, False):
            a, b = ctx.Pipe(duplex)
            assert not os.get_inheritable(a.fileno())
            assert not os.get_inheritable(b.fileno())
            a.close()
            b.close()


def test_operations_after_close(start_method, std_ctx):
    results = []
    for ctx in both(start_method, std_ctx):
        a, b = ctx.Pipe()
        a.close()
        a.close()  # closing twice is fine
        results.append([a.closed, outcome(a.send, 1), outcome(a.send_bytes, b"x"),
                        outcome(a.recv), outcome(a.recv_bytes),
                        outcome(a.recv_bytes_into, bytearray(2)), outcome(a.poll),
                        outcome(a.fileno)])
        b.close()
    closed = (OSError, "handle is closed")
    assert results[0] == results[1] == [True] + [closed] * 7


def test_context_manager_closes(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        a, b = ctx.Pipe()
        with a as entered:
            assert entered is a
            a.send("inside")
        assert a.closed
        assert b.recv() == "inside"
        with pytest.raises(EOFError):
            b.recv()
        with b:
            pass
        assert b.closed


# --- wire compatibility with the stdlib ------------------------------------------------

@pytest.mark.parametrize("ours_reads", [True, False], ids=["std-to-ours", "ours-to-std"])
def test_interop_over_os_pipe(start_method, ours_reads):
    reader, writer = raw_pipe_pair(ours_reads)
    with reader, writer:
        for obj in OBJECTS:
            join = in_thread(writer.send, obj)
            assert same(reader.recv(), obj), obj
            assert join() == ("ok", None)
        for n in (0, 1, 16384, 65537, 1 << 20):
            data = payload(n)
            join = in_thread(writer.send_bytes, data)
            assert reader.recv_bytes() == data, n
            assert join() == ("ok", None)


@pytest.mark.parametrize("ours_first", [True, False])
def test_interop_over_socketpair(start_method, ours_first):
    s1, s2 = socket.socketpair()
    ours = connection.Connection(s1.detach())
    theirs = std_connection.Connection(s2.detach())
    with ours, theirs:
        pairs = [(ours, theirs), (theirs, ours)]
        if not ours_first:
            pairs.reverse()
        for sender, receiver in pairs:
            for obj in OBJECTS:
                join = in_thread(sender.send, obj)
                assert same(receiver.recv(), obj), obj
                assert join() == ("ok", None)
            for n in (0, 65537, 4 << 20):
                data = payload(n)
                join = in_thread(sender.send_bytes, data)
                assert receiver.recv_bytes() == data
                assert join() == ("ok", None)
            buf = bytearray(8)
            sender.send_bytes(b"12345")
            assert receiver.recv_bytes_into(buf, 2) == 5 and bytes(buf) == b"\0\x0012345\0"


def test_hand_written_long_header_is_parsed(start_method):
    # Bodies over 2 GiB are announced by -1 and an 8-byte length: too big to send in
    # a test, so write a small body announced the long way, by hand.
    for lib in (connection, std_connection):
        r, w = os.pipe()
        with lib.Connection(r, writable=False) as c:
            os.write(w, struct.pack("!i", -1) + struct.pack("!Q", 5) + b"hello")
            assert c.recv_bytes() == b"hello"
            body = pickle.dumps({"long": "header"})
            os.write(w, struct.pack("!i", -1) + struct.pack("!Q", len(body)) + body)
            assert c.recv() == {"long": "header"}
            os.write(w, struct.pack("!i", 3) + b"abc")  # short header still fine after
            assert c.recv_bytes() == b"abc"
            os.write(w, struct.pack("!i", -1) + struct.pack("!Q", 50) + b"x" * 50)
            assert outcome(c.recv_bytes, 10) == (OSError, "bad message length")
        os.close(w)


@pytest.mark.parametrize("frame", [
    struct.pack("!i", 100) + b"x" * 10,           # body cut short
    b"\x00\x00",                                  # header cut short
    struct.pack("!i", -1) + b"\x00\x00\x00",      # long header cut short
    struct.pack("!i", -1) + struct.pack("!Q", 10) + b"abc",
], ids=["body", "header", "long-header", "long-body"])
def test_truncated_frame_raises_oserror(start_method, frame):
    results = []
    for lib in (connection, std_connection):
        r, w = os.pipe()
        c = lib.Connection(r, writable=False)
        os.write(w, frame)
        os.close(w)
        results.append(outcome(c.recv_bytes))
        c.close()
    assert results[0] == results[1] == (OSError, "got end of file during message")


@pytest.mark.parametrize("length", [-2, -5, -(2 ** 31)])
def test_garbage_header_raises_oserror(start_method, length):
    # The stdlib returns b'' here and leaves the stream out of step; ferromp promises
    # a clear error instead (DESIGN: a malformed frame raises, never desynchronises).
    a, b = start_method.Pipe()
    os.write(a.fileno(), struct.pack("!i", length) + b"junk")
    with pytest.raises(OSError):
        b.recv_bytes()
    # The interpreter and the connection object are still fine.
    b.close()
    a.close()


# --- wait() ----------------------------------------------------------------------------

def test_wait_over_connections(start_method, std_ctx):
    for ctx, wait in [(start_method, connection.wait), (std_ctx, std_connection.wait)]:
        (a1, b1), (a2, b2) = ctx.Pipe(), ctx.Pipe(duplex=False)
        t0 = time.monotonic()
        assert wait([b1, a2], timeout=0) == []
        assert wait([b1, a2], timeout=0.3) == []
        elapsed = time.monotonic() - t0
        assert 0.28 <= elapsed < 2.0, elapsed
        assert wait([b1], timeout=-1) == []
        b2.send("x")
        assert wait([b1, a2], timeout=5) == [a2]
        a1.send("y")
        assert set(wait([b1, a2], timeout=5)) == {b1, a2}
        assert b1.recv() == "y" and a2.recv() == "x"
        # Data that arrives during the wait wakes it.
        threading.Timer(0.2, a1.send, ("late",)).start()
        assert wait([b1, a2], timeout=10) == [b1]
        assert b1.recv() == "late"
        # A closed peer (EOF) is ready.
        b2.close()
        assert wait([b1, a2], timeout=5) == [a2]
        assert wait([], timeout=0.05) == []
        b1.close()
        assert outcome(wait, [b1], 0) == (OSError, "handle is closed")


def test_wait_over_fds_sockets_and_mixed(start_method, std_ctx):
    a, b = start_method.Pipe()
    sa, sb = std_ctx.Pipe()
    r, w = os.pipe()
    s1, s2 = socket.socketpair()
    objs = [b, sb, r, s1]
    try:
        for wait in (connection.wait, std_connection.wait):
            assert wait(objs, timeout=0.05) == []
        os.write(w, b"!")
        s2.send(b"?")
        for wait in (connection.wait, std_connection.wait):
            assert set(wait(objs, timeout=5)) == {r, s1}
        sa.send("std")
        a.send("ours")
        for wait in (connection.wait, std_connection.wait):
            assert set(wait(objs, timeout=5)) == set(objs)
        assert b.recv() == "ours" and sb.recv() == "std"
        assert os.read(r, 1) == b"!" and s1.recv(1) == b"?"
        for wait in (connection.wait, std_connection.wait):
            assert wait(objs, timeout=0) == []
    finally:
        for x in (a, b, sa, sb, s1, s2):
            x.close()
        os.close(r)
        os.close(w)


# --- Ctrl-C and other signals ----------------------------------------------------------

def send_after(conn, delay, done):
    """Unless ``done`` is set within ``delay`` s, send a message on ``conn``."""
    if not done.wait(delay):
        conn.send("rescue")


def drain_after(conn, delay, done):
    """Unless ``done`` is set within ``delay`` s, read and discard what ``conn`` gets
    until it is."""
    if done.wait(delay):
        return
    while not done.is_set():
        if conn.poll(0.1):
            os.read(conn.fileno(), 1 << 20)


def write_with_signals(fd, frame, thread_id):
    """Write ``frame`` to ``fd`` slowly, sending SIGUSR1 to ``thread_id`` once before
    the first byte and three times in the middle of the message."""
    time.sleep(0.2)
    signal.pthread_kill(thread_id, signal.SIGUSR1)
    time.sleep(0.1)
    os.write(fd, frame[:1000])
    for _ in range(3):
        time.sleep(0.1)
        signal.pthread_kill(thread_id, signal.SIGUSR1)
    view = memoryview(frame)[1000:]
    while view:
        view = view[os.write(fd, view[:1 << 20]):]


@contextlib.contextmanager
def sigint_after(delay):
    """Deliver SIGINT to the main thread after ``delay`` seconds."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.main_thread().ident
    t = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
    t.start()
    try:
        yield
    finally:
        t.cancel()
        t.join()
        signal.signal(signal.SIGINT, old)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call", ["recv", "recv_bytes", "recv_bytes_into", "poll",
                                  "wait"])
def test_blocking_call_interrupted_by_sigint(start_method, std_ctx, call):
    for ctx, wait in [(start_method, connection.wait), (std_ctx, std_connection.wait)]:
        a, b = ctx.Pipe()
        fn = {"recv": b.recv, "recv_bytes": b.recv_bytes,
              "recv_bytes_into": functools.partial(b.recv_bytes_into, bytearray(10)),
              "poll": functools.partial(b.poll, None),
              "wait": functools.partial(wait, [b], None)}[call]
        # Safety valve: should the call ignore the signal, a message unblocks it after
        # 2.5 s, so the test fails on time instead of hanging.
        done = threading.Event()
        rescue = in_thread(send_after, a, 2.5, done)
        t0 = time.monotonic()
        try:
            with sigint_after(0.3):
                with pytest.raises(KeyboardInterrupt):
                    fn()
        finally:
            elapsed = time.monotonic() - t0
            done.set()
            rescue()
        assert 0.25 <= elapsed < 2.0, (lib_name(ctx), elapsed)
        # The connection still works afterwards.
        a.send("after")
        assert b.recv() == "after"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call", ["send", "send_bytes"])
def test_blocked_send_interrupted_by_sigint(start_method, std_ctx, call):
    """A send blocked on a full socket (nobody reads) is interrupted by Ctrl-C."""
    for ctx in both(std_ctx, start_method):
        a, b = ctx.Pipe()
        big = payload(32 << 20)
        done = threading.Event()
        # Safety valve: should the send ignore the signal, the other end is read after
        # 2.5 s so the send completes and the test fails (on time) instead of hanging.
        join = in_thread(drain_after, b, 2.5, done)
        t0 = time.monotonic()
        try:
            with sigint_after(0.3):
                with pytest.raises(KeyboardInterrupt):
                    getattr(a, call)(big)
        finally:
            elapsed = time.monotonic() - t0
            done.set()
            join()
        assert elapsed < 2.0, (lib_name(ctx), elapsed)
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_blocked_recv_survives_handled_signal(start_method, std_ctx):
    """A signal whose handler returns must not break a recv blocked before or in the
    middle of a message: the recv resumes and returns the whole message."""
    hits = []
    old = signal.signal(signal.SIGUSR1, lambda *args: hits.append(args[0]))
    main = threading.main_thread().ident
    try:
        for ctx in both(start_method, std_ctx):
            a, b = ctx.Pipe()
            body = payload(4 << 20)
            frame = struct.pack("!i", len(body)) + body

            del hits[:]
            join = in_thread(write_with_signals, a.fileno(), frame, main)
            got = b.recv_bytes()
            assert join() == ("ok", None)
            assert got == body, lib_name(ctx)
            assert len(hits) == 4
            a.send("next")
            assert b.recv() == "next"
    finally:
        signal.signal(signal.SIGUSR1, old)


# --- Listener and Client ---------------------------------------------------------------

FAMILIES = {"AF_UNIX": None, "AF_INET": ("127.0.0.1", 0)}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_listener_client_with_child(start_method, std_ctx, family):
    """A child process connects as a Client, with the right key and then a wrong one."""
    results = {}
    for ctx, lib in [(start_method, connection), (std_ctx, std_connection)]:
        name = lib_name(ctx)
        got = []
        with lib.Listener(FAMILIES[family], family=family, authkey=b"right") as listener:
            address = listener.address
            for key in (b"right", b"wrong"):
                rep_r, rep_w = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_helpers.client_child,
                                args=(address, key, name, rep_w), name="client")
                p.start()
                try:
                    with listener.accept() as c:
                        msg = c.recv()
                        c.send(("welcome", msg))
                    got.append(("accepted", msg))
                except AuthenticationError as e:
                    got.append(("refused", type(e), str(e)))
                got.append(rep_r.recv())
                p.join(30)
                got.append(p.exitcode)
        results[name] = got
    assert results["ferromp"] == results["multiprocessing"]
    assert results["ferromp"] == [
        ("accepted", ("hello from", "client")),
        ("ok", ("welcome", ("hello from", "client"))), 0,
        ("refused", AuthenticationError, "digest received was wrong"),
        ("error", "AuthenticationError", "digest sent was rejected", True), 0,
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_listener_address_and_last_accepted(start_method, family):
    results = []
    for lib in (connection, std_connection):
        listener = lib.Listener(FAMILIES[family], family=family)
        address = listener.address
        if family == "AF_UNIX":
            assert isinstance(address, str)
            assert stat.S_ISSOCK(os.stat(address).st_mode)
        else:
            assert address[0] == "127.0.0.1" and address[1] > 0
        assert listener.last_accepted is None
        join = in_thread(lib.Client, address)
        server_side = listener.accept()
        client_side = join()[1]
        last = listener.last_accepted
        client_side.send("hi")
        assert server_side.recv() == "hi"
        server_side.close()
        client_side.close()
        listener.close()
        if family == "AF_UNIX":
            assert not os.path.exists(address)
            results.append(last)
        else:
            assert last[0] == "127.0.0.1" and isinstance(last[1], int)
            results.append(type(last))
        listener.close()  # closing twice is fine
        results.append(outcome(listener.accept))
    assert results[0:2] == results[2:4]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("server", ["ours", "std"])
def test_interop_listener_client_authkey(start_method, family, server):
    """ferromp Client <-> stdlib Listener and the reverse, with right and wrong keys;
    a pure-stdlib pair is the oracle for what each side raises."""
    listener_lib, client_lib = ((connection, std_connection) if server == "ours"
                                else (std_connection, connection))
    results = []
    for llib, clib in [(listener_lib, client_lib), (std_connection, std_connection)]:
        got = []
        with llib.Listener(FAMILIES[family], family=family, authkey=b"key") as listener:
            for key in (b"key", b"other"):
                join = in_thread(clib.Client, listener.address, None, key)
                server_side = outcome(listener.accept)
                client_side = join()
                if server_side[0] == "ok":
                    s, c = server_side[1], client_side[1]
                    c.send(["from client", 1])
                    s.send(s.recv() + ["from server"])
                    got.append(c.recv())
                    s.close()
                    c.close()
                else:
                    got.append((server_side, client_side[:2],
                                isinstance(client_side[2], AuthenticationError)))
        results.append(got)
    assert results[0] == results[1]
    assert results[0] == [
        ["from client", 1, "from server"],
        ((AuthenticationError, "digest received was wrong"),
         (AuthenticationError, "digest sent was rejected"), True)]


def test_listener_abstract_unix_address(start_method):
    results = []
    for lib in (connection, std_connection):
        name = "\0ferromp-test-%d-%s" % (os.getpid(), lib.__name__)
        with lib.Listener(name) as listener:
            address = listener.address
            join = in_thread(lib.Client, address)
            with listener.accept() as server_side, join()[1] as client_side:
                client_side.send_bytes(b"abstract")
                results.append((address, server_side.recv_bytes()))
    assert results[0][1] == results[1][1] == b"abstract"
    assert type(results[0][0]) is type(results[1][0])
    assert results[0][0].startswith(b"\0" if isinstance(results[0][0], bytes) else "\0")


def test_garbage_collected_connection_closes_its_fd(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        a, b = ctx.Pipe()
        fd = a.fileno()
        del a
        gc.collect()
        with pytest.raises(OSError):
            os.fstat(fd)
        # The peer sees EOF.
        assert b.poll(5)
        with pytest.raises(EOFError):
            b.recv()
        b.close()


def test_listener_client_argument_errors(start_method):
    for lib in (connection, std_connection):
        assert outcome(lib.Listener, r"\\.\test") == (
            ValueError, "Family AF_PIPE is not recognized.")
        assert outcome(lib.Listener, authkey="text") == (
            TypeError, "authkey should be a byte string")
    bogus = [outcome(lib.Listener, ("127.0.0.1", 0), family="AF_BOGUS")
             for lib in (connection, std_connection)]
    assert bogus[0] == bogus[1]
    ours = outcome(connection.Client, "/nonexistent/ferromp-test.sock")
    theirs = outcome(std_connection.Client, "/nonexistent/ferromp-test.sock")
    assert ours == theirs and ours[0] is FileNotFoundError
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()  # bound but not listening: connecting is refused
        ours, theirs = outcome(connection.Client, free), outcome(std_connection.Client, free)
    assert ours == theirs and ours[0] is ConnectionRefusedError
    with connection.Listener() as listener:
        assert outcome(connection.Client, listener.address, authkey="text") == (
            TypeError, "authkey should be a byte string")
