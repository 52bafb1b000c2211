"""Tests for Process (ferromp.process and the context's Process classes).

Each test runs under fork, spawn and forkserver (the ``start_method`` fixture) and does
the same thing with the stdlib's context of that method (``std_ctx``), asserting that
both give the same exit codes, exceptions and messages. Child targets live in
``_helpers.py`` so they pickle by reference.
"""

import functools
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import _helpers
import ferromp
from _helpers import lib_name, outcome, wait_for

pytestmark = pytest.mark.timeout(60)


def both(ctx, std_ctx):
    return (ctx, std_ctx)


def normalize_repr(text):
    return re.sub(r"\d+", "N", text)


def start_ready(ctx, target=_helpers.ready_then_sleep, **kwargs):
    """Start a child that says "ready" and then sleeps; return it once it is ready."""
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(w,), **kwargs)
    p.start()
    w.close()
    assert r.poll(30), "child did not report ready"
    assert r.recv() == "ready"
    r.close()
    return p


def not_active(ctx, p):
    return p not in ctx.active_children()


# --- start, join, exit codes -----------------------------------------------------------

@pytest.mark.timeout(30)
def test_start_join_exitcode_zero(start_method, std_ctx):
    results = []
    for ctx in both(start_method, std_ctx):
        p = ctx.Process(target=_helpers.noop)
        before = (p.exitcode, p.is_alive(), p.pid)
        p.start()
        p.join(30)
        results.append((before, p.exitcode, p.is_alive()))
    assert results[0] == results[1] == ((None, False, None), 0, False)


@pytest.mark.timeout(30)
def test_process_without_target(start_method, std_ctx):
    codes = []
    for ctx in both(start_method, std_ctx):
        p = ctx.Process()
        p.start()
        p.join(30)
        codes.append(p.exitcode)
    assert codes == [0, 0]


# (argument of sys.exit, exit code, what the child writes to stderr)
EXIT_CASES = [
    (None, 0, ""),
    (0, 0, ""),
    (1, 1, ""),
    (3, 3, ""),
    (255, 255, ""),
    (256, 0, ""),
    (-1, 255, ""),
    (True, 1, ""),
    ("msg", 1, "msg\n"),
    (3.5, 1, "3.5\n"),
]


@pytest.mark.timeout(60)
def test_sys_exit_codes(start_method, std_ctx, tmp_path):
    outcomes = {}
    for ctx in both(start_method, std_ctx):
        lib = lib_name(ctx)
        procs = []
        for i, (arg, _, _) in enumerate(EXIT_CASES):
            path = tmp_path / ("%s-%d.err" % (lib, i))
            p = ctx.Process(target=_helpers.with_stderr_to,
                            args=(str(path), _helpers.exit_with, arg))
            p.start()
            procs.append((p, path))
        got = []
        for p, path in procs:
            p.join(30)
            got.append((p.exitcode, path.read_text()))
        outcomes[lib] = got
    expected = [(code, err) for _, code, err in EXIT_CASES]
    assert outcomes["ferromp"] == expected
    assert outcomes["multiprocessing"] == expected


@pytest.mark.timeout(30)
def test_uncaught_exception_prints_traceback(start_method, std_ctx, tmp_path):
    reports = {}
    for ctx in both(start_method, std_ctx):
        lib = lib_name(ctx)
        path = tmp_path / (lib + ".err")
        p = ctx.Process(target=_helpers.with_stderr_to, name="boomer",
                        args=(str(path), _helpers.raise_value_error, "boom"))
        p.start()
        p.join(30)
        lines = path.read_text().splitlines()
        reports[lib] = (p.exitcode, lines[0], lines[1], lines[-1])
    assert reports["ferromp"] == reports["multiprocessing"] == (
        1, "Process boomer:", "Traceback (most recent call last):", "ValueError: boom")


