"""Starting a child from a fresh interpreter: the stdlib's ``multiprocessing.spawn``.

The parent sends the child two pickles over a pipe: the preparation data (sys.path,
argv, cwd, how to find the main module, authkey, logging, start method) and the
Process object. The child applies the first, which re-imports the parent's main
module under the name ``__mp_main__`` (so ``if __name__ == "__main__":`` blocks do not
run again), then unpickles and runs the second.
"""

import os
import sys

from . import process
from . import util

__all__ = ['_main', 'freeze_support', 'set_executable', 'get_executable',
           'get_preparation_data', 'get_command_line', 'import_main_path']

WINEXE = sys.platform == 'win32' and getattr(sys, 'frozen', False)
WINSERVICE = (sys.platform == 'win32' and sys.executable is not None
              and sys.executable.lower().endswith("pythonservice.exe"))

_python_exe = sys._base_executable if WINSERVICE else sys.executable


def set_executable(exe):
    """Use ``exe`` to start spawn children."""
    global _python_exe
    _python_exe = os.fsdecode(exe) if exe is not None else None


def get_executable():
    return _python_exe


def is_forking(argv):
    """Whether this interpreter was started as a spawn child."""
    return len(argv) >= 2 and argv[1] == '--multiprocessing-fork'


def freeze_support():
    """In a frozen executable started as a child, run the child and exit."""
    if is_forking(sys.argv):
        kwds = {}
        for arg in sys.argv[2:]:
            name, value = arg.split('=')
            kwds[name] = None if value == 'None' else int(value)
        spawn_main(**kwds)
        sys.exit()


def get_command_line(**kwds):
    """The argv that starts a spawn child."""
    if getattr(sys, 'frozen', False):
        return ([sys.executable, '--multiprocessing-fork'] +
                ['%s=%r' % item for item in kwds.items()])
    prog = 'from ferromp.spawn import spawn_main; spawn_main(%s)'
    prog %= ', '.join('%s=%r' % item for item in kwds.items())
    opts = util._args_from_interpreter_flags()
    return [_python_exe] + opts + ['-c', prog, '--multiprocessing-fork']


def spawn_main(pipe_handle, parent_pid=None, tracker_fd=None):
    """Entry point of a spawn child: read what the parent sent on ``pipe_handle``."""
    assert is_forking(sys.argv), "Not forking"
    if tracker_fd is not None:
        from . import resource_tracker
        resource_tracker._resource_tracker._fd = tracker_fd
    # The parent keeps its end of this pipe open for its whole life, so a duplicate
    # turns readable (EOF) exactly when the parent is gone.
    parent_sentinel = os.dup(pipe_handle)
    exitcode = _main(pipe_handle, parent_sentinel)
    sys.exit(exitcode)


def _main(fd, parent_sentinel):
    from . import reduction
    with os.fdopen(fd, 'rb', closefd=True) as from_parent:
        process.current_process()._inheriting = True
        try:
            preparation_data = reduction.pickle.load(from_parent)
            prepare(preparation_data)
            self = reduction.pickle.load(from_parent)
        finally:
            del process.current_process()._inheriting
    return self._bootstrap(parent_sentinel)


def _pickle_for_child(popen, process_obj):
    """The bytes a spawn or forkserver child reads first: preparation data, then the
    Process. Pickled while ``popen`` is the spawning Popen, so fd-backed objects in
    the Process register their fds with it."""
    import io
    from . import reduction
    from .context import set_spawning_popen
    buf = io.BytesIO()
    prep_data = get_preparation_data(process_obj._name)
    set_spawning_popen(popen)
    try:
        reduction.dump(prep_data, buf)
        # A lambda or closure as target, or what an interactive __main__ defines,
        # goes by value.
        reduction._dump_for_child(process_obj, buf, popen.method)
    finally:
        set_spawning_popen(None)
    return buf


def _check_not_importing_main():
    if getattr(process.current_process(), '_inheriting', False):
        # The stdlib's text, word for word: users search for it.
        raise RuntimeError('''
        An attempt has been made to start a new process before the
        current process has finished its bootstrapping phase.

        This probably means that you are not using fork to start your
        child processes and you have forgotten to use the proper idiom
        in the main module:

            if __name__ == '__main__':
                freeze_support()
                ...

        The "freeze_support()" line can be omitted if the program
        is not going to be frozen to produce an executable.

        To fix this issue, refer to the "Safe importing of main module"
        section in https://docs.python.org/3/library/multiprocessing.html
        ''')


def get_preparation_data(name):
    """What a fresh child needs to look like its parent before unpickling the Process."""
    _check_not_importing_main()
    d = {
        'log_to_stderr': util._log_to_stderr,
        'authkey': process.current_process().authkey,
    }
    if util._logger is not None:
        d['log_level'] = util._logger.getEffectiveLevel()
    sys_path = list(sys.path)
    # '' means "the directory the parent started in", which may not be the child's.
    if '' in sys_path and process.ORIGINAL_DIR is not None:
        sys_path[sys_path.index('')] = process.ORIGINAL_DIR
    from .context import _default_context
    d.update(
        name=name,
        sys_path=sys_path,
        sys_argv=sys.argv,
        orig_dir=process.ORIGINAL_DIR,
        dir=os.getcwd(),
        start_method=_default_context.get_start_method(),
    )
    from . import reduction
    if not reduction.get_pickle_fallback():
        d['pickle_fallback'] = False
    main_module = sys.modules['__main__']
    spec = getattr(main_module, '__spec__', None)
    main_mod_name = getattr(spec, 'name', None)
    if main_mod_name is not None:
        # Started with -m (or a package / zip app with a __main__ module).
        d['init_main_from_name'] = main_mod_name
    elif sys.platform != 'win32' or (not WINEXE and not WINSERVICE):
        main_path = getattr(main_module, '__file__', None)
        if main_path is not None and not _pseudo_file(main_path):
            if not os.path.isabs(main_path) and process.ORIGINAL_DIR is not None:
                main_path = os.path.join(process.ORIGINAL_DIR, main_path)
            d['init_main_from_path'] = os.path.normpath(main_path)
    # -c and the interactive prompt have no main file, stdin a pseudo one: nothing to
    # re-import.
    return d


