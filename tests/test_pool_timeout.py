"""Pool task_timeout: a call that runs too long is stopped with everything it started.

Every behaviour runs under fork, spawn and forkserver (conftest.py). A call that is to
time out first says it has started (it creates a file named by the test), so each test
knows the call was running, not queued, when the timeout struck. The timed-out calls
sleep (``time.sleep``, C code) or spin in one long C call (``hashlib.pbkdf2_hmac``),
so no Python signal handler could stop them.
"""

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

import ferromp
import ferromp.dummy
from ferromp import pool as fpool
from _helpers import pid_gone
from _helpers import wait_for

TIMEOUT = 0.3
# How late a TaskTimeoutError may come after the deadline on this (2-core, noisy)
# machine: the worker dies on SIGTERM, so the grace never runs out here.
SLACK = 1.5


# --- child functions (module level: spawn and forkserver workers import them) --------

def _mark(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))


def hang_when(x, hang, path):
    """x * 10, except for ``hang``: that one says it started, then sleeps."""
    if x == hang:
        _mark(path)
        time.sleep(60)
    return x * 10


def star_hang(x, y, hang, path):
    return hang_when(x, hang, path) + y


def record_then_hang_when(x, hang, path, out_dir):
    """Leaves a file per call it finishes, so a test can see which calls ran."""
    if x == hang:
        _mark(path)
        time.sleep(60)
    _mark(os.path.join(out_dir, "done-%d" % x))
    return x


def busy_c_loop(path):
    _mark(path)
    # One C call of many seconds: no bytecode boundary for a handler to run at.
    return hashlib.pbkdf2_hmac("sha256", b"x", b"salt", 200_000_000)


def start_children_then_sleep(path):
    """Starts a child and a child that ignores SIGTERM; writes their pids, then sleeps."""
    plain = subprocess.Popen(["sleep", "60"])
    stubborn = subprocess.Popen([
        sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "time.sleep(60)"])
    with open(path + ".tmp", "w") as f:
        f.write("%d %d" % (plain.pid, stubborn.pid))
    os.rename(path + ".tmp", path)
    time.sleep(60)


def sleep_then(x, secs):
    time.sleep(secs)
    return x


def worker_pid(_=None):
    return os.getpid()


# --- fixtures --------------------------------------------------------------------------

@pytest.fixture
def marker(tmp_path):
    return str(tmp_path / "started")


def _elapsed_since(t0):
    return time.monotonic() - t0


def _check_error(e, func_name, timeout):
    assert isinstance(e, fpool.TaskTimeoutError)
    assert isinstance(e, multiprocessing.TimeoutError)
    assert isinstance(e, ferromp.TimeoutError)
    assert isinstance(e, TimeoutError)
    assert isinstance(e, fpool.PoolError)
    msg = str(e)
    assert func_name in msg and ("%g s" % timeout) in msg and "pid %d" % e.pid in msg
    assert e.timeout == timeout


# --- tests -------------------------------------------------------------------------------

def test_apply_timeout_stops_the_call(start_method, marker):
    with start_method.Pool(2) as pool:
        before = {p.pid for p in pool._pool}
        t0 = time.monotonic()
        r = pool.apply_async(hang_when, (1, 1, marker), task_timeout=TIMEOUT)
        with pytest.raises(fpool.TaskTimeoutError) as info:
            r.get(30)
        elapsed = _elapsed_since(t0)
        assert os.path.exists(marker)
        _check_error(info.value, "hang_when", TIMEOUT)
        assert TIMEOUT <= elapsed < TIMEOUT + SLACK
        assert wait_for(lambda: pid_gone(info.value.pid), 10)
        # The worker was replaced; the pool goes on.
        assert pool.apply(hang_when, (2, -1, marker)) == 20
        assert info.value.pid in before
        assert info.value.pid not in {p.pid for p in pool._pool}
        # (The engine's thread starts the replacement on its next turn.)
        assert wait_for(lambda: len(pool._pool) == 2, 10)