@pytest.mark.timeout(30)
def test_terminate_and_kill(start_method, std_ctx):
    codes = {}
    for ctx in both(start_method, std_ctx):
        got = []
        for how in ("terminate", "kill"):
            p = start_ready(ctx)
            assert p.is_alive()
            getattr(p, how)()
            p.join(10)
            got.append((p.exitcode, p.is_alive()))
            # Signalling a stopped process is harmless.
            getattr(p, how)()
        codes[lib_name(ctx)] = got
    expected = [(-signal.SIGTERM, False), (-signal.SIGKILL, False)]
    assert codes["ferromp"] == codes["multiprocessing"] == expected


@pytest.mark.timeout(30)
def test_join_timeout_returns_while_alive(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        p = start_ready(ctx)
        t0 = time.monotonic()
        p.join(0.3)
        elapsed = time.monotonic() - t0
        assert 0.25 <= elapsed < 2.0, (lib_name(ctx), elapsed)
        assert p.is_alive() and p.exitcode is None
        t0 = time.monotonic()
        p.join(0)
        assert time.monotonic() - t0 < 0.5
        assert p.is_alive()
        p.terminate()
        p.join(10)
        assert not p.is_alive() and p.exitcode == -signal.SIGTERM


@pytest.mark.timeout(30)
def test_join_without_timeout_on_finished_child(start_method):
    p = start_method.Process(target=_helpers.sleep_for, args=(0.2,))
    p.start()
    p.join()
    assert p.exitcode == 0
    # Joining again returns at once with the same code.
    p.join()
    p.join(0)
    assert p.exitcode == 0


@pytest.mark.timeout(60)
def test_start_from_many_threads(start_method, std_ctx):
    """Processes started concurrently from several threads each get their own exit
    code back (the fork server, in particular, must not mix up its replies)."""
    for ctx in both(start_method, std_ctx):
        procs = [ctx.Process(target=_helpers.exit_with, args=(10 + i,)) for i in range(16)]

        def start_and_join(chunk):
            for p in chunk:
                p.start()
            for p in chunk:
                p.join(30)

        threads = [threading.Thread(target=start_and_join, args=(procs[i::4],))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [p.exitcode for p in procs] == [10 + i for i in range(16)], lib_name(ctx)
        assert len({p.pid for p in procs}) == 16


# --- identity, names, parent, authkey --------------------------------------------------

@pytest.mark.timeout(30)
def test_child_sees_itself_and_its_parent(start_method, std_ctx):
    reports = {}
    for ctx in both(start_method, std_ctx):
        lib = lib_name(ctx)
        mod = _helpers.mp_module(lib)
        r1, w1 = ctx.Pipe(duplex=False)
        r2, w2 = ctx.Pipe(duplex=False)
        default = ctx.Process(target=_helpers.child_info, args=(w1, lib))
        custom = ctx.Process(target=_helpers.child_info, args=(w2, lib), name="custom-name")
        custom.authkey = b"custom key"
        assert default.pid is None and default.ident is None
        default.start()
        custom.start()
        info_default, info_custom = r1.recv(), r2.recv()
        default.join(30)
        custom.join(30)
        assert default.exitcode == custom.exitcode == 0
        assert info_default["pid"] == info_default["ident"] == default.pid == default.ident
        assert info_custom["pid"] == custom.pid
        assert default.pid != custom.pid
        assert info_default["name"] == default.name
        assert info_custom["name"] == "custom-name"
        assert info_default["authkey"] == bytes(mod.current_process().authkey)
        assert info_custom["authkey"] == b"custom key"
        for info in (info_default, info_custom):
            assert info["daemon"] is False
            assert info["parent_pid"] == os.getpid()
            assert info["parent_name"] == "MainProcess"
            assert info["parent_alive"] is True
            assert info["n_active_children"] == 0
        assert info_default["cwd"] == os.getcwd()
        assert info_default["tests_on_path"] is True
        # stdin is replaced by /dev/null in the child.
        assert info_default["stdin"] == ("ok", "")
        reports[lib] = {k: info_default[k] for k in ("main_name", "argv", "stdin")}
    # Under spawn/forkserver the main module is re-imported as __mp_main__.
    assert reports["ferromp"] == reports["multiprocessing"]


@pytest.mark.timeout(30)
def test_child_output_is_flushed_at_exit(start_method, std_ctx, tmp_path):
    results = {}
    for ctx in both(start_method, std_ctx):
        lib = lib_name(ctx)
        path = tmp_path / (lib + ".out")
        p = ctx.Process(target=_helpers.with_stdout_to,
                        args=(str(path), _helpers.print_unflushed, "no newline, no flush"))
        p.start()
        p.join(30)
        results[lib] = (p.exitcode, path.read_text())
    assert results["ferromp"] == results["multiprocessing"] == (0, "no newline, no flush")


def unpicklable_target():
    return lambda: None


@pytest.mark.timeout(30)
def test_unpicklable_target_raises_in_parent(start_method, std_ctx, monkeypatch):
    # With the by-value fallback off, exactly the stdlib's behaviour (on, the lambda
    # goes by value: test_cloudpickle.py).
    monkeypatch.setattr(ferromp.reduction, '_fallback', False)
    results = {}
    for ctx in both(start_method, std_ctx):
        p = ctx.Process(target=unpicklable_target(), args=(1,))
        res = outcome(p.start)
        if res[0] == "ok":
            p.join(30)
            state = p.exitcode
        else:
            res = (res[0], re.sub(r"0x[0-9a-f]+", "ADDR", res[1]))
            state = (p.is_alive(), p.exitcode)
            assert p not in ctx.active_children()
        results[lib_name(ctx)] = (res, state)
    assert results["ferromp"] == results["multiprocessing"]
    if start_method.get_start_method() == "fork":
        # Nothing is pickled under fork; the lambda is called with a wrong argument.
        assert results["ferromp"] == (("ok", None), 1)
    else:
        assert results["ferromp"][1] == (False, None)


def test_main_process_identity():
    for mod in (ferromp, multiprocessing):
        me = mod.current_process()
        assert me.name == "MainProcess"
        assert me.pid == me.ident == os.getpid()
        assert me.is_alive()
        assert me.daemon is False
        assert mod.parent_process() is None
        assert isinstance(me.authkey, bytes) and len(me.authkey) == 32
    assert repr(ferromp.current_process()) == repr(multiprocessing.current_process())
    assert ferromp.current_process().authkey != multiprocessing.current_process().authkey


def test_default_and_custom_names(start_method, std_ctx):
    ours = start_method.Process(target=_helpers.noop)
    theirs = std_ctx.Process(target=_helpers.noop)
    # ForkProcess / SpawnProcess / ForkServerProcess, as in the stdlib.
    assert type(ours).__name__ == type(theirs).__name__
    m = re.fullmatch(r"(\w+)-(\d+)", ours.name)
    assert m and m.group(1) == type(ours).__name__
    n1 = int(m.group(2))
    n2 = int(start_method.Process(target=_helpers.noop).name.rpartition("-")[2])
    assert n2 == n1 + 1
    assert re.fullmatch(type(theirs).__name__ + r"-\d+", theirs.name)
    assert start_method.Process(name="x").name == "x"
    ours.name = "renamed"
    assert ours.name == "renamed"
    assert outcome(setattr, ours, "name", 5) == outcome(setattr, theirs, "name", 5) == (
        AssertionError, "name must be a string")
    assert outcome(start_method.Process, group=1) == outcome(std_ctx.Process, group=1) == (
        AssertionError, "group argument must be None for now")


@pytest.mark.timeout(30)
def test_args_kwargs_and_run_override(start_method, std_ctx):
    got = []
    for ctx in both(start_method, std_ctx):
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_helpers.send_args, args=(w, 1, "two"),
                        kwargs={"three": [3], "four": None})
        p.start()
        got.append(r.recv())
        p.join(30)
        assert p.exitcode == 0
    assert got[0] == got[1] == ((1, "two"), {"three": [3], "four": None})

    worker_cls = _helpers.WORKERS[start_method.get_start_method()]
    assert issubclass(worker_cls, start_method.Process)
    r, w = start_method.Pipe(duplex=False)
    p = worker_cls(w, name="sub")
    p.start()
    assert r.recv() == ("run", worker_cls.__name__, "sub")
    p.join(30)
    assert p.exitcode == 0


# --- daemon ----------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_daemon_flag(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        lib = lib_name(ctx)
        q = ctx.Process(target=_helpers.noop)
        assert q.daemon is False
        q.daemon = True
        assert q.daemon is True
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_helpers.child_info, args=(w, lib), daemon=True)
        assert p.daemon is True
        p.start()
        info = r.recv()
        p.join(30)
        assert info["daemon"] is True
        assert "daemon" in repr(p)
        assert outcome(setattr, p, "daemon", False) == (
            AssertionError, "process has already started")


