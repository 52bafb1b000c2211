"""Tests for ferromp.shared_memory and ferromp.resource_tracker, the stdlib as oracle.

Cross-process behaviour runs under fork, spawn and forkserver (``start_method``).
Errors are compared with the stdlib's for the same call (type, errno, filename,
message). Segments of the stdlib and of ferromp are the same kind of object, so the
two attach to each other's segments, and a ShareableList written by one is read by
the other. Names made here carry this process's pid, so concurrent runs and other
programs' segments in ``/dev/shm`` do not disturb the leak checks.
"""

import multiprocessing.resource_tracker as std_rt
import multiprocessing.shared_memory as std_sm
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import _shm_helpers
from _helpers import TESTS_DIR, child_env, outcome, pid_gone, run_to_completion, wait_for
from ferromp import resource_tracker
from ferromp import shared_memory

START = 60.0
_counter = [0]


def fresh_name(tag='t'):
    """A segment name nobody else uses: ``fmp<pid>_<tag><n>`` (no leading slash)."""
    _counter[0] += 1
    return 'fmp%d_%s%d' % (os.getpid(), tag, _counter[0])


def ours_in_dev_shm():
    """The entries of /dev/shm made by this test process (named by fresh_name)."""
    prefix = 'fmp%d_' % os.getpid()
    return sorted(n for n in os.listdir('/dev/shm') if n.startswith(prefix))


def run(ctx, target, *args):
    return run_to_completion(ctx, target, *args, timeout=START)


