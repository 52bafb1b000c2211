"""Pool.stats(): per-worker counts and replacements by cause.

Every behaviour runs under fork, spawn and forkserver (conftest.py).
"""

import json
import os
import time

import pytest

import ferromp.dummy
from ferromp import pool as fpool

_HELD = []


def double(x):
    return 2 * x


def nap(secs):
    time.sleep(secs)
    return secs


def blob(n):
    return b"x" * n


def die():
    os._exit(3)


def hang():
    time.sleep(60)


def grow(mib):
    _HELD.append(b"\x01" * (mib << 20))
    return os.getpid()


def worker_rss(_=None):
    return fpool._rss_reader()()


def _tasks(st):
    return sum(w["tasks"] for w in st["workers"]) + st["exited"]["tasks"]


def _settled(pool, want):
    # Counters are written by the workers as they answer; a worker that exits is
    # counted once the pool has seen it go.
    deadline = time.monotonic() + 10
    while True:
        st = pool.stats()
        if want(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.02)


def test_counts_tasks_bytes_and_busy_time(start_method):
    with start_method.Pool(2) as pool:
        assert pool.map(double, range(300), chunksize=1) == [2 * x for x in range(300)]
        assert pool.map(double, range(300), chunksize=30) == [2 * x for x in range(300)]
        assert len(pool.apply(blob, (100_000,))) == 100_000
        assert pool.apply(nap, (0.3,)) == 0.3
        st = _settled(pool, lambda s: _tasks(s) == 300 + 10 + 2)
        assert _tasks(st) == 312
        assert len(st["workers"]) == 2 and all(w["pid"] for w in st["workers"])
        assert sum(w["result_bytes"] for w in st["workers"]) >= 100_000
        assert sum(w["arg_bytes"] for w in st["workers"]) > 300
        # The 0.3 s nap, measured by a clock with a few-ms tick.
        assert sum(w["busy_seconds"] for w in st["workers"]) >= 0.25
        assert st["replaced"] == {"died": 0, "timed_out": 0, "memory": 0, "maxtasks": 0}
        json.dumps(st)


def test_replacements_by_cause(start_method, tmp_path):
    with start_method.Pool(1, maxtasksperchild=5) as pool:
        pool.map(double, range(20), chunksize=1)
        st = _settled(pool, lambda s: s["replaced"]["maxtasks"] >= 3)
        assert st["replaced"]["maxtasks"] >= 3
        assert _tasks(st) == 20
    with start_method.Pool(1) as pool:
        with pytest.raises(fpool.WorkerLostError):
            pool.apply(die)
        with pytest.raises(fpool.TaskTimeoutError):
            pool.apply(hang, task_timeout=0.2)
        st = _settled(pool, lambda s: s["replaced"]["died"] and s["replaced"]["timed_out"])
        assert st["replaced"] == {"died": 1, "timed_out": 1, "memory": 0, "maxtasks": 0}
    with start_method.Pool(1) as pool:
        idle = pool.apply(worker_rss)
    with start_method.Pool(1, max_memory_per_child=idle + (64 << 20)) as pool:
        pool.apply(grow, (128,))
        st = _settled(pool, lambda s: s["replaced"]["memory"])
        assert st["replaced"]["memory"] == 1 and st["exited"]["tasks"] == 1


def test_thread_pool_counts_tasks_without_bytes():
    with ferromp.dummy.Pool(2) as tp:
        tp.map(double, range(50), chunksize=1)
        tp.apply(nap, (0.1,))
        st = tp.stats()
        assert _tasks(st) == 51
        assert all(w["arg_bytes"] is None and w["result_bytes"] is None
                   for w in st["workers"])
        assert sum(w["busy_seconds"] for w in st["workers"]) >= 0.09
        json.dumps(st)