@pytest.mark.timeout(30)
def test_daemonic_process_may_not_have_children(start_method, std_ctx):
    method = start_method.get_start_method()
    results = {}
    for ctx in both(start_method, std_ctx):
        lib = lib_name(ctx)
        got = []
        for daemon in (True, False):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_helpers.try_start_child, args=(w, lib, method),
                            daemon=daemon)
            p.start()
            got.append(r.recv())
            p.join(30)
            assert p.exitcode == 0
        results[lib] = got
    expected = [("AssertionError", "daemonic processes are not allowed to have children"),
                ("ok", 0)]
    assert results["ferromp"] == results["multiprocessing"] == expected


# --- close, start twice, repr ----------------------------------------------------------

@pytest.mark.timeout(30)
def test_close(start_method, std_ctx):
    results = {}
    for ctx in both(start_method, std_ctx):
        p = start_ready(ctx)
        while_running = outcome(p.close)
        assert p.is_alive()
        p.terminate()
        p.join(10)
        closed = outcome(p.close)
        after = [outcome(getattr, p, "pid"), outcome(getattr, p, "ident"),
                 outcome(getattr, p, "exitcode"), outcome(getattr, p, "sentinel"),
                 outcome(p.is_alive), outcome(p.join), outcome(p.terminate),
                 outcome(p.kill), outcome(p.start), outcome(p.close)]
        results[lib_name(ctx)] = (while_running, closed, after, normalize_repr(p.name),
                                  normalize_repr(repr(p)))
    ours, theirs = results["ferromp"], results["multiprocessing"]
    assert ours[0] == (ValueError, "Cannot close a process while it is still running. "
                                   "You should first call join() or terminate().")
    assert ours[1] == ("ok", None)
    closed = (ValueError, "process object is closed")
    assert ours[2] == [closed] * 9 + [("ok", None)]
    assert "closed" in ours[4]
    assert ours == theirs


