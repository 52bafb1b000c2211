"""Pool max_memory_per_child: a worker above the cap after a task is replaced.

Every behaviour runs under fork, spawn and forkserver (conftest.py). The cap is set
relative to what an idle worker of the same start method measures first (a forked
worker's resident set includes the parent's pages it maps).
"""

import os

import pytest

from ferromp import pool as fpool

MiB = 1 << 20
_HELD = []


def worker_rss(_=None):
    return fpool._rss_reader()()


def worker_pid(_=None):
    return os.getpid()


def grow(mib):
    """Keeps ``mib`` MiB more resident (written, so the pages are really there) and
    returns this worker's pid."""
    _HELD.append(b"\x01" * (mib * MiB))
    return os.getpid()


def _idle_rss(ctx):
    with ctx.Pool(1) as p:
        return max(p.map(worker_rss, range(4), chunksize=1))


def test_worker_above_the_cap_is_replaced_after_its_task(start_method):
    cap = _idle_rss(start_method) + 64 * MiB
    with start_method.Pool(1, max_memory_per_child=cap) as pool:
        first = pool.apply(worker_pid)
        # Small tasks leave it alone...
        assert {pool.apply(worker_pid) for _ in range(5)} == {first}
        # ...a task that leaves it 128 MiB larger gets its result back, then the
        # worker is replaced.
        assert pool.apply(grow, (128,)) == first
        assert pool.apply(worker_pid) != first
        assert len(pool._pool) == 1


def test_no_result_is_lost_while_workers_are_replaced(start_method):
    cap = _idle_rss(start_method) + 100 * MiB
    with start_method.Pool(2, max_memory_per_child=cap) as pool:
        pids = pool.map(grow, [40] * 12, chunksize=1)
        assert len(pids) == 12
        # Each worker takes two or three such tasks before it is above the cap.
        assert len(set(pids)) >= 4
        assert pool.map(abs, range(-50, 50)) == [abs(x) for x in range(-50, 50)]


def test_plain_calls_the_core_runs_are_checked_too(start_method):
    cap = _idle_rss(start_method) + 64 * MiB
    with start_method.Pool(1, max_memory_per_child=cap) as pool:
        # Native calls (a builtin over plain ints) return to the Python loop after
        # each task once a cap is set, so the check runs; the results are right.
        assert pool.map(abs, range(-2000, 2000), chunksize=1) == \
            [abs(x) for x in range(-2000, 2000)]
        first = pool.apply(grow, (96,))
        assert pool.map(abs, [-1, -2], chunksize=1) == [1, 2]
        assert pool.apply(worker_pid) != first


def test_bad_cap_raises_at_the_call(start_method):
    for bad, exc in ((0, ValueError), (-5, ValueError), (1.5e9, TypeError),
                     ("1GB", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="max_memory_per_child"):
            start_method.Pool(1, max_memory_per_child=bad)