def test_busy_c_call_is_stopped(start_method, marker):
    with start_method.Pool(1) as pool:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            pool.apply(busy_c_loop, (marker,), task_timeout=TIMEOUT)
        assert os.path.exists(marker)
        assert _elapsed_since(t0) < TIMEOUT + SLACK
        assert pool.apply(sleep_then, (5, 0)) == 5


def test_the_processes_the_call_started_go_too(start_method, marker):
    with start_method.Pool(1) as pool:
        r = pool.apply_async(start_children_then_sleep, (marker,), task_timeout=1.0)
        with pytest.raises(fpool.TaskTimeoutError):
            r.get(30)
        assert os.path.exists(marker)
        plain, stubborn = map(int, open(marker).read().split())
        # SIGTERM to the worker's process group, SIGKILL once the worker is gone: the
        # child that ignores SIGTERM dies too.
        assert wait_for(lambda: pid_gone(plain) and pid_gone(stubborn), 10)


def test_map_fails_and_the_rest_of_the_chunk_runs(start_method, marker, tmp_path):
    out = str(tmp_path)
    with start_method.Pool(2) as pool:
        with pytest.raises(fpool.TaskTimeoutError):
            pool.starmap(record_then_hang_when, [(x, 5, marker, out) for x in range(12)],
                         chunksize=4, task_timeout=TIMEOUT)
        assert os.path.exists(marker)
        # Every call but the one that timed out ran, those after it in its chunk
        # (6 and 7, run again on another worker) included.
        want = {"done-%d" % x for x in range(12) if x != 5}
        assert wait_for(lambda: want <= set(os.listdir(out)), 10)
        assert "done-5" not in os.listdir(out)


def test_map_async_error_callback_gets_the_timeout(start_method, marker):
    got = []
    with start_method.Pool(2) as pool:
        r = pool.starmap_async(hang_when, [(x, 2, marker) for x in range(6)],
                               task_timeout=TIMEOUT, error_callback=got.append)
        with pytest.raises(fpool.TaskTimeoutError):
            r.get(30)
        assert len(got) == 1 and isinstance(got[0], fpool.TaskTimeoutError)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_raises_in_place_and_goes_on(start_method, marker, chunksize):
    with start_method.Pool(2) as pool:
        it = pool.imap(star_hang_one, [(x, 4, marker) for x in range(10)],
                       chunksize=chunksize, task_timeout=TIMEOUT)
        got = []
        while True:
            try:
                got.append(next(it))
            except StopIteration:
                break
            except fpool.TaskTimeoutError as e:
                _check_error(e, "star_hang_one", TIMEOUT)
                got.append("timeout")
        assert got == [x * 10 if x != 4 else "timeout" for x in range(10)]


def star_hang_one(args):
    return hang_when(*args)


@pytest.mark.parametrize("chunksize", [1, 4])
def test_imap_unordered_raises_once_and_goes_on(start_method, marker, chunksize):
    with start_method.Pool(2) as pool:
        it = pool.imap_unordered(star_hang_one, [(x, 6, marker) for x in range(10)],
                                 chunksize=chunksize, task_timeout=TIMEOUT)
        got, errors = [], 0
        while True:
            try:
                got.append(next(it))
            except StopIteration:
                break
            except fpool.TaskTimeoutError:
                errors += 1
        assert errors == 1
        assert sorted(got) == [x * 10 for x in range(10) if x != 6]


def test_pool_default_and_per_call_override(start_method, marker):
    with start_method.Pool(2, task_timeout=TIMEOUT) as pool:
        with pytest.raises(fpool.TaskTimeoutError):
            pool.apply(hang_when, (1, 1, marker))
        # None turns it off for one call; a number replaces it.
        assert pool.apply(sleep_then, (7, TIMEOUT + 0.3), task_timeout=None) == 7
        assert pool.starmap(sleep_then, [(1, TIMEOUT + 0.3)], task_timeout=5) == [1]


