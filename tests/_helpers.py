"""Child-process targets and small utilities shared by the test modules.

Everything a child runs is defined here at module level, so it pickles by reference
under spawn and forkserver; the module imports nothing heavy (no pytest), which keeps a
spawn child's start cheap. Functions that must behave the same under ferromp and the
stdlib take the module name (``'ferromp'`` or ``'multiprocessing'``) and import it.
"""

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time

import ferromp

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# The directory ferromp was imported from, so child interpreters import the same copy.
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ferromp.__file__)))

# Every start method, in the order the fixtures of conftest.py parametrise over them.
START_METHODS = ("fork", "spawn", "forkserver")
# Pools a test module shares between its tests: conftest's reaper spares their workers
# (killed after each test, a spawn pool's replacements would keep failing to start).
SHARED_POOLS = []

STOP = "__stop__"
STOP_BYTES = b"__stop__"


def mp_module(name):
    return importlib.import_module(name)


def lib_name(ctx):
    """'ferromp' or 'multiprocessing': the package a context object belongs to."""
    return type(ctx).__module__.split(".")[0]


def outcome(fn, *args, **kwargs):
    """Call ``fn``; return ``('ok', result)`` or ``(exception type, message)``, so the
    outcome of the same call on ferromp and on the stdlib can be compared with ==."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as e:
        return (type(e), str(e))


def wait_for(predicate, timeout, interval=0.02):
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def run_to_completion(ctx, target, *args, timeout=60):
    """Run ``target(*args)`` in a child of ``ctx``; assert it exits 0 (killed if it
    has not ended after ``timeout`` seconds). Returns the Process."""
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join(5)
    assert p.exitcode == 0
    return p


def pid_gone(pid):
    """True if ``pid`` no longer runs: absent, or a zombie nobody has reaped yet (an
    orphan is reparented to init or a subreaper, which may reap it late)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split()[1] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True
    return False


def sleeping(pid):
    """True while process ``pid`` sleeps in a blocking call (state S in /proc/pid/stat),
    as a child does once it waits in a blocking get, put or acquire."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] == "S"


def child_env():
    """Environment for a helper interpreter: ferromp and ``_helpers`` importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, PKG_ROOT, env.get("PYTHONPATH")) if p)
    return env


