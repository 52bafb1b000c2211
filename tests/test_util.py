"""Tests for ferromp.util, with the stdlib's multiprocessing.util as the oracle.

None of these need the Rust extension: the one function that does (spawnv_passfds) is
checked against a stand-in core, and against the real one only when it is built.
Anything that would close fds, touch stdin or run exit hooks runs in a fresh
interpreter, so the pytest process is left as it was.
"""

import atexit
import gc
import logging
import multiprocessing.util as std_util
import os
import pickle
import random
import subprocess
import sys
import textwrap
import threading
import time
import types
import weakref

import pytest

import ferromp
from ferromp import util

pytestmark = pytest.mark.timeout(30)

# Where ferromp was imported from, so child interpreters import the same copy.
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ferromp.__file__)))


def run_python(code, **kwargs):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=25, **kwargs)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


class Obj:
    """Something weak-referenceable."""


@pytest.fixture
def finalizers():
    """Give the test empty finalizer registries (ours and the stdlib's), then restore."""
    saved = [(mod, dict(mod._finalizer_registry)) for mod in (util, std_util)]
    for mod, _ in saved:
        mod._finalizer_registry.clear()
    yield
    gc.collect()
    for mod, entries in saved:
        mod._finalizer_registry.clear()
        mod._finalizer_registry.update(entries)


@pytest.fixture
def afterforkers():
    """Give the test an empty after-fork registry, then restore the real entries."""
    saved = dict(util._afterfork_registry.items())  # strong refs keep them alive
    util._afterfork_registry.clear()
    yield
    util._afterfork_registry.clear()
    util._afterfork_registry.update(saved)


# --- names -----------------------------------------------------------------------------

def test_all_matches_stdlib():
    assert util.__all__ == std_util.__all__
    for name in util.__all__:
        assert hasattr(util, name), name


@pytest.mark.parametrize("name", [
    "NOTSET", "SUBDEBUG", "DEBUG", "INFO", "SUBWARNING", "LOGGER_NAME",
    "DEFAULT_LOGGING_FORMAT", "abstract_sockets_supported", "is_abstract_socket_namespace",
    "arbitrary_address", "_afterfork_registry", "_afterfork_counter", "_run_after_forkers",
    "_finalizer_registry", "_finalizer_counter", "_run_finalizers", "_exiting",
    "_exit_function", "_logger", "_log_to_stderr", "_remove_temp_dir", "MAXFD",
    "_close_stdin", "_flush_std_streams", "close_fds", "spawnv_passfds", "_cleanup_tests",
    "_args_from_interpreter_flags",
])
def test_semi_private_name_exists(name):
    assert hasattr(util, name)


def test_constants_match_stdlib():
    for name in ("NOTSET", "SUBDEBUG", "DEBUG", "INFO", "SUBWARNING", "LOGGER_NAME",
                 "DEFAULT_LOGGING_FORMAT", "MAXFD", "abstract_sockets_supported"):
        assert getattr(util, name) == getattr(std_util, name), name


def test_args_from_interpreter_flags_matches_subprocess():
    # A wrapper (subprocess is imported lazily: spawn children should not pay for it)
    # that gives the same flags.
    assert util._args_from_interpreter_flags() == subprocess._args_from_interpreter_flags()


# --- logging ---------------------------------------------------------------------------

def test_get_logger_is_the_stdlib_named_logger():
    logger = util.get_logger()
    assert logger is logging.getLogger("multiprocessing")
    assert logger is std_util.get_logger()
    assert logger.name == util.LOGGER_NAME == "multiprocessing"
    assert not logger.propagate
    assert util.get_logger() is logger


def test_get_logger_moves_exit_hook_last(monkeypatch):
    calls = []
    monkeypatch.setattr(util, "_logger", None)
    monkeypatch.setattr(atexit, "unregister", lambda f: calls.append(("unregister", f)))
    monkeypatch.setattr(atexit, "register", lambda f: calls.append(("register", f)))
    util.get_logger()
    assert calls == [("unregister", util._exit_function), ("register", util._exit_function)]
    calls.clear()
    util.get_logger()  # already created: no re-registration
    assert calls == []


def test_log_helpers_are_silent_without_logger(monkeypatch):
    monkeypatch.setattr(util, "_logger", None)
    for helper in (util.sub_debug, util.debug, util.info, util.sub_warning):
        helper("nothing %s", "happens")