def _pseudo_file(path):
    # python - names its main '<stdin>': no file a child could run (the stdlib tries,
    # and every spawn child fails).
    return path.startswith('<') and path.endswith('>')


def _main_interactive():
    """Whether ``__main__`` is interactive: the REPL, ``python -c``, a notebook (no
    main file), stdin (``<stdin>``), or IPython's, which ``prepare`` leaves alone. A
    spawn or forkserver child then has no ``__main__`` of the parent's, so what it
    defines cannot be pickled by reference for that child."""
    main_module = sys.modules.get('__main__')
    if getattr(getattr(main_module, '__spec__', None), 'name', None) is not None:
        return False
    path = getattr(main_module, '__file__', None)
    return (path is None or _pseudo_file(path)
            or os.path.splitext(os.path.basename(path))[0] == 'ipython')


# Main modules replaced by __mp_main__, kept alive so their globals stay valid.
old_main_modules = []


def prepare(data):
    """Make this process look like the parent described by ``data``."""
    if 'name' in data:
        process.current_process().name = data['name']
    if 'authkey' in data:
        process.current_process().authkey = data['authkey']
    if 'log_to_stderr' in data and data['log_to_stderr']:
        util.log_to_stderr()
    if 'log_level' in data:
        util.get_logger().setLevel(data['log_level'])
    if 'sys_path' in data:
        sys.path = data['sys_path']
    if 'sys_argv' in data:
        sys.argv = data['sys_argv']
    if 'dir' in data:
        os.chdir(data['dir'])
    if 'orig_dir' in data:
        process.ORIGINAL_DIR = data['orig_dir']
    if 'start_method' in data:
        from .context import _default_context
        _default_context.set_start_method(data['start_method'], force=True)
    if 'pickle_fallback' in data:
        from . import reduction
        reduction.set_pickle_fallback(data['pickle_fallback'])
    if 'init_main_from_name' in data:
        _fixup_main_from_name(data['init_main_from_name'])
    elif 'init_main_from_path' in data:
        _fixup_main_from_path(data['init_main_from_path'])


def _install_main(main_content):
    import types
    main_module = types.ModuleType('__mp_main__')
    main_module.__dict__.update(main_content)
    sys.modules['__main__'] = sys.modules['__mp_main__'] = main_module


def _fixup_main_from_name(mod_name):
    current_main = sys.modules['__main__']
    # A package's or zip app's __main__ runs its guard-less body on import; the stdlib
    # does not re-import those, and neither do we.
    if mod_name == '__main__' or mod_name.endswith('.__main__'):
        return
    if getattr(getattr(current_main, '__spec__', None), 'name', None) == mod_name:
        return
    old_main_modules.append(current_main)
    import runpy
    _install_main(runpy.run_module(mod_name, run_name='__mp_main__', alter_sys=True))


def _fixup_main_from_path(main_path):
    current_main = sys.modules['__main__']
    main_name = os.path.splitext(os.path.basename(main_path))[0]
    if main_name == 'ipython':
        return
    if getattr(current_main, '__file__', None) == main_path:
        return
    old_main_modules.append(current_main)
    _install_main(_run_path(main_path, '__mp_main__'))


def _run_path(path, run_name):
    """``runpy.run_path(path, run_name=run_name)``, without importing ``pkgutil``
    (3.5 ms of a spawned child's start, most of it ``typing``) for the common case: a
    ``.py`` file. The namespace, ``sys.argv[0]`` and ``sys.modules[run_name]`` while
    the code runs, and what is restored afterwards, are run_path's. Anything else (a
    directory, a zip app (even one named ``.py``), a ``.pyc``) goes to run_path itself."""
    if not (path.endswith('.py') and os.path.isfile(path)):
        import runpy
        return runpy.run_path(path, run_name=run_name)
    import io
    import types
    from _frozen_importlib_external import MAGIC_NUMBER
    with io.open_code(os.path.abspath(path)) as f:
        source = f.read()
    if source[:len(MAGIC_NUMBER)] == MAGIC_NUMBER or b'\0' in source:
        # Compiled code named .py, or a zip archive (source has no NUL): run_path knows
        # what to do.
        import runpy
        return runpy.run_path(path, run_name=run_name)
    code = compile(source, path, 'exec')
    module = types.ModuleType(run_name)
    namespace = module.__dict__
    saved_module = sys.modules.get(run_name, _MISSING)
    saved_argv0 = sys.argv[0]
    sys.modules[run_name] = module
    sys.argv[0] = path
    try:
        namespace.update(__name__=run_name, __file__=path, __cached__=None,
                         __doc__=None, __loader__=None,
                         __package__=run_name.rpartition('.')[0], __spec__=None)
        exec(code, namespace)
    finally:
        try:
            sys.argv[0] = saved_argv0   # (fails if the code emptied sys.argv, as in runpy)
        finally:
            if saved_module is _MISSING:
                del sys.modules[run_name]
            else:
                sys.modules[run_name] = saved_module
    # run_path returns a copy too: the globals of the running code stay its own.
    return namespace.copy()


_MISSING = object()


def import_main_path(main_path):
    """Set sys.modules['__main__'] to the module at ``main_path``."""
    _fixup_main_from_path(main_path)
