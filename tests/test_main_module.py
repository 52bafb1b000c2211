"""The main-module rule: how a child finds the functions of the parent's ``__main__``.

Under spawn and forkserver a child re-imports the parent's main module as
``__mp_main__`` (from its path, or by module name under ``-m``), so code behind an
``if __name__ == "__main__":`` guard does not run again, and a process started during
that import fails with the stdlib's RuntimeError instead of fork-bombing. Each test
writes a small program to ``tmp_path``, runs it in a fresh interpreter once with
``ferromp`` and once with ``multiprocessing`` (the program takes the module name as
``sys.argv[1]``), and compares exit status and output.
"""

import concurrent.futures
import os
import re
import textwrap
import zipfile

import pytest

import _helpers

pytestmark = pytest.mark.timeout(90)

LIBS = ("ferromp", "multiprocessing")

BOOTSTRAP_ERROR = ("An attempt has been made to start a new process before the\n"
                   "        current process has finished its bootstrapping phase.")

# Prints at import, so the output shows where the module was (re-)imported and under
# which name; the child reports the module its target came from.
GUARDED = textwrap.dedent("""
    import importlib
    import sys

    MP, METHOD = sys.argv[1], sys.argv[2]
    mp = importlib.import_module(MP)
    print("import", __name__, flush=True)


    def target(x):
        print("child", x, target.__module__, __name__,
              sys.modules["__main__"].__name__, flush=True)


    if __name__ == "__main__":
        ctx = mp.get_context(METHOD)
        p = ctx.Process(target=target, args=("arg",))
        p.start()
        p.join()
        print("exitcode", p.exitcode, flush=True)
""")

# The same without the guard: every import of the module starts a process. COUNTER
# names a file that gets a line per import, to bound the number of imports.
UNGUARDED = textwrap.dedent("""
    import importlib
    import os
    import sys

    MP, METHOD = sys.argv[1], sys.argv[2]
    with open(os.environ["COUNTER"], "a") as f:
        f.write(__name__ + "\\n")
    mp = importlib.import_module(MP)


    def target():
        print("in child", flush=True)


    ctx = mp.get_context(METHOD)
    p = ctx.Process(target=target)
    p.start()
    p.join()
    print("exitcode", p.exitcode, __name__, flush=True)
""")

# A package's or zip app's __main__: one target from an importable module (works under
# every method) and one defined in __main__ itself (which the stdlib does not re-import
# for such mains, so a spawn child cannot find it).
PKG_MAIN = textwrap.dedent("""
    import importlib
    import sys

    from {work} import target as work_target

    MP, METHOD = sys.argv[1], sys.argv[2]
    mp = importlib.import_module(MP)
    print("import", __name__, flush=True)


    def local_target(x):
        print("local", x, flush=True)


    if __name__ == "__main__":
        ctx = mp.get_context(METHOD)
        for t in (work_target, local_target):
            p = ctx.Process(target=t, args=("x",))
            p.start()
            p.join()
            print("exitcode", t.__name__, p.exitcode, flush=True)
""")

WORK = textwrap.dedent("""
    def target(x):
        print("work", x, __name__, flush=True)
""")

DASH_C = textwrap.dedent("""
    import importlib, sys
    mp = importlib.import_module(sys.argv[1])
    ctx = mp.get_context(sys.argv[2])
    def f():
        print("f ran", flush=True)
    for target, args in ((print, ("hello from", "builtin print")), (f, ())):
        p = ctx.Process(target=target, args=args)
        p.start()
        p.join()
        print("exitcode", getattr(target, "__name__", target), p.exitcode, flush=True)
""")


def exception_lines(stderr):
    """The 'SomeError: message' lines of the tracebacks in ``stderr``."""
    return [line for line in stderr.splitlines()
            if re.match(r"[A-Za-z_.]+(Error|Exception)\b", line)]


def run_both(make_args, **kwargs):
    """Run the program for ferromp and the stdlib concurrently; {lib: CompletedProcess}."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {lib: pool.submit(_helpers.run_script, make_args(lib), **kwargs)
                   for lib in LIBS}
        return {lib: f.result() for lib, f in futures.items()}


def assert_same(results):
    ours, theirs = results["ferromp"], results["multiprocessing"]
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), (
        ours.stderr, theirs.stderr)
    assert exception_lines(ours.stderr) == exception_lines(theirs.stderr), (
        ours.stderr, theirs.stderr)


def test_guarded_script(tmp_path, start_method_name):
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED)
    results = run_both(lambda lib: [str(script), lib, start_method_name], cwd=tmp_path)
    ours = results["ferromp"]
    assert ours.returncode == 0, ours.stderr
    lines = ours.stdout.splitlines()
    assert lines[0] == "import __main__" and lines[-1] == "exitcode 0"
    if start_method_name == "fork":
        assert lines[1:-1] == ["child arg __main__ __main__ __main__"]
    else:
        # The child sees the script as __mp_main__, imported with the guard false.
        assert lines[1:-1] == ["import __mp_main__",
                               "child arg __mp_main__ __mp_main__ __mp_main__"]
    assert_same(results)


def test_guarded_script_run_from_elsewhere(tmp_path, start_method_name):
    # A relative script path and another cwd: the child must still find the script.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "guarded.py").write_text(GUARDED)
    results = run_both(lambda lib: [os.path.join("sub", "guarded.py"), lib, start_method_name],
                       cwd=tmp_path)
    assert results["ferromp"].returncode == 0, results["ferromp"].stderr
    assert results["ferromp"].stdout.splitlines()[-1] == "exitcode 0"
    assert_same(results)



# What the re-imported main module sees of itself while it runs and afterwards: the
# stdlib runs it with runpy.run_path; ferromp reads a .py file itself (no pkgutil).
NAMESPACE = textwrap.dedent("""\
    # -*- coding: latin-1 -*-
    import importlib
    import os
    import sys

    MP, METHOD = sys.argv[1], sys.argv[2]
    mp = importlib.import_module(MP)
    ME = sys.modules.get(__name__)
    print("import", __name__, repr(__package__), __spec__,
          type(__loader__).__name__, __cached__,
          __doc__, "caf\xe9",
          os.path.basename(__file__), sys.argv[0] == __file__,
          ME is not None and vars(ME) is globals(), flush=True)


    def target():
        main = sys.modules["__main__"]
        print("child", os.path.basename(sys.argv[0]), main.__name__,
              sys.modules.get("__mp_main__") is main,
              target.__globals__ is vars(main), target.__globals__["ME"] is main,
              sorted(k for k in vars(main) if k.startswith("__")), flush=True)


    if __name__ == "__main__":
        p = mp.get_context(METHOD).Process(target=target)
        p.start()
        p.join()
        print("exitcode", p.exitcode, flush=True)
