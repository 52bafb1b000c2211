"""Tests for contexts and start methods (ferromp.context and the package's names).

Global start-method state (set_start_method and friends) is exercised in a fresh
interpreter running the same script against ferromp and against the stdlib, and the
two outputs are compared, so the pytest process's own default context is left alone.
"""

import importlib
import json
import multiprocessing
import os
import textwrap

import pytest

import _helpers
import ferromp
from _helpers import START_METHODS, lib_name, outcome

pytestmark = pytest.mark.timeout(30)

# Submodules on the spine (processes, contexts, connections, reduction) whose public
# names must be the stdlib's.
SPINE_SUBMODULES = ("connection", "context", "process", "reduction", "resource_sharer",
                    "spawn", "forkserver", "popen_fork", "popen_spawn_posix",
                    "popen_forkserver")


# --- names -----------------------------------------------------------------------------

def test_all_matches_stdlib():
    assert set(ferromp.__all__) == set(multiprocessing.__all__)


def test_module_level_names_exist():
    for name in multiprocessing.__all__:
        assert hasattr(ferromp, name), name
        ours, theirs = getattr(ferromp, name), getattr(multiprocessing, name)
        assert callable(ours) == callable(theirs), name
    assert ferromp.SUBDEBUG == multiprocessing.SUBDEBUG
    assert ferromp.SUBWARNING == multiprocessing.SUBWARNING


def test_exception_classes_are_the_stdlibs(start_method):
    for name in ("ProcessError", "BufferTooShort", "TimeoutError", "AuthenticationError"):
        assert getattr(ferromp, name) is getattr(multiprocessing, name), name
        assert getattr(start_method, name) is getattr(multiprocessing, name), name


@pytest.mark.parametrize("submodule", SPINE_SUBMODULES)
def test_submodule_all_matches_stdlib(submodule):
    ours = importlib.import_module("ferromp." + submodule)
    theirs = importlib.import_module("multiprocessing." + submodule)
    assert set(getattr(ours, "__all__", ())) == set(getattr(theirs, "__all__", ()))
    for name in getattr(theirs, "__all__", ()):
        assert hasattr(ours, name), (submodule, name)


# --- get_context -----------------------------------------------------------------------

def test_get_context_for_each_method(start_method, std_ctx):
    method = start_method.get_start_method()
    assert std_ctx.get_start_method() == method
    assert type(start_method).__name__ == type(std_ctx).__name__
    # A concrete context is a singleton that returns itself and reaches its siblings.
    assert ferromp.get_context(method) is start_method
    assert start_method.get_context() is start_method
    for other in START_METHODS:
        assert start_method.get_context(other) is ferromp.get_context(other)
    public = {n for n in dir(start_method) if not n.startswith("_")}
    assert public == {n for n in dir(std_ctx) if not n.startswith("_")}
    assert start_method.reducer is ferromp.reduction
    start_method.allow_connection_pickling()
    start_method.freeze_support()


def test_concrete_context_refuses_set_start_method(start_method, std_ctx):
    ours = outcome(start_method.set_start_method, "fork")
    assert ours == outcome(std_ctx.set_start_method, "fork")
    assert ours == (ValueError, "cannot set start method of concrete context")


def test_unknown_method():
    ours = outcome(ferromp.get_context, "bogus")
    assert ours == outcome(multiprocessing.get_context, "bogus")
    assert ours == (ValueError, "cannot find context for 'bogus'")
    ours = outcome(ferromp.get_context("spawn").get_context, "nope")
    assert ours == (ValueError, "cannot find context for 'nope'")


def test_default_context():
    default = ferromp.get_context()
    assert default.get_start_method() == multiprocessing.get_context().get_start_method()
    assert ferromp.get_context(None).get_start_method() == default.get_start_method()


def test_get_all_start_methods():
    assert ferromp.get_all_start_methods() == multiprocessing.get_all_start_methods()
    assert set(ferromp.get_all_start_methods()) == set(START_METHODS)


def test_cpu_count(start_method, std_ctx):
    assert start_method.cpu_count() == std_ctx.cpu_count() == os.cpu_count()
    assert ferromp.cpu_count() == multiprocessing.cpu_count()


@pytest.mark.timeout(30)
def test_child_runs_under_its_contexts_method(start_method, std_ctx):
    method = start_method.get_start_method()
    seen = {}
    for ctx in (start_method, std_ctx):
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_helpers.report_start_method, args=(w, lib_name(ctx)))
        p.start()
        seen[lib_name(ctx)] = r.recv()
        p.join(30)
        assert p.exitcode == 0
    assert seen["ferromp"] == seen["multiprocessing"] == method


# --- set_start_method / get_start_method in a fresh interpreter -------------------------

START_METHOD_SCRIPT = textwrap.dedent("""
    import importlib
    import json
    import sys

    mp = importlib.import_module(sys.argv[1])
    out = []

    def rec(label, fn, *args, **kwargs):
        try:
            out.append([label, "ok", fn(*args, **kwargs)])
        except Exception as e:
            out.append([label, type(e).__name__, str(e)])

    def child(conn):
        conn.send([mp.get_start_method(), __name__])

    def run_child():
        r, w = mp.Pipe(duplex=False)
        p = mp.Process(target=child, args=(w,))
        p.start()
        got = r.recv()
        p.join()
        return got + [p.exitcode, type(p).__name__]

    if __name__ == "__main__":
        rec("fresh allow_none", mp.get_start_method, allow_none=True)
        rec("set spawn", mp.set_start_method, "spawn")
        rec("get", mp.get_start_method)
        rec("child under spawn", run_child)
        rec("set again", mp.set_start_method, "fork")
        rec("set same again", mp.set_start_method, "spawn")
        rec("get after refusal", mp.get_start_method)
        rec("force fork", mp.set_start_method, "fork", force=True)
        rec("get after force", mp.get_start_method)
        rec("child under fork", run_child)
        rec("force None", mp.set_start_method, None, force=True)
        rec("allow_none after reset", mp.get_start_method, allow_none=True)
        rec("get picks default", mp.get_start_method)
        rec("allow_none after get", mp.get_start_method, allow_none=True)
        rec("set after get", mp.set_start_method, "forkserver")
        rec("unknown forced", mp.set_start_method, "bogus", force=True)
        rec("force forkserver", mp.set_start_method, "forkserver", force=True)
        rec("child under forkserver", run_child)
        rec("context name", lambda: type(mp.get_context()).__name__)
        print(json.dumps(out))
""")


@pytest.mark.timeout(60)
def test_set_start_method_semantics(tmp_path):
    script = tmp_path / "start_methods.py"
    script.write_text(START_METHOD_SCRIPT)
    results = {}
    for lib in ("ferromp", "multiprocessing"):
        proc = _helpers.run_script([str(script), lib], timeout=50)
        assert proc.returncode == 0, proc.stderr
        results[lib] = json.loads(proc.stdout)
    ours = {label: rest for label, *rest in results["ferromp"]}
    assert ours["fresh allow_none"] == ["ok", None]
    assert ours["set again"] == ["RuntimeError", "context has already been set"]
    assert ours["set same again"] == ["RuntimeError", "context has already been set"]
    assert ours["set after get"] == ["RuntimeError", "context has already been set"]
    assert ours["get after force"] == ["ok", "fork"]
    assert ours["child under spawn"] == ["ok", ["spawn", "__mp_main__", 0, "Process"]]
    assert ours["child under fork"] == ["ok", ["fork", "__main__", 0, "Process"]]
    assert ours["unknown forced"] == ["ValueError", "cannot find context for 'bogus'"]
    assert results["ferromp"] == results["multiprocessing"]