@pytest.mark.timeout(30)
def test_start_twice_and_join_unstarted(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        p = ctx.Process(target=_helpers.noop)
        assert outcome(p.join) == (AssertionError, "can only join a started process")
        p.start()
        assert outcome(p.start) == (AssertionError, "cannot start a process twice")
        p.join(30)
        assert outcome(p.start) == (AssertionError, "cannot start a process twice")
        assert p.exitcode == 0


@pytest.mark.timeout(30)
def test_repr_follows_state(start_method, std_ctx):
    reprs = {}
    for ctx in both(start_method, std_ctx):
        p = ctx.Process(target=_helpers.noop, name="n")
        got = [repr(p)]
        q = start_ready(ctx, daemon=True)
        got.append(repr(q))
        assert ("pid=%d" % q.pid) in got[-1] and ("parent=%d" % os.getpid()) in got[-1]
        q.terminate()
        q.join(10)
        got.append(repr(q))
        p.start()
        p.join(30)
        got.append(repr(p))
        reprs[lib_name(ctx)] = [normalize_repr(r) for r in got]
    name = type(start_method.Process()).__name__
    assert reprs["ferromp"][0] == "<%s name='n' parent=N initial>" % name
    assert reprs["ferromp"][1].endswith(" started daemon>")
    assert reprs["ferromp"][2].endswith(" stopped exitcode=-SIGTERM daemon>")
    assert reprs["ferromp"][3].endswith(" stopped exitcode=N>")
    assert reprs["ferromp"] == reprs["multiprocessing"]


# --- sentinel and active_children ------------------------------------------------------

@pytest.mark.timeout(30)
def test_sentinel_with_connection_wait(start_method, std_ctx):
    import multiprocessing.connection as std_connection

    from ferromp import connection

    procs = []
    for ctx in both(start_method, std_ctx):
        p = ctx.Process(target=_helpers.sleep_for, args=(0.4,))
        assert outcome(getattr, p, "sentinel") == (ValueError, "process not started")
        p.start()
        assert isinstance(p.sentinel, int)
        procs.append(p)
    ours, theirs = procs
    sentinels = [ours.sentinel, theirs.sentinel]
    # Both sentinels work with both wait() functions.
    assert connection.wait(sentinels, timeout=0) == []
    assert std_connection.wait(sentinels, timeout=0) == []
    for wait in (connection.wait, std_connection.wait):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready = wait(sentinels, timeout=20)
            if set(ready) == set(sentinels):
                break
            time.sleep(0.01)
        assert set(ready) == set(sentinels)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0


@pytest.mark.timeout(30)
def test_active_children(start_method, std_ctx):
    for ctx in both(start_method, std_ctx):
        sleepers = [start_ready(ctx), start_ready(ctx)]
        quick = ctx.Process(target=_helpers.noop)
        quick.start()
        active = ctx.active_children()
        for p in sleepers:
            assert p in active
        # A child that exited is reaped by active_children(), without join().
        assert wait_for(functools.partial(not_active, ctx, quick), 20)
        assert quick.exitcode == 0
        for p in sleepers:
            p.terminate()
            p.join(10)
        active = ctx.active_children()
        assert not any(p in active for p in sleepers + [quick])


# --- Ctrl-C ----------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_join_interrupted_by_sigint(start_method, std_ctx):
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for ctx in both(start_method, std_ctx):
            p = start_ready(ctx)
            main = threading.main_thread().ident
            t = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
            # Safety valve: should join() ignore the signal, the child is killed after
            # 2.5 s, so the test fails on time instead of hanging.
            rescue = threading.Timer(2.5, p.kill)
            t.start()
            rescue.start()
            t0 = time.monotonic()
            try:
                with pytest.raises(KeyboardInterrupt):
                    p.join()
            finally:
                elapsed = time.monotonic() - t0
                rescue.cancel()
                t.join()
                rescue.join()
            assert elapsed < 2.0, (lib_name(ctx), elapsed)
            assert p.is_alive()
            p.terminate()
            p.join(10)
            assert p.exitcode == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGINT, old)


