"""ferromp: Python's ``multiprocessing`` with a Rust core.

Use it as ``import ferromp as multiprocessing``: the module-level names are those of
the stdlib package, bound to the default context (see ``context``).
"""

import sys

from . import context

__version__ = '0.1.0'

__all__ = [x for x in dir(context._default_context) if not x.startswith('_')]

# Bind the default context's methods as module functions. The stdlib's exception
# classes are resolved lazily (module __getattr__ below) so importing ferromp does not
# import the stdlib package.
globals().update((name, getattr(context._default_context, name))
                 for name in __all__ if name not in context._EXCEPTIONS)


def __getattr__(name):
    if name in context._EXCEPTIONS:
        return getattr(context._stdlib_context(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Beyond the stdlib: the by-value fallback for lambdas, closures and interactive code
# (cloudpickle); see reduction.
from .reduction import get_pickle_fallback, set_pickle_fallback  # noqa: E402,F401

SUBDEBUG = 5
SUBWARNING = 25

# A spawn or forkserver child re-imports the parent's main module under this name;
# in the parent it is the main module itself, so pickles made here resolve there.
if '__main__' in sys.modules:
    sys.modules['__mp_main__'] = sys.modules['__main__']
