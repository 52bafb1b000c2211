"""Large pickle buffers between the processes of a pool, through shared memory.

A pool task or result that holds a large out-of-band buffer (pickle protocol 5: a
numpy array, a bytearray, anything whose ``__reduce_ex__`` gives a ``PickleBuffer``)
does not travel through the task or result ring. The sender copies each such buffer
into a named shared-memory segment and sends the segment's number; the receiver maps
the segment and gives the mapping itself to ``loads``, so the rebuilt array lives in the
segment: one copy on the way, none on arrival.

The segments belong to the pool, not to a process: a ``Table`` of ``SLOTS`` entries in
a small shared segment holds, per entry, a state word (0 free, 1 in use) and the
size of the entry's segment (0: none yet), and every process of the pool takes free
entries with a compare-and-swap. The receiver's mapping (``_Mapping``) frees its entry
when the last object built on it is garbage-collected, and the next large buffer of
about the same size, whoever sends it, reuses the segment. On the VMs we run on,
faulting in fresh pages costs several times more than copying into pages already there
(100 MB: about 60 ms against 6 ms), so repeated transfers pay the copy only, and a
pool of any size warms up two segments for a ping-pong of one array.

The pool's owner (the process that made the table) unlinks every segment when the
pool ends (a receiver's mapping outlives the name), and registers each segment it
sends or receives with its resource tracker, which unlinks them if the owner is
killed. Workers do not register: they may have no tracker of their own, and a second
one would disagree with the owner's about who unlinked what.
A buffer that finds every entry busy goes through the ring as before.
"""

import io
import mmap
import os
import pickle

from . import _core
from . import reduction
from . import resource_tracker

__all__ = ['Table', 'dumps']

#: Buffers at least this large are spilled to a segment.
SPILL_MIN = 1 << 20
#: Entries of a pool's table.
SLOTS = 32
_FREE, _BUSY = 0, 1


class Table:
    """A pool's spill segments: shared by the pool's processes (pickled into them)."""

    def __init__(self, token=None, words=None, owner=None):
        self.token = token or os.urandom(6).hex()
        self.words = words or _core.Segment(64 * 2 * SLOTS)
        self.owner = owner or os.getpid()
        self.maps = {}          # entry -> (size, mmap) this process writes through
        self.tracked = set()    # entries the owner registered with its tracker

    def __getstate__(self):
        from . import context
        context.assert_spawning(self)
        return self.token, reduction.DupFd(self.words.fd), self.owner

    def __setstate__(self, state):
        token, fd, owner = state
        self.__init__(token, _core.Segment.from_fd(fd.detach()), owner)
        register(self)

    def _track(self, i):
        if i not in self.tracked and os.getpid() == self.owner:
            self.tracked.add(i)
            resource_tracker.register(self.name(i), 'shared_memory')

    def name(self, i):
        return '/fmp-spill-%s-%d' % (self.token, i)

    def put(self, buf):
        """Copies ``buf`` (a contiguous memoryview) into a free entry's segment and
        returns ``(entry, nbytes)``; None when every entry is busy."""
        n = buf.nbytes
        i = self._take(n)
        if i is None:
            return None
        try:
            mapping = self._writable(i, n)
            self._track(i)
            mapping[0:n] = buf
        except BaseException:
            self.words.store_word(2 * i, _FREE)
            raise
        return i, n

    def _take(self, n):
        words = self.words
        best = empty = None
        for i in range(SLOTS):
            size = words.load_word(2 * i + 1)
            if words.load_word(2 * i) != _FREE:
                continue
            if size == 0:
                if empty is None:
                    empty = i
            elif n <= size <= 4 * n and (best is None or size < best[1]):
                best = (i, size)
        # The best fit first, then a new segment, then any free one.
        first = [i for i in (best and best[0], empty) if i is not None]
        for i in first + list(range(SLOTS)):
            if words.cas_word(2 * i, _FREE, _BUSY):
                return i
        return None

    def _writable(self, i, n):
        words = self.words
        size = words.load_word(2 * i + 1)
        if size < n:
            # Too small or none yet: a new segment under the same name (sizes only
            # grow, so an equal size always means the same segment).
            name = self.name(i)
            if size:
                try:
                    _core.shm_unlink(name)
                except OSError:
                    pass
            flags = os.O_CREAT | os.O_EXCL | os.O_RDWR
            try:
                fd, _ = _core.shm_open_sized(name, flags, 0o600, n)
            except FileExistsError:
                # Left by a process that died between creating it and recording it.
                _core.shm_unlink(name)
                fd, _ = _core.shm_open_sized(name, flags, 0o600, n)
            os.close(fd)
            words.store_word(2 * i + 1, n)
            size = n
        cached = self.maps.get(i)
        if cached is None or cached[0] != size:
            fd, _ = _core.shm_open_sized(self.name(i), os.O_RDWR, 0o600, 0)
            try:
                cached = (size, mmap.mmap(fd, size))
            finally:
                os.close(fd)
            self.maps[i] = cached
        return cached[1]

    def open(self, i, n):
        """A view of entry ``i``'s first ``n`` bytes that frees the entry once it
        (and everything built on it) is gone."""
        self._track(i)
        fd, size = _core.shm_open_sized(self.name(i), os.O_RDWR, 0o600, 0)
        try:
            mapping = _Mapping(fd, size)
        finally:
            os.close(fd)
        mapping.entry = (self.words, i)
        return memoryview(mapping)[:n]

    def unlink_all(self):
        """Removes every segment's name (the pool's owner, when the pool ends)."""
        for i in range(SLOTS):
            if self.words.load_word(2 * i + 1):
                try:
                    _core.shm_unlink(self.name(i))
                except OSError:
                    pass
        for i in self.tracked:
            resource_tracker.unregister(self.name(i), 'shared_memory')
        self.tracked.clear()
        for _, m in self.maps.values():
            try:
                m.close()
            except BufferError:
                pass
        self.maps.clear()