def test_log_helpers_use_their_levels():
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append((record.levelno, record.getMessage()))

    logger = util.get_logger()
    handler = Collect(level=1)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(1)
    try:
        util.sub_debug("a %d", 1)
        util.debug("b %d", 2)
        util.info("c %d", 3)
        util.sub_warning("d %d", 4)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert records == [(5, "a 1"), (10, "b 2"), (20, "c 3"), (25, "d 4")]


def test_log_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(util, "_log_to_stderr", False)
    logger = util.get_logger()
    old_level, old_handlers = logger.level, list(logger.handlers)
    try:
        returned = util.log_to_stderr(util.INFO)
        assert returned is logger
        assert util._log_to_stderr is True
        assert logger.level == util.INFO
        new = [h for h in logger.handlers if h not in old_handlers]
        assert len(new) == 1
        assert new[0].formatter._fmt == util.DEFAULT_LOGGING_FORMAT
        util.info("hello %s", "there")
        util.debug("below the level")
    finally:
        logger.handlers[:] = old_handlers
        logger.setLevel(old_level)
    err = capsys.readouterr().err
    assert "[INFO/" in err and "] hello there" in err
    assert "below the level" not in err


def test_log_to_stderr_without_level_keeps_level(monkeypatch):
    monkeypatch.setattr(util, "_log_to_stderr", False)
    logger = util.get_logger()
    old_level, old_handlers = logger.level, list(logger.handlers)
    logger.setLevel(33)
    try:
        util.log_to_stderr()
        assert logger.level == 33
    finally:
        logger.handlers[:] = old_handlers
        logger.setLevel(old_level)


# --- addresses and the temporary directory ---------------------------------------------

@pytest.mark.parametrize("address", [
    None, "", b"", "\0abstract", b"\0abstract", "/tmp/sock", b"/tmp/sock", "x", b"x",
])
def test_is_abstract_socket_namespace_matches_stdlib(address):
    assert (util.is_abstract_socket_namespace(address)
            == std_util.is_abstract_socket_namespace(address))


def test_is_abstract_socket_namespace_rejects_other_types():
    with pytest.raises(TypeError, match=r"address type of 42 unrecognized"):
        util.is_abstract_socket_namespace(42)


def test_arbitrary_address():
    assert util.arbitrary_address("AF_INET") == ("localhost", 0)
    unix = util.arbitrary_address("AF_UNIX")
    assert os.path.dirname(unix) == util.get_temp_dir()
    assert os.path.basename(unix).startswith("listener-")
    assert not os.path.exists(unix)
    assert util.arbitrary_address("AF_UNIX") != unix
    assert util.arbitrary_address("AF_PIPE").startswith("\\\\.\\pipe\\pyc-%d-" % os.getpid())
    with pytest.raises(ValueError, match="unrecognized family"):
        util.arbitrary_address("AF_BOGUS")


def test_get_temp_dir_lifecycle(finalizers):
    config = util.process.current_process()._config
    had_key, old = "tempdir" in config, config.get("tempdir")
    config["tempdir"] = None
    try:
        tempdir = util.get_temp_dir()
        assert os.path.isdir(tempdir)
        assert os.path.basename(tempdir).startswith("pymp-")
        assert config["tempdir"] == tempdir
        assert util.get_temp_dir() == tempdir  # created once per process
        # Removal is left to a priority -100 finalizer, i.e. after everything else.
        (finalizer,) = util._finalizer_registry.values()
        assert finalizer._key[0] == -100
        util._run_finalizers()
        assert not os.path.exists(tempdir)
        assert config["tempdir"] is None
    finally:
        if had_key:
            config["tempdir"] = old
        else:
            config.pop("tempdir", None)


def test_remove_temp_dir_tolerates_missing_dir(tmp_path):
    config = util.process.current_process()._config
    old = config.get("tempdir")
    try:
        util._remove_temp_dir(__import__("shutil").rmtree, str(tmp_path / "gone"))
        assert config["tempdir"] is None
    finally:
        config["tempdir"] = old


# --- Finalize --------------------------------------------------------------------------

