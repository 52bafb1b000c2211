"""Shared memory for ``sharedctypes``: the stdlib's ``multiprocessing.heap``.

A ``Heap`` hands out blocks of shared memory carved from ``Arena``\\ s; a
``BufferWrapper`` owns one block and gives it back when it is collected.

Each arena is a ``_core.Segment``: an anonymous memfd (``src/shm.rs``), not a file in
``/dev/shm`` or a temp directory. The kernel frees it when the last process using it
closes it, so a SIGKILL leaks nothing. Python maps the memfd with ``mmap.mmap``, which
is what ``create_memoryview()`` and ctypes' ``from_buffer`` see. An arena travels to a
child being started as its fd (``reduction.DupFd``), under every start method; a
forked child simply inherits the mapping.

Allocation follows the stdlib's policy, re-implemented: best fit over the free blocks
of every arena (kept by length, with neighbours merged on free), arenas growing from
one page and doubling up to 4 MiB, blocks bigger than that getting an arena of their
own, and empty arenas above ``_DISCARD_FREE_SPACE_LARGER_THAN`` handed back to the
kernel. A forked child starts a fresh heap of its own (it must not allocate in its
parent's arenas), and blocks it inherited are freed only by the parent.
"""

import bisect
import mmap
import os
import sys
import threading
from collections import defaultdict

from . import _core
from . import reduction
from . import util

__all__ = ['BufferWrapper']


class Arena(object):
    """One memfd segment, mapped into this process.

    ``Arena(size)`` creates one; ``Arena(size, fd)`` maps the segment in ``fd``
    (received from another process), taking ownership of that fd.
    """

    def __init__(self, size, fd=-1):
        if fd == -1:
            segment = _core.Segment(size)
        else:
            segment = _core.Segment.from_fd(fd)
        self.size = size
        self._segment = segment
        self.fd = segment.fd
        self.buffer = mmap.mmap(segment.fd, size)

    def __repr__(self):
        return '<%s fd=%d size=%d>' % (type(self).__name__, self.fd, self.size)


def reduce_arena(a):
    # The fd goes with the child being started (or through resource_sharer otherwise).
    return rebuild_arena, (a.size, reduction.DupFd(a.fd))


def rebuild_arena(size, dupfd):
    return Arena(size, dupfd.detach())


reduction.register(Arena, reduce_arena)


def _round_up(n, alignment):
    # alignment is a power of two
    return (n + alignment - 1) & ~(alignment - 1)


