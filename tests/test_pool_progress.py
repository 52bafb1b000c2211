"""Pool progress=: counts of items done, reported while a map or imap runs.

Every behaviour runs under fork, spawn and forkserver (conftest.py); the results are
the stdlib's (the same call without progress= is the oracle), and the reports are
checked for their totals, their final count and how often they come.
"""

import builtins
import sys
import threading
import time

import pytest

import ferromp.dummy
from _helpers import SHARED_POOLS


def slow_square(x):
    time.sleep(0.001)
    return x * x


def add(x, y):
    return x + y


def _recorder():
    calls = []
    threads = set()

    def progress(done, total):
        calls.append((done, total, time.monotonic()))
        threads.add(threading.current_thread().name)
    return calls, threads, progress


def _check_reports(calls, final, total, started, ended):
    assert calls, "no report"
    assert calls[-1][:2] == (final, total)
    counts = [c[0] for c in calls]
    assert counts == sorted(counts)
    # At most about ten a second, plus the last one.
    assert len(calls) <= 2 + (ended - started) * 10 * 1.5


@pytest.fixture(scope="module")
def pool(start_method):
    with start_method.Pool(2) as p:
        SHARED_POOLS.append(p)
        try:
            yield p
        finally:
            SHARED_POOLS.remove(p)


@pytest.mark.parametrize("how", ["map", "map_async", "starmap", "starmap_async"])
@pytest.mark.parametrize("source", ["list", "generator"])
def test_map_family_reports_every_item(pool, how, source):
    n = 400
    args = [(x, 1) for x in range(n)] if how.startswith("star") else list(range(n))
    iterable = args if source == "list" else (a for a in args)
    func = add if how.startswith("star") else slow_square
    want = [a[0] + 1 for a in args] if how.startswith("star") else [x * x for x in args]
    calls, _, progress = _recorder()
    t0 = time.monotonic()
    call = getattr(pool, how)
    got = call(func, iterable, 7, progress=progress)
    if how.endswith("_async"):
        got = got.get(60)
    _check_reports(calls, n, n, t0, time.monotonic())
    assert got == want


@pytest.mark.parametrize("how", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 5])
@pytest.mark.parametrize("source", ["list", "generator"])
def test_imaps_report_items_not_chunks(pool, how, chunksize, source):
    n = 300
    iterable = list(range(n)) if source == "list" else iter(range(n))
    calls, _, progress = _recorder()
    t0 = time.monotonic()
    got = list(getattr(pool, how)(slow_square, iterable, chunksize, progress=progress))
    # The last report comes before the iteration ends.
    total = n if source == "list" else None
    _check_reports(calls, n, total, t0, time.monotonic())
    want = [x * x for x in range(n)]
    assert (got if how == "imap" else sorted(got)) == want


def test_reports_come_while_it_runs(pool):
    calls, threads, progress = _recorder()
    r = pool.map_async(slow_square, range(600), chunksize=1, progress=progress)
    r.get(60)
    # 600 calls of 1 ms on 2 workers take about 0.3 s: some reports came before the
    # end, from a thread of the pool.
    assert len(calls) >= 2
    assert any(c[0] < 600 for c in calls[:-1])
    assert threads - {threading.main_thread().name}


def test_failed_map_reports_its_end(pool):
    calls, _, progress = _recorder()
    with pytest.raises(ZeroDivisionError):
        pool.starmap(divmod, [(1, x) for x in range(10)], progress=progress)
    assert calls[-1][1] == 10 and calls[-1][0] == 10


def test_empty_map_reports_zero(pool):
    calls, _, progress = _recorder()
    assert pool.map(slow_square, [], progress=progress) == []
    assert calls[-1][:2] == (0, 0)


def test_builtin_bar_without_tqdm(pool, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwds):
        if name == "tqdm" or name.startswith("tqdm."):
            raise ImportError("No module named 'tqdm'")
        return real_import(name, *args, **kwds)
    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    monkeypatch.delitem(sys.modules, "tqdm.auto", raising=False)
    assert pool.map(slow_square, range(50), progress=True) == [x * x for x in range(50)]
    err = capsys.readouterr().err
    assert "50/50 [100%]" in err and "it/s" in err and err.endswith("\n")
    assert pool.map(slow_square, range(5), progress={"desc": "squares"}) == \
        [x * x for x in range(5)]
    assert "squares: 5/5" in capsys.readouterr().err


def test_tqdm_bar_when_installed(pool, capsys):
    tqdm = pytest.importorskip("tqdm")  # a test extra: installed in CI
    assert tqdm is not None
    assert pool.map(slow_square, range(120), progress={"desc": "sq", "ascii": True}) \
        == [x * x for x in range(120)]
    err = capsys.readouterr().err
    assert "sq" in err and "120/120" in err


def test_bad_progress_raises_at_the_call(pool):
    for bad in ("yes", 3, [1]):
        with pytest.raises(TypeError, match="progress must be"):
            pool.map(slow_square, range(3), progress=bad)
        with pytest.raises(TypeError, match="progress must be"):
            pool.imap(slow_square, range(3), progress=bad)
    assert pool._cache == {}
    # False and None mean no progress.
    assert pool.map(slow_square, range(3), progress=False) == [0, 1, 4]


def test_a_raising_callback_does_not_break_the_map(pool, capsys):
    def boom(done, total):
        raise RuntimeError("progress callback failed")
    assert pool.map(slow_square, range(20), progress=boom) == [x * x for x in range(20)]
    assert "progress callback failed" in capsys.readouterr().err


def test_thread_pool_progress():
    calls, _, progress = _recorder()
    with ferromp.dummy.Pool(3) as tp:
        assert tp.map(slow_square, range(100), progress=progress) == \
            [x * x for x in range(100)]
        assert calls[-1][:2] == (100, 100)
        calls.clear()
        assert sorted(tp.imap_unordered(slow_square, range(40), progress=progress)) == \
            [x * x for x in range(40)]
        assert calls[-1][:2] == (40, 40)