def test_finalize_runs_when_object_dies(finalizers):
    calls = []
    obj = Obj()
    fin = util.Finalize(obj, calls.append, args=("dead",))
    assert fin.still_active()
    del obj
    gc.collect()
    assert calls == ["dead"]
    assert not fin.still_active()
    assert not util._finalizer_registry


def test_finalize_call_runs_once_and_returns_result(finalizers):
    calls = []
    obj = Obj()

    def callback(a, b=None):
        calls.append((a, b))
        return "result"

    fin = util.Finalize(obj, callback, args=(1,), kwargs={"b": 2})
    assert fin() == "result"
    assert fin() is None
    del obj
    gc.collect()
    assert calls == [(1, 2)]


def test_finalize_cancel(finalizers):
    calls = []
    obj = Obj()
    fin = util.Finalize(obj, calls.append, args=("x",), exitpriority=3)
    fin.cancel()
    assert not fin.still_active()
    fin.cancel()  # idempotent
    assert fin() is None
    util._run_finalizers()
    del obj
    gc.collect()
    assert calls == []


def test_finalize_releases_references_after_running(finalizers):
    payload = Obj()
    ref = weakref.ref(payload)
    fin = util.Finalize(None, lambda p: None, args=(payload,), exitpriority=0)
    del payload
    fin()
    gc.collect()
    assert ref() is None


def test_finalize_skips_callback_in_other_process(finalizers):
    calls = []
    fin = util.Finalize(None, calls.append, args=("x",), exitpriority=0)
    fin._pid = os.getpid() + 1  # as if inherited by a forked child
    assert fin() is None
    assert calls == []
    assert not fin.still_active()


@pytest.mark.parametrize("bad", ["1", 1.5, object()])
def test_finalize_bad_exitpriority_matches_stdlib(finalizers, bad):
    with pytest.raises(TypeError) as ours:
        util.Finalize(Obj(), print, exitpriority=bad)
    with pytest.raises(TypeError) as theirs:
        std_util.Finalize(Obj(), print, exitpriority=bad)
    assert str(ours.value) == str(theirs.value)


def test_finalize_without_object_needs_priority(finalizers):
    with pytest.raises(ValueError, match="^Without object, exitpriority cannot be None$"):
        util.Finalize(None, print)
    assert not util._finalizer_registry


def test_finalize_repr_matches_stdlib(finalizers):
    obj = Obj()
    cases = [
        dict(args=(), kwargs=None, exitpriority=None),
        dict(args=(1, "a"), kwargs={"k": 2}, exitpriority=7),
        dict(args=(), kwargs={"k": 2}, exitpriority=0),
    ]
    for case in cases:
        ours = util.Finalize(obj, print, **case)
        theirs = std_util.Finalize(obj, print, **case)
        assert repr(ours) == repr(theirs)
        ours.cancel()
        theirs.cancel()
        assert repr(ours) == repr(theirs) == "<Finalize object, dead>"
    ours = util.Finalize(None, print, exitpriority=1)
    theirs = std_util.Finalize(None, print, exitpriority=1)
    assert repr(ours) == repr(theirs)
    ours.cancel()
    theirs.cancel()


def _finalizer_scenario(mod):
    calls = []
    keep = []

    def add(tag, priority, with_object=True):
        obj = Obj() if with_object else None
        keep.append(obj)
        mod.Finalize(obj, calls.append, args=(tag,), exitpriority=priority)

    add("none", None)
    add("p0a", 0)
    add("p10a", 10)
    add("p0b", 0)
    add("m5", -5, with_object=False)
    add("p10b", 10)
    add("m100", -100, with_object=False)
    add("p3", 3)
    mod._run_finalizers(0)
    first = list(calls)
    mod._run_finalizers()
    return first, calls, dict(mod._finalizer_registry)


def test_run_finalizers_order_matches_stdlib(finalizers):
    ours = _finalizer_scenario(util)
    assert ours == _finalizer_scenario(std_util)
    first, every, left = ours
    assert first == ["p10b", "p10a", "p3", "p0b", "p0a"]
    assert every == first + ["m5", "m100"]
    assert left == {}  # a full run also drops the never-run (priority None) entries


def test_run_finalizers_reports_errors_and_continues(finalizers, capsys):
    calls = []

    def boom():
        raise RuntimeError("finalizer failed")

    util.Finalize(None, calls.append, args=("after",), exitpriority=1)
    util.Finalize(None, boom, exitpriority=2)
    util._run_finalizers()
    assert calls == ["after"]
    assert "RuntimeError: finalizer failed" in capsys.readouterr().err