def test_queueing_time_does_not_count(start_method):
    # One worker, three calls of 0.2 s each with a 0.35 s timeout: the last waits
    # 0.4 s in the queue, and is not timed out for it.
    with start_method.Pool(1) as pool:
        rs = [pool.apply_async(sleep_then, (i, 0.2), task_timeout=0.35) for i in range(3)]
        assert [r.get(30) for r in rs] == [0, 1, 2]


def test_timed_map_of_plain_numbers_still_packs(start_method):
    with start_method.Pool(2) as pool:
        assert pool.map(abs, range(-500, 500), task_timeout=10) == \
            [abs(x) for x in range(-500, 500)]
        assert pool.starmap(pow, [(x, 2) for x in range(100)], chunksize=7,
                            task_timeout=10) == [x * x for x in range(100)]


def test_a_hundred_timeouts_without_a_hang(start_method, tmp_path):
    with start_method.Pool(2) as pool:
        for run in range(100):
            marker = str(tmp_path / ("m%d" % run))
            it = pool.imap(star_hang_one, [(x, 2, marker) for x in range(5)],
                           task_timeout=0.05)
            got = []
            for _ in range(5):
                try:
                    got.append(next(it, "end"))
                except fpool.TaskTimeoutError:
                    got.append("timeout")
            assert got == [0, 10, "timeout", 30, 40], run
            assert os.path.exists(marker)


def test_bad_task_timeout_raises_at_the_call(start_method):
    with pytest.raises(ValueError):
        start_method.Pool(1, task_timeout=0)
    with pytest.raises(TypeError):
        start_method.Pool(1, task_timeout="1")
    with start_method.Pool(1) as pool:
        for bad, exc in ((-1, ValueError), (float("nan"), ValueError),
                         (float("inf"), ValueError), (True, TypeError), ("2", TypeError)):
            with pytest.raises(exc):
                pool.apply_async(sleep_then, (1, 0), task_timeout=bad)
            with pytest.raises(exc):
                pool.map(abs, [1], task_timeout=bad)
            with pytest.raises(exc):
                pool.imap(abs, [1], task_timeout=bad)
        # Nothing was left behind: the pool is idle and works.
        assert pool._cache == {}
        assert pool.map(abs, [-1, -2]) == [1, 2]


def test_thread_pool_refuses_task_timeout():
    with ferromp.dummy.Pool(2) as pool:
        for call in (lambda: pool.apply(abs, (1,), task_timeout=1),
                     lambda: pool.map(abs, [1], task_timeout=1),
                     lambda: pool.imap(abs, [1], task_timeout=1)):
            with pytest.raises(TypeError, match="ThreadPool does not support"):
                call()
        assert pool.apply(abs, (-3,), task_timeout=None) == 3
    with pytest.raises(TypeError):
        ferromp.pool.ThreadPool(1, task_timeout=1)


def test_workers_lead_their_own_process_group(start_method):
    with start_method.Pool(2) as pool:
        pids = set(pool.map(worker_pid, range(8)))
        assert all(os.getpgid(p) == p for p in pids)
        assert os.getpgid(os.getpid()) not in pids


def test_terminate_during_a_timeout_does_not_hang(start_method, marker):
    pool = start_method.Pool(1)
    r = pool.apply_async(hang_when, (1, 1, marker), task_timeout=TIMEOUT)
    assert wait_for(lambda: os.path.exists(marker), 30)
    time.sleep(TIMEOUT)
    pool.terminate()
    pool.join()
    with pytest.raises((fpool.TaskTimeoutError, fpool.PoolTerminatedError)):
        r.get(10)


def test_signal_sent_is_sigterm(start_method, marker):
    with start_method.Pool(1) as pool:
        with pytest.raises(fpool.TaskTimeoutError) as info:
            pool.apply(hang_when, (1, 1, marker), task_timeout=TIMEOUT)
        assert info.value.exitcode == -signal.SIGTERM