# --- interpreter exit ------------------------------------------------------------------

EXITING_PARENT = textwrap.dedent("""
    import importlib
    import sys

    import _helpers

    MP, METHOD = sys.argv[1:3]

    if __name__ == "__main__":
        mp = importlib.import_module(MP)
        ctx = mp.get_context(METHOD)
        daemon = ctx.Process(target=_helpers.sleep_forever, daemon=True)
        plain = ctx.Process(target=_helpers.sleep_for, args=(0.5,))
        daemon.start()
        plain.start()
        print(daemon.pid, plain.pid, flush=True)
        # Falling off the end: the exit handler terminates the daemonic child and
        # joins the other one.
""")


@pytest.mark.timeout(60)
def test_exit_terminates_daemons_and_joins_others(start_method, tmp_path):
    script = tmp_path / "exiting_parent.py"
    script.write_text(EXITING_PARENT)
    method = start_method.get_start_method()
    for lib in ("ferromp", "multiprocessing"):
        t0 = time.monotonic()
        proc = _helpers.run_script([str(script), lib, method], timeout=30)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, (lib, proc.stderr)
        assert proc.stderr == "", (lib, proc.stderr)
        daemon_pid, plain_pid = map(int, proc.stdout.split())
        # The parent waited for the non-daemonic child...
        assert elapsed >= 0.45, (lib, elapsed)
        assert wait_for(functools.partial(_helpers.pid_gone, plain_pid), 5), lib
        # ...and did not leave the daemonic one behind.
        assert wait_for(functools.partial(_helpers.pid_gone, daemon_pid), 5), lib