def test_run_finalizers_is_thread_safe(finalizers):
    # bpo-24484: the GC and a second thread mutate the registry during a run.
    errors = []
    stop = threading.Event()

    class Cyclic:
        def __init__(self):
            self.me = self
            util.Finalize(self, lambda: None, exitpriority=random.randint(1, 100))

    def churn():
        held = {}
        while not stop.is_set():
            try:
                held[random.getrandbits(5)] = [Cyclic() for _ in range(10)]
            except Exception as e:
                errors.append(e)

    def run():
        while not stop.is_set():
            try:
                util._run_finalizers()
            except Exception as e:
                errors.append(e)
            time.sleep(random.random() * 0.005)

    old_interval = sys.getswitchinterval()
    old_threshold = gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(5, 5, 5)
    threads = [threading.Thread(target=churn) for _ in range(2)]
    threads += [threading.Thread(target=run) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old_interval)
        gc.set_threshold(*old_threshold)
    assert errors == []


# --- exit ------------------------------------------------------------------------------

def test_is_exiting(monkeypatch):
    monkeypatch.setattr(util, "_exiting", False)
    assert util.is_exiting() is False
    monkeypatch.setattr(util, "_exiting", True)
    assert util.is_exiting() is True
    monkeypatch.setattr(util, "_exiting", None)
    assert util.is_exiting() is True


class FakeChild:
    def __init__(self, name, daemon, events):
        self.name, self.daemon, self._events = name, daemon, events
        self._popen = types.SimpleNamespace(terminate=lambda: events.append(("terminate", name)))

    def join(self):
        self._events.append(("join", self.name))


def test_exit_function_sequence(monkeypatch, finalizers):
    events = []
    children = [FakeChild("d", True, events), FakeChild("n", False, events)]
    monkeypatch.setattr(util, "_exiting", False)
    monkeypatch.setattr(util.process, "active_children", lambda: list(children))
    util.Finalize(None, events.append, args=(("fin", 5),), exitpriority=5)
    util.Finalize(None, events.append, args=(("fin", 0),), exitpriority=0)
    util.Finalize(None, events.append, args=(("fin", -5),), exitpriority=-5)

    util._exit_function()
    assert events == [
        ("fin", 5), ("fin", 0),            # priority >= 0 first
        ("terminate", "d"),               # daemons are terminated...
        ("join", "d"), ("join", "n"),     # ...then every child is joined
        ("fin", -5),                      # then the rest
    ]
    assert util.is_exiting()
    events.clear()
    util._exit_function()  # runs once only
    assert events == []


def test_exit_function_without_current_process(monkeypatch, finalizers):
    events = []
    monkeypatch.setattr(util, "_exiting", False)
    monkeypatch.setattr(util.process, "current_process", lambda: None)
    monkeypatch.setattr(util.process, "active_children",
                        lambda: pytest.fail("children looked up without a process"))
    util.Finalize(None, events.append, args=("fin",), exitpriority=-1)
    util._exit_function()
    assert events == ["fin"]


EXIT_SCRIPT = """
    import gc, os, sys
    import {module} as util

    out = []

    class Foo:
        pass

    a = Foo()
    util.Finalize(a, out.append, args=('a',))
    del a
    gc.collect()
    b = Foo()
    close_b = util.Finalize(b, out.append, args=('b',))
    close_b()
    close_b()
    del b
    gc.collect()
    c = Foo()
    util.Finalize(c, out.append, args=('c',))
    d10 = Foo()
    util.Finalize(d10, out.append, args=('d10',), exitpriority=1)
    d01 = Foo()
    util.Finalize(d01, out.append, args=('d01',), exitpriority=0)
    d02 = Foo()
    util.Finalize(d02, out.append, args=('d02',), exitpriority=0)
    d03 = Foo()
    util.Finalize(d03, out.append, args=('d03',), exitpriority=0)
    util.Finalize(None, out.append, args=('e',), exitpriority=-10)
    util._exit_function()
    print(' '.join(out))
    sys.stdout.flush()
    os._exit(0)
"""


