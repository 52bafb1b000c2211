"""Child-process targets for ``test_shared_memory.py``.

Module-level functions, so they pickle by reference under spawn and forkserver; the
module imports only ferromp (numpy only inside the one target that needs it), so a
spawn child starts cheaply.
"""

import os
import time

from ferromp import resource_tracker
from ferromp import shared_memory

# What a child writes into a ShareableList, one value per supported type, so that
# every item changes type: the parent checks it reads exactly these back.
SL_INITIAL = [1, 2.5, True, None, 'abcdefgh' * 2, b'xyz' * 5]
SL_CHANGED = [None, 'ü€', -(2 ** 63), b'\x00\x01', 3.25, False]


def attach_and_write(name, data):
    """Attach to segment ``name`` and write ``data`` at its start."""
    shm = shared_memory.SharedMemory(name)
    shm.buf[:len(data)] = data
    shm.close()


def write_through(shm, data):
    """Write ``data`` into a SharedMemory that was pickled to this child."""
    shm.buf[:len(data)] = data
    shm.close()


def create_and_report(conn, name, size, data):
    """Create segment ``name`` (random if None), fill it, send its name, exit without
    unlinking: the parent takes it over."""
    shm = shared_memory.SharedMemory(name, create=True, size=size)
    shm.buf[:len(data)] = data
    conn.send(shm.name)
    conn.close()
    shm.close()


def create_and_hang(conn, name, size):
    """Create segment ``name``, send its name, then wait to be killed."""
    shm = shared_memory.SharedMemory(name, create=True, size=size)
    shm.buf[0] = 1
    conn.send(shm.name)
    time.sleep(300)


def numpy_fill(name, n):
    """View segment ``name`` as ``n`` float64 and set element i to i * 0.5."""
    import numpy as np

    shm = shared_memory.SharedMemory(name)
    arr = np.ndarray((n,), dtype=np.float64, buffer=shm.buf)
    arr[:] = np.arange(n) * 0.5
    del arr
    shm.close()


def sl_rewrite(sl, values):
    """Store ``values`` into the (pickled) ShareableList ``sl``, item by item."""
    for i, v in enumerate(values):
        sl[i] = v
    sl.shm.close()


def sl_report(conn, name):
    """Attach to the ShareableList ``name`` and send back its items and format."""
    sl = shared_memory.ShareableList(name=name)
    conn.send((list(sl), sl.format, len(sl)))
    sl.shm.close()


def tracker_view(conn, parent_tracker_pid):
    """Whether this child uses its parent's tracker (same pid or none known, and the
    pipe is alive), after ensure_running(); and the inode of its tracker pipe."""
    rt = resource_tracker._resource_tracker
    rt.ensure_running()
    conn.send((rt._pid in (None, parent_tracker_pid), rt._check_alive(),
               os.fstat(rt._fd).st_ino))
