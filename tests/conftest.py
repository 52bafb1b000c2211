"""Shared fixtures: every process-level behaviour runs under each start method.

``start_method`` is a ferromp context and ``std_ctx`` the stdlib context of the same
method, so a test can do a thing both ways and compare (the stdlib is the oracle, as
in CPython's own ``_test_multiprocessing.py``, which installs each test class once per
start method); ``start_method_name`` is the method's name, for a test that hands it on
(to a script, say). All three come from one module-scoped parametrisation, so the tests
of one module and one method run together and may share what is costly to set up
(test_pool.py's pools). ``non_fork_start_method`` is spawn and forkserver only, for
what a forked child inherits but a spawned one refuses. Test modules do not
parametrise over start methods themselves.

Child targets live in ``_helpers.py``: under spawn and forkserver a target is pickled
by reference, and ``tests/`` (no ``__init__.py``) is on ``sys.path`` here and, through
the preparation data, in every child, so ``_helpers`` imports there too.
"""

import multiprocessing
import os

import pytest

import ferromp
from _helpers import SHARED_POOLS, START_METHODS

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", params=START_METHODS)
def start_method_name(request):
    """Each start method's name: "fork", "spawn", "forkserver"."""
    return request.param


@pytest.fixture(scope="module")
def start_method(start_method_name):
    """A ferromp context for each start method."""
    return ferromp.get_context(start_method_name)


@pytest.fixture(scope="module")
def std_ctx(start_method_name):
    """The stdlib's context for the same start method as ``start_method``."""
    return multiprocessing.get_context(start_method_name)


@pytest.fixture(params=[m for m in START_METHODS if m != "fork"])
def non_fork_start_method(request):
    """A ferromp context for spawn and for forkserver: the start methods whose child
    gets the Process object pickled instead of inheriting it."""
    return ferromp.get_context(request.param)


@pytest.fixture(autouse=True)
def _reap_leftover_children():
    """Kill and reap any child a failing test left behind, so failures stay local.

    Only processes this test session started are touched (by their Process objects)."""
    yield
    keep = {id(w) for pool in SHARED_POOLS for w in list(pool._pool)}
    for mod in (ferromp, multiprocessing):
        for p in mod.active_children():
            if id(p) in keep:
                continue    # a module-scoped pool's worker (see _helpers.SHARED_POOLS)
            try:
                p.kill()
                p.join(5)
            except Exception:  # pragma: no cover - best effort cleanup
                pass