def test_exit_function_matches_stdlib_in_fresh_interpreter():
    ours = run_python(EXIT_SCRIPT.format(module="ferromp.util"))
    theirs = run_python(EXIT_SCRIPT.format(module="multiprocessing.util"))
    assert ours == theirs == "a b d10 d03 d02 d01 e\n"


def test_exit_function_runs_at_interpreter_exit():
    out = run_python("""
        from ferromp import util
        util.Finalize(None, print, args=("at exit",), exitpriority=0)
        print("main done")
    """)
    assert out == "main done\nat exit\n"


# --- after-fork hooks and fork-aware types ----------------------------------------------

def test_after_forkers_run_in_order_and_survive_errors(afterforkers, monkeypatch):
    calls = []
    a, b, c = Obj(), Obj(), Obj()

    def boom(obj):
        raise RuntimeError("bad hook")

    logged = []
    monkeypatch.setattr(util, "info", lambda msg, *args: logged.append(msg % args))
    util.register_after_fork(b, lambda obj: calls.append(("first", obj)))
    util.register_after_fork(a, boom)
    util.register_after_fork(c, lambda obj: calls.append(("third", obj)))
    util._run_after_forkers()
    assert calls == [("first", b), ("third", c)]
    assert logged == ["after forker raised exception bad hook"]


def test_after_fork_registry_holds_objects_weakly(afterforkers):
    calls = []
    obj = Obj()
    util.register_after_fork(obj, calls.append)
    assert len(util._afterfork_registry) == 1
    del obj
    gc.collect()
    assert len(util._afterfork_registry) == 0
    util._run_after_forkers()
    assert calls == []


def test_fork_aware_thread_lock(afterforkers):
    lock = util.ForkAwareThreadLock()
    assert len(util._afterfork_registry) == 1
    assert lock.acquire()
    assert not lock.acquire(False)
    lock.release()
    with lock:
        assert not lock.acquire(timeout=0.01)
    assert lock.acquire(False)
    # Held at "fork" time: the child must find it free, through the same methods.
    util._run_after_forkers()
    assert lock.acquire(False)
    lock.release()
    del lock
    gc.collect()
    assert len(util._afterfork_registry) == 0


def test_fork_aware_thread_lock_in_forked_child():
    # The real thing: a lock held by another thread of the parent when the child is made.
    out = run_python("""
        import os, threading
        from ferromp import util

        lock = util.ForkAwareThreadLock()
        held, release = threading.Event(), threading.Event()

        def holder():
            with lock:
                held.set()
                release.wait()

        t = threading.Thread(target=holder)
        t.start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            util._run_after_forkers()
            os._exit(0 if lock.acquire(timeout=5) else 1)
        _, status = os.waitpid(pid, 0)
        release.set()
        t.join()
        print(os.waitstatus_to_exitcode(status))
    """)
    assert out == "0\n"


def test_fork_aware_local(afterforkers):
    local = util.ForkAwareLocal()
    local.x = 1
    seen = []
    t = threading.Thread(target=lambda: seen.append(hasattr(local, "x")))
    t.start()
    t.join()
    assert seen == [False]  # still a thread-local
    util._run_after_forkers()
    assert not hasattr(local, "x")
    local.y = 2
    copy = pickle.loads(pickle.dumps(local))
    assert type(copy) is util.ForkAwareLocal
    assert not hasattr(copy, "y")


# --- fds and standard streams -----------------------------------------------------------

def test_close_all_fds_except_in_fresh_interpreter():
    out = run_python("""
        import os
        from ferromp import util

        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        # Kept fds 0, 1, 2 are adjacent and w1 repeats: the empty gaps between them
        # must not reach os.closerange (closerange(0, 0) closes everything on 3.11).
        util.close_all_fds_except([0, 1, 2, 2, w1, r2, w1])

        def is_open(fd):
            try:
                os.fstat(fd)
                return True
            except OSError:
                return False

        print([is_open(fd) for fd in (0, 1, 2, r1, w1, r2, w2)])
    """)
    assert out == "[True, True, True, False, True, True, False]\n"


@pytest.mark.skipif(sys.flags.optimize > 0, reason="assertions disabled")
def test_close_all_fds_except_rejects_fd_beyond_maxfd():
    with pytest.raises(AssertionError, match="fd too large"):
        util.close_all_fds_except([util.MAXFD + 1])