def run_script(args, timeout=60, input=None, **kwargs):
    """Run ``[sys.executable] + args`` in its own session, ``input`` on its stdin; on
    timeout kill the whole process group (a fork bomb must not outlive the test) and
    raise."""
    proc = subprocess.Popen([sys.executable] + list(args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            stdin=subprocess.PIPE if input is not None else None,
                            env=kwargs.pop("env", None) or child_env(), **kwargs)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        # Whatever the script left behind in its process group goes too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@contextlib.contextmanager
def child_peer(ctx, target, stop):
    """A child running ``target(conn)`` on one end of a duplex Pipe; yields our end.
    On leaving, sends ``stop`` and checks that the child exited with 0."""
    ours, theirs = ctx.Pipe()
    p = ctx.Process(target=target, args=(theirs,))
    p.start()
    theirs.close()
    try:
        yield ours
        if isinstance(stop, bytes):
            ours.send_bytes(stop)
        else:
            ours.send(stop)
        p.join(30)
        assert p.exitcode == 0, p.exitcode
    finally:
        ours.close()
        if p.is_alive():
            p.kill()
            p.join(5)


# --- plain targets ---------------------------------------------------------------------

def noop():
    pass


def exit_with(code):
    sys.exit(code)


def raise_value_error(msg):
    raise ValueError(msg)


def sleep_forever():
    while True:
        time.sleep(10)


def sleep_for(secs):
    time.sleep(secs)


def ready_then_sleep(conn):
    conn.send("ready")
    sleep_forever()


def ready_then_put_bytes(q, ready, nbytes):
    """Set the Event ``ready``, then put ``nbytes`` bytes on ``q`` (more than its ring
    holds: the put streams the message and blocks while nobody reads)."""
    data = b"z" * nbytes
    ready.set()
    q.put(data)


def ready_then_get(q, out, ready):
    """Set the Event ``ready``, then wait in ``q.get()``; put what came on ``out``."""
    ready.set()
    out.put(q.get())


def ready_then_produce(q, ready, tag, n):
    """Set the Event ``ready``, then put ``(tag, i)`` for i in range(n)."""
    ready.set()
    for i in range(n):
        q.put((tag, i))


def hold_then_exit(conn, secs):
    """Keep ``conn`` open without reading for ``secs`` seconds, then exit."""
    time.sleep(secs)


def send_value(conn, value):
    conn.send(value)


def send_args(conn, *args, **kwargs):
    conn.send((args, kwargs))


def with_stderr_to(path, func, *args):
    """Point fd 2 and ``sys.stderr`` at ``path``, then call ``func(*args)``: what the
    process machinery then writes to stderr (a traceback, a sys.exit message) lands
    in the file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    func(*args)


def with_stdout_to(path, func, *args):
    """Like with_stderr_to, for stdout, fully buffered: what ``func`` prints without
    flushing must still reach the file when the process exits."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=65536, closefd=False)
    func(*args)


def print_unflushed(text):
    print(text, end="")


def child_info(conn, mp_name):
    """Report what the child sees of itself and of its parent."""
    mp = mp_module(mp_name)
    me = mp.current_process()
    parent = mp.parent_process()
    conn.send({
        "pid": os.getpid(),
        "ident": me.ident,
        "name": me.name,
        "daemon": me.daemon,
        "authkey": bytes(me.authkey),
        "parent_pid": parent.pid if parent is not None else None,
        "parent_name": parent.name if parent is not None else None,
        "parent_alive": parent.is_alive() if parent is not None else None,
        "n_active_children": len(mp.active_children()),
        "main_name": sys.modules["__main__"].__name__,
        "cwd": os.getcwd(),
        "argv": list(sys.argv),
        "tests_on_path": TESTS_DIR in sys.path,
        "stdin": outcome(sys.stdin.read),
    })


def report_start_method(conn, mp_name):
    conn.send(mp_module(mp_name).get_start_method())


def try_start_child(conn, mp_name, method):
    """Try to start a grandchild; report the outcome (a daemon may not have children)."""
    mp = mp_module(mp_name)
    p = mp.get_context(method).Process(target=noop)
    try:
        p.start()
    except BaseException as e:
        conn.send((type(e).__name__, str(e)))
        return
    p.join()
    conn.send(("ok", p.exitcode))


def echo(conn):
    """Send back every object received, until STOP."""
    while True:
        obj = conn.recv()
        if isinstance(obj, str) and obj == STOP:
            return
        conn.send(obj)


def echo_bytes(conn):
    """Send back every message received, byte for byte, until STOP_BYTES."""
    while True:
        msg = conn.recv_bytes()
        if msg == STOP_BYTES:
            return
        conn.send_bytes(msg)


def use_simplex(conn):
    """Use one end of a simplex Pipe in the child; exit 2 if its flags are wrong."""
    if conn.writable and not conn.readable:
        conn.send("from child")
    elif conn.readable and not conn.writable:
        sys.exit(0 if conn.recv() == "from parent" else 3)
    else:
        sys.exit(2)


def serve_connections(ctrl):
    """Receive Connections (or sockets) over ``ctrl`` from the parent (they were pickled
    after this process started, so they travel through the resource sharer) and use
    each once."""
    import socket
    while True:
        c = ctrl.recv()
        if isinstance(c, str) and c == STOP:
            return
        if isinstance(c, socket.socket):
            with c:
                c.sendall(b"echo:" + c.recv(100))
        else:
            msg = c.recv()
            c.send(("echo", msg, c.readable, c.writable))
            c.close()
        ctrl.send("done")


def recv_fd_and_use(conn, mp_name):
    """Receive an fd with recv_handle, read what the file holds, append to it."""
    reduction = importlib.import_module(mp_name + ".reduction")
    fd = reduction.recv_handle(conn)
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 1000)
    os.lseek(fd, 0, os.SEEK_END)
    os.write(fd, b"+child")
    os.close(fd)
    conn.send(data)


