"""Shared fixtures: every process-level behaviour runs under each start method.

``start_method`` is a ferromp context and ``std_ctx`` the stdlib context of the same
method, so a test can do a thing both ways and compare (the stdlib is the oracle, as
in CPython's own ``_test_multiprocessing.py``, which installs each test class once per
start method).

Child targets live in ``_helpers.py``: under spawn and forkserver a target is pickled
by reference, and ``tests/`` (no ``__init__.py``) is on ``sys.path`` here and, through
the preparation data, in every child, so ``_helpers`` imports there too.
"""

import multiprocessing
import os

import pytest

import ferromp

START_METHODS = ("fork", "spawn", "forkserver")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(params=START_METHODS)
def start_method(request):
    """A ferromp context for each start method."""
    return ferromp.get_context(request.param)


@pytest.fixture
def std_ctx(start_method):
    """The stdlib's context for the same start method as ``start_method``."""
    return multiprocessing.get_context(start_method.get_start_method())


@pytest.fixture(autouse=True)
def _reap_leftover_children():
    """Kill and reap any child a failing test left behind, so failures stay local.

    Only processes this test session started are touched (by their Process objects)."""
    yield
    for mod in (ferromp, multiprocessing):
        for p in mod.active_children():
            try:
                p.kill()
                p.join(5)
            except Exception:  # pragma: no cover - best effort cleanup
                pass