class _Mapping(mmap.mmap):
    """A received segment; frees its table entry once nothing uses it."""

    entry = None

    def __del__(self):
        entry = self.entry
        if entry is not None:
            self.entry = None
            try:
                entry[0].store_word(2 * entry[1], _FREE)
            except Exception:
                pass


class _Spilled:
    """Pickles to a call of ``load``: the receiving side maps the segments."""

    __slots__ = ('token', 'inband', 'spills')

    def __init__(self, token, inband, spills):
        self.token = token
        self.inband = inband
        self.spills = spills

    def __reduce__(self):
        return load, (self.token, self.inband, self.spills)


# The tables this process knows, by token: a message names its pool's table.
_tables = {}


def register(table):
    _tables[table.token] = table


def unregister(table):
    _tables.pop(table.token, None)


def load(token, inband, spills):
    """The object ``dumps`` encoded: maps the segments of the pool's table (named
    by ``token``) and unpickles."""
    table = _tables[token]
    return reduction.ForkingPickler.loads(
        inband, buffers=[table.open(i, n) for i, n in spills])


def dumps(obj, fallback, table, by_value=True):
    """Pickles ``obj`` for a message of ``table``'s pool; its large out-of-band
    buffers go to the table's segments. Without any, a large pickle is redone with
    ``fallback(obj)`` (the ring's own encoding, which moves large ``bytes`` out of
    band), as is one whose buffers find no free entry. A lambda or a closure in
    ``obj`` goes by value unless ``by_value`` is false (then the error is raised)."""
    bufs = []

    def take(pb):
        try:
            raw = pb.raw()
        except BufferError:
            return True     # not contiguous: in band
        if raw.nbytes < SPILL_MIN:
            return True
        bufs.append(raw)
        return False

    reduction._refresh_table()
    f = io.BytesIO()
    try:
        reduction._FastPickler(f, pickle.HIGHEST_PROTOCOL, buffer_callback=take).dump(obj)
    except reduction._FALLBACK_ERRORS as e:
        if not by_value:
            raise
        # A lambda, a closure...: by value, all in band.
        return reduction._dumps_by_value(obj, e)
    if not bufs:
        data = f.getvalue()
        return data if len(data) < SPILL_MIN else fallback(obj)
    spills = []
    for b in bufs:
        got = table.put(b)
        if got is None:
            for i, _ in spills:
                table.words.store_word(2 * i, _FREE)
            return fallback(obj)
        spills.append(got)
    return reduction._dumps_bytes(_Spilled(table.token, f.getvalue(), spills))