def client_child(address, authkey, mp_name, report):
    """Connect to a Listener; on success exchange one message, else report the error."""
    mp = mp_module(mp_name)
    connection = importlib.import_module(mp_name + ".connection")
    try:
        c = connection.Client(address, authkey=authkey)
    except Exception as e:
        std = importlib.import_module("multiprocessing")
        report.send(("error", type(e).__name__, str(e),
                     isinstance(e, std.AuthenticationError)))
        return
    with c:
        c.send(("hello from", mp.current_process().name))
        reply = c.recv()
    report.send(("ok", reply))


def orphan_watch(mp_name, path):
    """Non-daemonic child of a parent that will be SIGKILLed: note when the parent is
    seen dead (proof that this process outlived it), then exit."""
    mp = mp_module(mp_name)
    parent = mp.parent_process()
    with open(path, "a") as f:
        f.write("started alive=%s\n" % parent.is_alive())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not parent.is_alive():
            with open(path, "a") as f:
                f.write("parent-dead\n")
            return
        time.sleep(0.05)
    with open(path, "a") as f:
        f.write("timeout\n")


def mark_then_sleep(path):
    with open(path, "a") as f:
        f.write("started\n")
    sleep_forever()


# --- picklable classes -----------------------------------------------------------------

class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __eq__(self, other):
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)

    def __repr__(self):
        return "Point(%r, %r)" % (self.x, self.y)


class CustomError(Exception):
    pass


class Reduced:
    """A class that gets a custom reducer registered with ForkingPickler in a test."""

    def __init__(self, value, rebuilt=False):
        self.value = value
        self.rebuilt = rebuilt


def reduce_reduced(obj):
    return rebuild_reduced, (obj.value,)


def rebuild_reduced(value):
    return Reduced(value * 2, rebuilt=True)


class Greeter:
    """Its bound method is a Process target; the instance carries a Connection."""

    def __init__(self, conn, word):
        self.conn = conn
        self.word = word

    def greet(self, suffix):
        self.conn.send(self.word + suffix)


class Adder:
    def __init__(self, base):
        self.base = base

    def add(self, x):
        return self.base + x


class _RunReports:
    """Mixin for Process subclasses that override run()."""

    def __init__(self, conn, **kwargs):
        super().__init__(**kwargs)
        self.conn = conn

    def run(self):
        self.conn.send(("run", type(self).__name__, self.name))


class ForkWorker(_RunReports, ferromp.get_context("fork").Process):
    pass


class SpawnWorker(_RunReports, ferromp.get_context("spawn").Process):
    pass


class ForkServerWorker(_RunReports, ferromp.get_context("forkserver").Process):
    pass


WORKERS = {"fork": ForkWorker, "spawn": SpawnWorker, "forkserver": ForkServerWorker}


# --- functions that travel by value (test_cloudpickle.py) ------------------------------
# These receive a lambda or a closure from the parent and call it.

def call_and_put(fn, out, *args):
    out.put(fn(*args))


def get_call_put(inq, out):
    """Take a function from ``inq``; put what it returns for 3 on ``out``."""
    out.put(inq.get()(3))


def recv_call_send(conn):
    """Receive a function on ``conn``; send back what it returns for 3."""
    conn.send(conn.recv()(3))


def put_pickle_fallback(out):
    out.put(ferromp.get_pickle_fallback())


# Set by a pool initializer, read by the tasks.
STATE = {}


def state_of(key):
    return STATE.get(key)