""")


def test_reimported_main_namespace_matches_stdlib(tmp_path, start_method_name):
    script = tmp_path / "namespace.py"
    script.write_bytes(NAMESPACE.encode("latin-1"))
    results = run_both(lambda lib: [str(script), lib, start_method_name], cwd=tmp_path)
    ours = results["ferromp"]
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.splitlines()[-1] == "exitcode 0"
    if start_method_name != "fork":
        assert "import __mp_main__ '' None NoneType None None café" in ours.stdout
    assert_same(results)

@pytest.mark.timeout(120)
def test_unguarded_script_fails_cleanly(tmp_path, start_method_name):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    counters = {lib: tmp_path / ("%s.count" % lib) for lib in LIBS}
    results = {}
    for lib in LIBS:
        env = _helpers.child_env()
        env["COUNTER"] = str(counters[lib])
        results[lib] = _helpers.run_script([str(script), lib, start_method_name], timeout=60,
                                           env=env, cwd=tmp_path)
    ours = results["ferromp"]
    imports = counters["ferromp"].read_text().splitlines()
    # No fork bomb: the parent's import plus at most one in the child and one in a
    # fork server.
    assert imports[0] == "__main__"
    assert len(imports) <= 3, imports
    if start_method_name == "fork":
        assert ours.stdout == "in child\nexitcode 0 __main__\n"
    else:
        assert ours.stdout == "exitcode 1 __main__\n"
        assert BOOTSTRAP_ERROR in ours.stderr, ours.stderr
        assert "RuntimeError" in ours.stderr
    assert_same(results)


def test_dash_m_module(tmp_path, start_method_name):
    pkg = tmp_path / "mppkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(GUARDED)
    results = run_both(lambda lib: ["-m", "mppkg.mod", lib, start_method_name], cwd=tmp_path)
    ours = results["ferromp"]
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.splitlines()[-1] == "exitcode 0"
    if start_method_name != "fork":
        assert "import __mp_main__" in ours.stdout.splitlines()
    assert_same(results)


def test_dash_m_package_with_dunder_main(tmp_path, start_method_name):
    pkg = tmp_path / "mpapp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "work.py").write_text(WORK)
    (pkg / "__main__.py").write_text(PKG_MAIN.format(work="mpapp.work"))
    results = run_both(lambda lib: ["-m", "mpapp", lib, start_method_name], cwd=tmp_path)
    ours = results["ferromp"]
    assert ours.returncode == 0, ours.stderr
    assert "work x mpapp.work" in ours.stdout.splitlines()
    assert "exitcode target 0" in ours.stdout.splitlines()
    assert_same(results)


def test_zip_app(tmp_path, start_method_name):
    app = tmp_path / "app.zip"
    with zipfile.ZipFile(app, "w") as z:
        z.writestr("__main__.py", PKG_MAIN.format(work="zwork"))
        z.writestr("zwork.py", WORK)
    results = run_both(lambda lib: [str(app), lib, start_method_name], cwd=tmp_path)
    ours = results["ferromp"]
    assert ours.returncode == 0, ours.stderr
    assert "work x zwork" in ours.stdout.splitlines()
    assert "exitcode target 0" in ours.stdout.splitlines()
    assert_same(results)


def test_dash_c_with_builtin_target(tmp_path, start_method_name):
    results = run_both(lambda lib: ["-c", DASH_C, lib, start_method_name], cwd=tmp_path)
    ours = results["ferromp"]
    assert ours.returncode == 0, ours.stderr
    lines = ours.stdout.splitlines()
    assert lines[:2] == ["hello from builtin print", "exitcode print 0"]
    # f, defined in -c, runs under every method: a spawn or forkserver child cannot
    # import it, so ferromp sends it by value (cloudpickle); the stdlib's child fails.
    assert lines[2:] == ["f ran", "exitcode f 0"], ours.stderr
    # With the fallback off, exactly the stdlib's.
    env = _helpers.child_env()
    env["FERROMP_CLOUDPICKLE"] = "0"
    results["ferromp"] = _helpers.run_script(["-c", DASH_C, "ferromp", start_method_name],
                                             cwd=tmp_path, env=env)
    assert_same(results)