def test_close_fds():
    r, w = os.pipe()
    util.close_fds(r, w)
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)
    util.close_fds()  # nothing to do


def test_close_stdin_in_fresh_interpreter():
    out = run_python("""
        import sys
        from ferromp import util

        old = sys.stdin
        util._close_stdin()
        print(old.closed, sys.stdin is not old, repr(sys.stdin.read()))
        sys.stdin = None
        util._close_stdin()
        print(sys.stdin)
    """, input="parent's input\n")
    assert out == "True True ''\nNone\n"


def test_flush_std_streams_tolerates_missing_or_closed(monkeypatch):
    util._flush_std_streams()
    monkeypatch.setattr(sys, "stdout", None)
    closed = open(os.devnull, "w")
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    util._flush_std_streams()


# --- spawnv_passfds --------------------------------------------------------------------

def test_spawnv_passfds_hands_bytes_to_core(monkeypatch):
    seen = []
    fake = types.ModuleType("ferromp._core")
    fake.spawnv_passfds = lambda path, args, fds: seen.append((path, args, fds)) or 1234
    monkeypatch.setitem(sys.modules, "ferromp._core", fake)
    monkeypatch.setattr(ferromp, "_core", fake, raising=False)
    pid = util.spawnv_passfds("/usr/bin/python3", ["python3", b"-c", "pass"], {9, 4, 7})
    assert pid == 1234
    assert seen == [(b"/usr/bin/python3", [b"python3", b"-c", b"pass"], [4, 7, 9])]


def _real_core():
    try:
        from ferromp import _core
    except ImportError:
        return None
    return _core if hasattr(_core, "spawnv_passfds") else None


@pytest.mark.skipif(_real_core() is None, reason="ferromp._core not built")
def test_spawnv_passfds_keeps_only_passed_fds():
    keep_r, keep_w = os.pipe()
    drop_r, drop_w = os.pipe()
    os.set_inheritable(drop_w, True)  # inheritable, yet it must still be closed
    code = ("import os, sys\n"
            "def ok(fd):\n"
            "    try:\n"
            "        os.fstat(fd)\n"
            "        return 1\n"
            "    except OSError:\n"
            "        return 0\n"
            "os.write(%d, bytes([ok(%d), ok(%d)]))\n" % (keep_w, keep_w, drop_w))
    try:
        pid = util.spawnv_passfds(sys.executable, [sys.executable, "-c", code], [keep_w])
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.read(keep_r, 2) == b"\x01\x00"
    finally:
        util.close_fds(keep_r, keep_w, drop_r, drop_w)


# --- _cleanup_tests --------------------------------------------------------------------

def test_cleanup_tests_stops_helpers_in_fresh_interpreter():
    out = run_python("""
        import os, sys, types
        import ferromp
        from ferromp import util

        calls = []
        def fake(name, **attrs):
            mod = types.ModuleType("ferromp." + name)
            mod.__dict__.update(attrs)
            sys.modules[mod.__name__] = mod
        fake("forkserver", _forkserver=types.SimpleNamespace(
            _stop=lambda: calls.append("forkserver")))
        fake("resource_tracker", _resource_tracker=types.SimpleNamespace(
            _stop=lambda: calls.append("resource_tracker")))
        fake("resource_sharer", stop=lambda: calls.append("resource_sharer"))
        util.process._cleanup = lambda: calls.append("process._cleanup")

        tempdir = util.get_temp_dir()
        util.Finalize(None, calls.append, args=("finalizer",), exitpriority=5)
        util._cleanup_tests()
        print(calls, os.path.exists(tempdir), util._finalizer_registry)
    """)
    assert out == ("['process._cleanup', 'forkserver', 'resource_tracker', "
                   "'resource_sharer', 'finalizer'] False {}\n")


def test_cleanup_tests_tolerates_missing_helpers_in_fresh_interpreter():
    out = run_python("""
        import sys, types
        from ferromp import util

        # None in sys.modules makes the import fail, as for a module not written yet.
        sys.modules["ferromp.forkserver"] = None
        # Present but incomplete.
        sys.modules["ferromp.resource_tracker"] = types.ModuleType("ferromp.resource_tracker")
        sys.modules["ferromp.resource_sharer"] = None
        util._cleanup_tests()
        print("ok")
    """)
    assert out == "ok\n"