class Heap(object):
    """Blocks ``(arena, start, stop)`` of shared memory, allocated best-fit."""

    _alignment = 8
    # Empty arenas at least this large go back to the kernel; smaller ones are kept
    # for reuse, so a loop allocating and freeing one Value does not churn memfds.
    _DISCARD_FREE_SPACE_LARGER_THAN = 4 * 1024 * 1024
    # New arenas double in size until they reach this.
    _DOUBLE_ARENA_SIZE_UNTIL = 4 * 1024 * 1024

    def __init__(self, size=mmap.PAGESIZE):
        self._lastpid = os.getpid()
        self._lock = threading.Lock()
        # Size of the next arena to create.
        self._size = size
        # Free blocks: their sorted lengths, the blocks of each length, and each block
        # by its two ends (to merge it with free neighbours).
        self._lengths = []
        self._len_to_seq = {}
        self._start_to_block = {}
        self._stop_to_block = {}
        # arena -> {(start, stop)} of the blocks handed out and not yet freed.
        self._allocated_blocks = defaultdict(set)
        self._arenas = []
        # Blocks freed while the lock was taken (by the garbage collector running
        # inside malloc, or another thread); the next malloc or free returns them.
        self._pending_free_blocks = []
        self._n_mallocs = 0
        self._n_frees = 0

    # -- free-block bookkeeping

    def _add_free(self, block):
        arena, start, stop = block
        length = stop - start
        seq = self._len_to_seq.get(length)
        if seq is None:
            seq = self._len_to_seq[length] = []
            bisect.insort(self._lengths, length)
        seq.append(block)
        self._start_to_block[(arena, start)] = block
        self._stop_to_block[(arena, stop)] = block

    def _remove_free(self, block):
        arena, start, stop = block
        length = stop - start
        seq = self._len_to_seq[length]
        seq.remove(block)
        if not seq:
            del self._len_to_seq[length]
            del self._lengths[bisect.bisect_left(self._lengths, length)]
        del self._start_to_block[(arena, start)]
        del self._stop_to_block[(arena, stop)]

    def _take_free(self, size):
        # The smallest free block of at least `size` bytes, or a new arena.
        i = bisect.bisect_left(self._lengths, size)
        if i == len(self._lengths):
            return self._new_arena(size)
        block = self._len_to_seq[self._lengths[i]][-1]
        self._remove_free(block)
        return block

    def _new_arena(self, size):
        length = _round_up(max(self._size, size), mmap.PAGESIZE)
        if self._size < self._DOUBLE_ARENA_SIZE_UNTIL:
            self._size *= 2
        util.info('allocating a new mmap of length %d', length)
        arena = Arena(length)
        self._arenas.append(arena)
        return (arena, 0, length)

    def _give_back(self, block):
        # Return a block handed out by malloc; the lock is held.
        arena, start, stop = block
        blocks = self._allocated_blocks[arena]
        blocks.remove((start, stop))
        self._n_frees += 1
        before = self._stop_to_block.get((arena, start))
        if before is not None:
            self._remove_free(before)
            start = before[1]
        after = self._start_to_block.get((arena, stop))
        if after is not None:
            self._remove_free(after)
            stop = after[2]
        if not blocks:
            # Nothing is allocated in the arena any more: the merged block is all of it.
            del self._allocated_blocks[arena]
            if arena.size >= self._DISCARD_FREE_SPACE_LARGER_THAN:
                self._arenas.remove(arena)
                return
        self._add_free((arena, start, stop))

    def _flush_pending(self):
        pending = self._pending_free_blocks
        while pending:
            try:
                block = pending.pop()
            except IndexError:
                break
            self._give_back(block)

    # -- public

    def free(self, block):
        """Give back a block from ``malloc``. Safe to call from a finalizer: if the heap
        is busy, the block is queued and freed by the next call."""
        if os.getpid() != self._lastpid:
            raise ValueError(
                "My pid ({0:n}) is not last pid {1:n}".format(os.getpid(), self._lastpid))
        if not self._lock.acquire(False):
            # list.append is atomic; whoever holds the lock will free it soon.
            self._pending_free_blocks.append(block)
            return
        try:
            self._flush_pending()
            self._give_back(block)
        finally:
            self._lock.release()

    def malloc(self, size):
        """A block ``(arena, start, stop)`` of at least ``size`` bytes."""
        if size < 0:
            raise ValueError("Size {0:n} out of range".format(size))
        if sys.maxsize <= size:
            raise OverflowError("Size {0:n} too large".format(size))
        if os.getpid() != self._lastpid:
            # A forked child: the arenas belong to the parent's allocator.
            self.__init__()
        with self._lock:
            self._n_mallocs += 1
            self._flush_pending()
            size = _round_up(max(size, 1), self._alignment)
            arena, start, stop = self._take_free(size)
            end = start + size
            if end < stop:
                self._add_free((arena, end, stop))
            self._allocated_blocks[arena].add((start, end))
            return (arena, start, end)


class BufferWrapper(object):
    """One block of shared memory, freed when this object is collected (in the
    process that allocated it). Pickles as its arena and offsets."""

    _heap = Heap()

    def __init__(self, size):
        if size < 0:
            raise ValueError("Size {0:n} out of range".format(size))
        if sys.maxsize <= size:
            raise OverflowError("Size {0:n} too large".format(size))
        block = BufferWrapper._heap.malloc(size)
        self._state = (block, size)
        util.Finalize(self, BufferWrapper._heap.free, args=(block,))

    def create_memoryview(self):
        """A writable memoryview of exactly the requested size over the block."""
        (arena, start, stop), size = self._state
        return memoryview(arena.buffer)[start:start + size]