def std_forget(shm):
    """Close a stdlib SharedMemory and drop it from the stdlib's tracker (the segment
    itself is someone else's to unlink)."""
    shm.close()
    std_rt.unregister(shm._name, 'shared_memory')


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Every test leaves /dev/shm as it found it (for the names this process makes)."""
    before = ours_in_dev_shm()
    yield
    assert ours_in_dev_shm() == before


#
# SharedMemory in one process
#

def test_create_attach_close_unlink():
    name = fresh_name()
    shm = shared_memory.SharedMemory(name, create=True, size=512)
    assert shm.name == name and shm._name == '/' + name
    assert shm.size == 512 and len(shm.buf) == 512
    assert os.path.exists('/dev/shm/' + name)
    assert os.stat('/dev/shm/' + name).st_mode & 0o777 == 0o600
    assert repr(shm) == "SharedMemory(%r, size=512)" % name
    shm.buf[0] = 42
    also = shared_memory.SharedMemory(name, size=20 * 512)  # size ignored on attach
    assert also.size == 512 and also.buf[0] == 42
    also.buf[1] = 43
    also.close()
    also.close()  # twice is fine
    assert also.buf is None
    assert shm.buf[1] == 43
    shm.close()
    shm.unlink()
    assert not os.path.exists('/dev/shm/' + name)


def test_random_names():
    shm = shared_memory.SharedMemory(create=True, size=10)
    try:
        assert shm._name.startswith(shared_memory._SHM_NAME_PREFIX)
        assert shm.name == shm._name[1:]
        assert len(shm._name) <= 14
        assert shared_memory._USE_POSIX
    finally:
        shm.close()
        shm.unlink()


def test_make_filename_is_looked_up_at_call_time(monkeypatch):
    taken = fresh_name('taken')
    free = fresh_name('free')
    first = shared_memory.SharedMemory(taken, create=True, size=1)
    names = iter(['/' + taken, '/' + free])
    monkeypatch.setattr(shared_memory, '_make_filename', lambda: next(names))
    # The first candidate exists: the next one is tried, as in the stdlib.
    second = shared_memory.SharedMemory(create=True, size=1)
    assert second._name == '/' + free
    for shm in (first, second):
        shm.close()
        shm.unlink()


def test_buf_is_zero_copy_and_numpy_wraps_it():
    name = fresh_name()
    shm = shared_memory.SharedMemory(name, create=True, size=8 * 100)
    other = shared_memory.SharedMemory(name)
    a = np.ndarray((100,), dtype=np.int64, buffer=shm.buf)
    b = np.ndarray((100,), dtype=np.int64, buffer=other.buf)
    a[:] = np.arange(100)
    assert b.sum() == 4950
    b[7] = -1
    assert a[7] == -1 and not shm.buf.readonly
    del a, b
    other.close()
    shm.close()
    shm.unlink()


def test_pickle_by_name():
    shm = shared_memory.SharedMemory(create=True, size=64)
    try:
        shm.buf[:6] = b'pickle'
        for proto in range(pickle.HIGHEST_PROTOCOL + 1):
            again = pickle.loads(pickle.dumps(shm, protocol=proto))
            assert isinstance(again, shared_memory.SharedMemory)
            assert again.name == shm.name and again.size == shm.size
            again.buf[:3] = b'PIC'
            assert bytes(shm.buf[:6]) == b'PICkle'
            again.close()
        assert shm.__reduce__() == (shared_memory.SharedMemory, (shm.name, False, 64))
    finally:
        shm.close()
        shm.unlink()
    # Once unlinked, unpickling fails to attach.
    with pytest.raises(FileNotFoundError):
        pickle.loads(pickle.dumps(shm))


def test_open_or_create_subclass_flags():
    # The stdlib suite's OptionalAttachSharedMemory: O_CREAT without O_EXCL attaches.
    class OptionalAttach(shared_memory.SharedMemory):
        _flags = os.O_CREAT | os.O_RDWR

    name = fresh_name()
    shm = shared_memory.SharedMemory(name, create=True, size=300)
    other = OptionalAttach(name)
    assert other.size == 300
    other.close()
    shm.close()
    shm.unlink()


def _error_cases(mod, existing, missing):
    SM = mod.SharedMemory
    return [
        lambda: SM(create=True, size=-1),
        lambda: SM(create=True, size=0),
        lambda: SM(create=True),
        lambda: SM(),
        lambda: SM(size=-5),
        lambda: SM(missing),
        lambda: SM(existing, create=True, size=10),
        lambda: SM('a/b', create=True, size=10),
        lambda: SM('x' * 300),
        lambda: SM(123),
    ]


def test_errors_match_stdlib():
    existing = fresh_name('exists')
    missing = fresh_name('missing')
    shm = shared_memory.SharedMemory(existing, create=True, size=10)
    try:
        ours = [outcome(f) for f in _error_cases(shared_memory, existing, missing)]
        theirs = [outcome(f) for f in _error_cases(std_sm, existing, missing)]
        assert ours == theirs
        # And the OSError details: subclass, errno, filename.
        for kwargs, exc in (({}, FileNotFoundError),
                            ({'create': True, 'size': 1}, FileExistsError)):
            name = missing if exc is FileNotFoundError else existing
            with pytest.raises(exc) as ours_e:
                shared_memory.SharedMemory(name, **kwargs)
            with pytest.raises(exc) as theirs_e:
                std_sm.SharedMemory(name, **kwargs)
            assert ours_e.value.errno == theirs_e.value.errno
            assert ours_e.value.filename == theirs_e.value.filename == '/' + name
    finally:
        shm.close()
        shm.unlink()


def test_double_unlink_matches_stdlib():
    results = []
    for mod in (shared_memory, std_sm):
        shm = mod.SharedMemory(fresh_name('dbl'), create=True, size=10)
        shm.close()
        shm.unlink()
        with pytest.raises(FileNotFoundError) as e:
            shm.unlink()
        results.append((e.value.errno, e.value.strerror, e.value.filename == shm._name))
    assert results[0] == results[1]


def test_embedded_nul_is_rejected():
    with pytest.raises(ValueError):
        shared_memory.SharedMemory('a\x00b', create=True, size=10)


def test_interop_with_stdlib_segments():
    name = fresh_name('interop')
    ours = shared_memory.SharedMemory(name, create=True, size=100)
    ours.buf[:5] = b'ferro'
    theirs = std_sm.SharedMemory(name)
    assert bytes(theirs.buf[:5]) == b'ferro' and theirs.size == ours.size
    theirs.buf[:3] = b'std'
    assert bytes(ours.buf[:5]) == b'stdro'
    std_forget(theirs)
    ours.close()
    ours.unlink()


#
# ShareableList
#

EVERY_TYPE = ['howdy', b'HoWdY', -273.154, 100, None, True, 42, False, '', b'',
              2 ** 63 - 1, -(2 ** 63), 'x' * 8, b'y' * 16, 0.0, 'é', 1e300]


def test_shareable_list_round_trip_every_type():
    sl = shared_memory.ShareableList(EVERY_TYPE)
    std = std_sm.ShareableList(EVERY_TYPE)
    try:
        assert list(sl) == EVERY_TYPE
        assert [type(v) for v in sl] == [type(v) for v in EVERY_TYPE]
        assert sl.format == std.format
        assert sl.shm.size == std.shm.size
        assert len(sl) == len(EVERY_TYPE)
        assert repr(sl) == 'ShareableList(%r, name=%r)' % (EVERY_TYPE, sl.shm.name)
        # The same bytes, so each side reads the other's list.
        assert bytes(sl.shm.buf) == bytes(std.shm.buf)
        theirs = std_sm.ShareableList(name=sl.shm.name)
        assert list(theirs) == EVERY_TYPE
        theirs[0] = 'hi'
        assert sl[0] == 'hi'
        std_forget(theirs.shm)
        mine = shared_memory.ShareableList(name=std.shm.name)
        assert list(mine) == EVERY_TYPE and mine.format == std.format
        mine.shm.close()
        mine.shm.unlink()
        std_rt.unregister(std.shm._name, 'shared_memory')
    finally:
        std.shm.close()
        sl.shm.close()
        sl.shm.unlink()


def _sl_ops(mod, name):
    """The same reads, writes and mistakes on a list of ``mod``; what each gives."""
    sl = mod.ShareableList(['howdy', b'HoWdY', -273.154, 100, None, True, 42], name=name)
    results = []

    def setitem(i, v):
        sl[i] = v

    for f in (lambda: sl[7], lambda: setitem(7, 2), lambda: sl[1:3],
              lambda: setitem(slice(0, 1), 1), lambda: setitem(0, 'howdy'),
              lambda: setitem(3, 42), lambda: setitem(4, 'some'),
              lambda: setitem(4, 'far too many'), lambda: setitem(0, 'encodés'),
              lambda: setitem(0, 'encodées'), lambda: setitem(1, b'123456789'),
              lambda: setitem(5, 7), lambda: setitem(6, 'ok'), lambda: setitem(2, []),
              lambda: setitem(-1, 2.5), lambda: sl[-7],
              lambda: sl.count(42), lambda: sl.index(42), lambda: sl.index('nope'),
              lambda: sl._get_packing_format(0), lambda: sl._get_packing_format(99),
              lambda: setitem(1, b'ab\x00\x00'), lambda: sl[1],
              lambda: setitem(0, 'a\x00'), lambda: sl[0], lambda: len(sl)):
        results.append(outcome(f))
        results.append((sl.format, list(sl)))
    sl.shm.close()
    sl.shm.unlink()
    return results


def _normalise(results):
    # Both reject a slice index with TypeError, in different words.
    return [(TypeError, 'slice') if r[0] is TypeError else r for r in results]


def test_shareable_list_behaviour_matches_stdlib():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', BytesWarning)
        ours = _sl_ops(shared_memory, fresh_name('slops'))
        theirs = _sl_ops(std_sm, fresh_name('slops'))
    assert _normalise(ours) == _normalise(theirs)


def test_shareable_list_index_below_minus_len_raises():
    # The stdlib wraps such an index around twice and reads or writes another slot.
    sl = shared_memory.ShareableList([1, 2, 3])
    try:
        with pytest.raises(IndexError, match='index out of range'):
            sl[-4]
        with pytest.raises(IndexError, match='assignment index out of range'):
            sl[-4] = 0
        assert list(sl) == [1, 2, 3]
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_shareable_list_unpackable_value_leaves_item_alone():
    sl = shared_memory.ShareableList(['text'])
    try:
        with pytest.raises(struct.error):
            sl[0] = 2 ** 64
        assert sl[0] == 'text' and sl.format == '8s'
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_shareable_list_empty_and_copy():
    empty = shared_memory.ShareableList()
    assert len(empty) == 0 and empty.format == '' and list(empty) == []
    assert empty.count('any') == 0
    with pytest.raises(ValueError):
        empty.index(None)
    empty.shm.close()
    empty.shm.unlink()

    sl = shared_memory.ShareableList(range(5))
    name = fresh_name('copy')
    copy = shared_memory.ShareableList(sl, name=name)
    assert copy.shm.name == name and list(copy) == [0, 1, 2, 3, 4]
    copy[0] = 9
    assert sl[0] == 0
    for x in (sl, copy):
        x.shm.close()
        x.shm.unlink()


def test_shareable_list_multibyte_text_is_not_truncated():
    # The stdlib sizes this slot from 5 characters (8 bytes) and cuts the 10 bytes of
    # UTF-8 short; ferromp gives it room.
    sl = shared_memory.ShareableList(['ééééé', 'abc'])
    try:
        assert list(sl) == ['ééééé', 'abc']
        assert sl.format == '16s8s'
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_shareable_list_pickling():
    sl = shared_memory.ShareableList(range(10))
    big = shared_memory.ShareableList(range(400))
    try:
        for proto in range(pickle.HIGHEST_PROTOCOL + 1):
            data = pickle.dumps(sl, protocol=proto)
            again = pickle.loads(data)
            assert again is not sl and again[-1] == 9
            again[4] = 'changed'
            assert sl[4] == 'changed'
            # By name only: a longer list pickles to the same size.
            assert len(pickle.dumps(big, protocol=proto)) == len(data)
            again.shm.close()
        assert shared_memory.ShareableList[int] is not None
    finally:
        for x in (sl, big):
            x.shm.close()
            x.shm.unlink()
    with pytest.raises(FileNotFoundError):
        pickle.loads(pickle.dumps(sl))


#
# Across processes, under every start method
#

def test_child_attaches_by_name(start_method):
    name = fresh_name('child')
    shm = shared_memory.SharedMemory(name, create=True, size=512)
    try:
        run(start_method, _shm_helpers.attach_and_write, name, b'howdy')
        assert bytes(shm.buf[:5]) == b'howdy'
        run(start_method, _shm_helpers.write_through, shm, b'HELLO')
        assert bytes(shm.buf[:5]) == b'HELLO'
    finally:
        shm.close()
        shm.unlink()


def test_child_creates_parent_attaches(start_method):
    r, w = start_method.Pipe(duplex=False)
    p = start_method.Process(target=_shm_helpers.create_and_report,
                             args=(w, None, 100, b'from child'))
    p.start()
    name = r.recv()
    p.join(START)
    assert p.exitcode == 0
    shm = shared_memory.SharedMemory(name)
    assert bytes(shm.buf[:10]) == b'from child'
    shm.close()
    shm.unlink()


def test_numpy_in_child(start_method):
    name = fresh_name('np')
    n = 1000
    shm = shared_memory.SharedMemory(name, create=True, size=8 * n)
    try:
        run(start_method, _shm_helpers.numpy_fill, name, n)
        arr = np.ndarray((n,), dtype=np.float64, buffer=shm.buf)
        assert np.array_equal(arr, np.arange(n) * 0.5)
        del arr
    finally:
        shm.close()
        shm.unlink()


def test_shareable_list_to_child(start_method):
    sl = shared_memory.ShareableList(_shm_helpers.SL_INITIAL)
    try:
        run(start_method, _shm_helpers.sl_rewrite, sl, _shm_helpers.SL_CHANGED)
        assert list(sl) == _shm_helpers.SL_CHANGED
        r, w = start_method.Pipe(duplex=False)
        p = start_method.Process(target=_shm_helpers.sl_report, args=(w, sl.shm.name))
        p.start()
        items, fmt, n = r.recv()
        p.join(START)
        assert (items, fmt, n) == (list(sl), sl.format, len(sl))
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_children_share_the_tracker(start_method):
    resource_tracker.ensure_running()
    pid = resource_tracker._resource_tracker._pid
    r, w = start_method.Pipe(duplex=False)
    p = start_method.Process(target=_shm_helpers.tracker_view, args=(w, pid))
    p.start()
    reused, alive, inode = r.recv()
    p.join(START)
    assert reused and alive
    # The very same pipe: no second tracker anywhere (under forkserver the fd came
    # through the server).
    assert inode == os.fstat(resource_tracker._resource_tracker._fd).st_ino
    assert resource_tracker._resource_tracker._pid == pid


#
# The resource tracker
#

def test_register_too_long_name():
    with pytest.raises(ValueError, match='msg too long'):
        resource_tracker.register('a' * (512 - len('shared_memory')), 'shared_memory')


def test_tracker_ignores_sigint_sigterm_and_is_relaunched_after_sigkill():
    rt = resource_tracker._resource_tracker
    rt.ensure_running()
    pid = rt._pid
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(pid, sig)
    time.sleep(0.5)
    assert not pid_gone(pid) and rt._check_alive()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        resource_tracker.ensure_running()
    assert caught == [] and rt._pid == pid

    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: pid_gone(pid), 10)
    name = fresh_name('relaunch')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        shm = shared_memory.SharedMemory(name, create=True, size=10)
    assert [str(w.message) for w in caught] == [
        'resource_tracker: process died unexpectedly, relaunching.  '
        'Some resources might leak.']
    assert issubclass(caught[0].category, UserWarning)
    assert rt._pid != pid and rt._check_alive()
    shm.close()
    shm.unlink()


def test_fresh_tracker_survives_an_immediate_sigint():
    # The signals are blocked from before the start until main() ignores them.
    rt = resource_tracker.ResourceTracker()
    try:
        rt.ensure_running()
        os.kill(rt._pid, signal.SIGINT)
        os.kill(rt._pid, signal.SIGTERM)
        time.sleep(0.5)
        assert rt._check_alive()
    finally:
        rt._stop()
    assert rt._pid is None and rt._fd is None


KILL_SCRIPT = textwrap.dedent('''\
    import sys, time
    import ferromp
    from ferromp import resource_tracker
    import _shm_helpers

    if __name__ == '__main__':
        method, name = sys.argv[1], sys.argv[2]
        ctx = ferromp.get_context(method)
        resource_tracker.ensure_running()
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_shm_helpers.create_and_hang, args=(w, name, 4096))
        p.start()
        print(r.recv(), p.pid, resource_tracker._resource_tracker._pid, flush=True)
        time.sleep(300)
''')


def test_tracker_unlinks_segment_of_sigkilled_child(start_method, tmp_path):
    script = tmp_path / 'kill_script.py'
    script.write_text(KILL_SCRIPT)
    name = fresh_name('kill')
    before = ours_in_dev_shm()
    proc = subprocess.Popen(
        [sys.executable, str(script), start_method.get_start_method(), name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_env(), cwd=TESTS_DIR, start_new_session=True)
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == name, proc.stderr.read()
        child, tracker = int(line[1]), int(line[2])
        os.kill(child, signal.SIGKILL)
        # The tracker waits for the whole program, not one process.
        time.sleep(0.3)
        assert os.path.exists('/dev/shm/' + name)
        os.kill(proc.pid, signal.SIGKILL)
        # The tracker holds our stderr pipe until it has cleaned up and exited.
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert wait_for(lambda: pid_gone(tracker), 10)
    assert not os.path.exists('/dev/shm/' + name)
    assert ours_in_dev_shm() == before
    assert ('resource_tracker: There appear to be 1 leaked shared_memory objects '
            'to clean up at shutdown') in err


def test_tracker_warns_about_segments_left_at_exit(tmp_path):
    # No child at all: a program that forgets to unlink gets the stdlib's warning and
    # its segment removed, and an unknown resource type is reported, not fatal.
    name = fresh_name('exit')
    code = textwrap.dedent('''\
        import sys
        from ferromp import resource_tracker, shared_memory
        shm = shared_memory.SharedMemory(sys.argv[1], create=True, size=10)
        resource_tracker.register('whatever', 'no_such_type')
        print(resource_tracker._resource_tracker._pid, flush=True)
    ''')
    proc = subprocess.run([sys.executable, '-c', code, name], capture_output=True,
                          text=True, env=child_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert wait_for(lambda: pid_gone(int(proc.stdout)), 10)
    assert not os.path.exists('/dev/shm/' + name)
    assert ('resource_tracker: There appear to be 1 leaked shared_memory objects '
            'to clean up at shutdown') in proc.stderr
    assert ('Cannot register whatever for automatic cleanup: unknown resource type '
            'no_such_type') in proc.stderr


def test_no_segment_outlives_a_busy_program(start_method):
    # Leak check: random and chosen names, lists, pickled copies and a segment made
    # by a child; afterwards none of them is left in /dev/shm.
    before = set(os.listdir('/dev/shm'))
    made = []
    for i in range(10):
        sl = shared_memory.ShareableList([i, str(i), b'x' * i])
        shm = shared_memory.SharedMemory(fresh_name('busy'), create=True, size=100 + i)
        again = pickle.loads(pickle.dumps(shm))
        again.close()
        made += [shm.name, sl.shm.name]
        for x in (shm, sl.shm):
            x.close()
            x.unlink()
    r, w = start_method.Pipe(duplex=False)
    p = start_method.Process(target=_shm_helpers.create_and_report,
                             args=(w, None, 64, b'x'))
    p.start()
    name = r.recv()
    p.join(START)
    made.append(name)
    shm = shared_memory.SharedMemory(name)
    shm.close()
    shm.unlink()
    after = set(os.listdir('/dev/shm'))
    assert not (after - before) & set(made)
    assert not after & set(made)


PRELOAD_SCRIPT = textwrap.dedent('''\
    import os
    import ferromp
    from ferromp import forkserver

    ctx = ferromp.get_context('forkserver')
    lock = ctx.Lock()   # also made in the server, which preloads this module

    def trackers(parents):
        found = []
        for pid in filter(str.isdigit, os.listdir('/proc')):
            try:
                with open('/proc/%s/cmdline' % pid, 'rb') as f:
                    cmd = f.read()
                with open('/proc/%s/stat' % pid) as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except OSError:
                continue
            if b'ferromp.resource_tracker import main' in cmd and ppid in parents:
                found.append(int(pid))
        return found

    if __name__ == '__main__':
        p = ctx.Process(target=os.getpid)
        p.start()
        p.join()
        assert p.exitcode == 0
        print(len(trackers({os.getpid(), forkserver._forkserver._forkserver_pid})))
''')


def test_forkserver_preloading_main_uses_the_parents_tracker(tmp_path):
    script = tmp_path / 'preload_main.py'
    script.write_text(PRELOAD_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=child_env(), cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ['1'], proc.stderr
    assert proc.stderr == ''