# --- parent death ----------------------------------------------------------------------

# An intermediate parent: starts one child, prints its pid, then waits to be killed.
ORPHAN_PARENT = textwrap.dedent("""
    import importlib
    import sys
    import time

    import _helpers

    MP, METHOD, MODE, PATH = sys.argv[1:5]

    if __name__ == "__main__":
        mp = importlib.import_module(MP)
        ctx = mp.get_context(METHOD)
        if MODE == "daemon":
            p = ctx.Process(target=_helpers.mark_then_sleep, args=(PATH,), daemon=True)
        else:
            p = ctx.Process(target=_helpers.orphan_watch, args=(MP, PATH))
        p.start()
        print(p.pid, flush=True)
        time.sleep(120)
""")


class OrphanedChild:
    """Runs ORPHAN_PARENT in a subprocess; ``kill_parent()`` SIGKILLs it."""

    def __init__(self, tmp_path, mp_name, method, mode):
        script = tmp_path / "orphan_parent.py"
        script.write_text(ORPHAN_PARENT)
        self.log = tmp_path / ("%s-%s.log" % (mp_name, mode))
        self.log.write_text("")
        self.err = open(tmp_path / ("%s-%s.err" % (mp_name, mode)), "w+")
        self.parent = subprocess.Popen(
            [sys.executable, str(script), mp_name, method, mode, str(self.log)],
            stdout=subprocess.PIPE, stderr=self.err, text=True, env=_helpers.child_env())
        line = self.parent.stdout.readline()
        self.err.seek(0)
        assert line.strip().isdigit(), "intermediate parent failed: " + self.err.read()
        self.pid = int(line)

    def logged(self, text):
        return text in self.log.read_text()

    def wait_started(self):
        assert wait_for(functools.partial(self.logged, "started"), 30), self.log.read_text()

    def kill_parent(self):
        self.parent.kill()
        self.parent.wait(10)

    def cleanup(self):
        if self.parent.poll() is None:
            self.kill_parent()
        self.parent.stdout.close()
        self.err.close()
        # The grandchild is ours (we started it through the intermediate parent).
        if not _helpers.pid_gone(self.pid):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(60)
def test_non_daemonic_child_outlives_killed_parent(start_method, tmp_path):
    method = start_method.get_start_method()
    orphans = [OrphanedChild(tmp_path, lib, method, "plain")
               for lib in ("ferromp", "multiprocessing")]
    try:
        for o in orphans:
            o.wait_started()
            assert "started alive=True" in o.log.read_text()
        for o in orphans:
            o.kill_parent()
        for o in orphans:
            # The child noticed the parent die, so it outlived it.
            assert wait_for(functools.partial(o.logged, "parent-dead"), 15), (
                o.log, o.log.read_text())
            assert wait_for(functools.partial(_helpers.pid_gone, o.pid), 15)
    finally:
        for o in orphans:
            o.cleanup()


@pytest.mark.timeout(60)
def test_daemonic_child_dies_with_killed_parent(start_method, tmp_path):
    # A ferromp promise beyond the stdlib (DESIGN: daemonic processes die with their
    # parent, PR_SET_PDEATHSIG plus a liveness check); the stdlib leaves the child
    # running when its parent is SIGKILLed, so there is no oracle here.
    o = OrphanedChild(tmp_path, "ferromp", start_method.get_start_method(), "daemon")
    try:
        o.wait_started()
        assert not _helpers.pid_gone(o.pid)
        o.kill_parent()
        t0 = time.monotonic()
        gone = wait_for(lambda: _helpers.pid_gone(o.pid), 10)
        elapsed = time.monotonic() - t0
        assert gone, "daemonic child survived its parent's SIGKILL"
        assert elapsed < 3.0, elapsed
    finally:
        o.cleanup()
