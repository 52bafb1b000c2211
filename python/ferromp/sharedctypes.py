"""ctypes objects in shared memory: the stdlib's ``multiprocessing.sharedctypes``.

``RawValue`` / ``RawArray`` are plain ctypes objects laid over a ``heap.BufferWrapper``
block (a memfd segment, see ``heap``); ``Value`` / ``Array`` wrap one with a lock
(``Synchronized``, ``SynchronizedArray``, ``SynchronizedString``, or a generated
``Synchronized<Structure>``). Passed to a child being started, an object is rebuilt
over the same shared memory (its block travels as the arena's fd).

Same API, type codes, defaults and error messages as the stdlib. The difference is the
hot path. The stdlib's ``value`` property and ``__getitem__`` are Python functions
that call the lock's ``acquire`` and ``release``. Here they are native, on
``_core.SharedCell``, the base of every wrapper (``src/py/shm.rs``): one call takes
the lock, reads or writes, and releases. When the lock is one of ferromp's own (a
``_core.SemLock``), the cell takes it directly, through the same per-process handle
the lock's own methods use, so ``with v.get_lock(): v.value += 1`` re-enters the
held ``RLock`` without a Python call; an uncontended access is two compare-and-swaps
on the semaphore word. The scalar of a ``Value`` of an integer or float type is read
and written by the cell itself, not through ctypes. A lock of another kind goes
through its ``acquire`` / ``release``, as in the stdlib.
"""

import ctypes
import weakref

from . import _core
from . import context
from . import heap
from .context import assert_spawning
from .reduction import ForkingPickler

__all__ = ['RawValue', 'RawArray', 'Value', 'Array', 'copy', 'synchronized']

typecode_to_type = {
    'c': ctypes.c_char, 'u': ctypes.c_wchar,
    'b': ctypes.c_byte, 'B': ctypes.c_ubyte,
    'h': ctypes.c_short, 'H': ctypes.c_ushort,
    'i': ctypes.c_int, 'I': ctypes.c_uint,
    'l': ctypes.c_long, 'L': ctypes.c_ulong,
    'q': ctypes.c_longlong, 'Q': ctypes.c_ulonglong,
    'f': ctypes.c_float, 'd': ctypes.c_double,
}


def _get_context():
    return context._default_context.get_context()


def _new_value(type_):
    # Unsized "types" (an unknown type code) fail here with ctypes' TypeError, as in
    # the stdlib.
    wrapper = heap.BufferWrapper(ctypes.sizeof(type_))
    return rebuild_ctype(type_, wrapper, None)


def RawValue(typecode_or_type, *args):
    """A ctypes object allocated from shared memory."""
    type_ = typecode_to_type.get(typecode_or_type, typecode_or_type)
    obj = _new_value(type_)
    # Fresh memfd pages are zero already, but a reused heap block may not be.
    ctypes.memset(ctypes.addressof(obj), 0, ctypes.sizeof(obj))
    obj.__init__(*args)
    return obj


def RawArray(typecode_or_type, size_or_initializer):
    """A ctypes array allocated from shared memory: ``size_or_initializer`` is a length
    (zero-filled) or a sequence to copy."""
    type_ = typecode_to_type.get(typecode_or_type, typecode_or_type)
    if isinstance(size_or_initializer, int):
        obj = _new_value(type_ * size_or_initializer)
        ctypes.memset(ctypes.addressof(obj), 0, ctypes.sizeof(obj))
        return obj
    result = _new_value(type_ * len(size_or_initializer))
    result.__init__(*size_or_initializer)
    return result


def _checked_lock(lock, ctx):
    if lock in (True, None):
        lock = (ctx or _get_context()).RLock()
    if not hasattr(lock, 'acquire'):
        raise AttributeError("%r has no method 'acquire'" % lock)
    return lock


def Value(typecode_or_type, *args, lock=True, ctx=None):
    """A ``RawValue`` behind a lock (a new ``RLock`` unless one is given; none for
    ``lock=False``)."""
    obj = RawValue(typecode_or_type, *args)
    if lock is False:
        return obj
    lock = _checked_lock(lock, ctx)
    return synchronized(obj, lock, ctx=ctx)


def Array(typecode_or_type, size_or_initializer, *, lock=True, ctx=None):
    """A ``RawArray`` behind a lock (a new ``RLock`` unless one is given; none for
    ``lock=False``)."""
    obj = RawArray(typecode_or_type, size_or_initializer)
    if lock is False:
        return obj
    lock = _checked_lock(lock, ctx)
    return synchronized(obj, lock, ctx=ctx)


def copy(obj):
    """A new shared ctypes object holding a copy of ``obj``."""
    new_obj = _new_value(type(obj))
    ctypes.pointer(new_obj)[0] = obj
    return new_obj


def synchronized(obj, lock=None, ctx=None):
    """Wrap the ctypes object ``obj`` so that every access takes ``lock``."""
    assert not isinstance(obj, SynchronizedBase), 'object already synchronized'
    ctx = ctx or _get_context()
    if isinstance(obj, ctypes._SimpleCData):
        return Synchronized(obj, lock, ctx)
    if isinstance(obj, ctypes.Array):
        if obj._type_ is ctypes.c_char:
            return SynchronizedString(obj, lock, ctx)
        return SynchronizedArray(obj, lock, ctx)
    cls = type(obj)
    try:
        scls = class_cache[cls]
    except KeyError:
        props = {name: _field_property(name) for name, *_ in cls._fields_}
        scls = class_cache[cls] = type(
            'Synchronized' + cls.__name__, (SynchronizedBase,), props)
    return scls(obj, lock, ctx)


#
# Pickling: a ctypes object travels as its type and its BufferWrapper, and is laid
# over the same shared block again on the other side.
#

def reduce_ctype(obj):
    assert_spawning(obj)
    if isinstance(obj, ctypes.Array):
        return rebuild_ctype, (obj._type_, obj._wrapper, obj._length_)
    return rebuild_ctype, (type(obj), obj._wrapper, None)


def rebuild_ctype(type_, wrapper, length):
    if length is not None:
        type_ = type_ * length
    ForkingPickler.register(type_, reduce_ctype)
    obj = type_.from_buffer(wrapper.create_memoryview())
    obj._wrapper = wrapper
    return obj


#
# Synchronized wrappers
#

def _is_native(lock):
    # Whether `lock` is one of ferromp's SemLocks taken by the native methods (the cell
    # then takes it directly); a subclass that overrides one of them is called instead.
    return isinstance(lock, _core.SemLock) and all(
        getattr(type(lock), name) is getattr(_core.SemLock, name)
        for name in ('acquire', 'release', '__enter__', '__exit__'))


# The ctypes scalars whose bytes the native cell reads and writes itself.
_DIRECT_TYPES = frozenset(typecode_to_type.values()) - {ctypes.c_char, ctypes.c_wchar}


def _scalar_layout(obj):
    # (address, _type_ code, size) of a ctypes integer or float, or (0, '', 0).
    if type(obj) in _DIRECT_TYPES:
        return ctypes.addressof(obj), type(obj)._type_, ctypes.sizeof(obj)
    return 0, '', 0


def _field_property(name):
    def get(self):
        with self._lock:
            return getattr(self._obj, name)

    def set(self, value):
        with self._lock:
            setattr(self._obj, name, value)

    return property(get, set, doc='The field %r, read and written under the lock.' % name)


class_cache = weakref.WeakKeyDictionary()


class SynchronizedBase(_core.SharedCell):
    """A ctypes object and the lock that guards it."""

    def __init__(self, obj, lock=None, ctx=None):
        self._obj = obj
        if lock:
            self._lock = lock
        else:
            self._lock = (ctx or _get_context()).RLock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        self._bind(obj, self._lock, self.acquire, self.release,
                   _is_native(self._lock), *_scalar_layout(obj))

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *args):
        return self._lock.__exit__(*args)

    def __reduce__(self):
        assert_spawning(self)
        return synchronized, (self._obj, self._lock)

    # get_obj() and get_lock() are the native cell's.

    def __repr__(self):
        return '<%s wrapper for %s>' % (type(self).__name__, self._obj)


class Synchronized(SynchronizedBase):
    """A shared ``ctypes`` scalar; ``value`` reads and writes it under the lock."""

    # `value` (set below) is a getset descriptor of the native cell: lock, load or
    # store, unlock in one call.


# Made for this very class, so that CPython's isinstance check on each access is a
# pointer comparison (`_core.SharedCell._value` would do, a little slower).
Synchronized.value = _core.SharedCell._value_descriptor(Synchronized)


class SynchronizedArray(SynchronizedBase):
    """A shared ``ctypes`` array; items and slices are read and written under the lock."""

    def __len__(self):
        return len(self._obj)

    # Items and slices, under the lock, in one native call each.
    __getitem__ = _core.SharedCell._getitem
    __setitem__ = _core.SharedCell._setitem

    def __getslice__(self, start, stop):
        with self._lock:
            return self._obj[start:stop]

    def __setslice__(self, start, stop, values):
        with self._lock:
            self._obj[start:stop] = values


class SynchronizedString(SynchronizedArray):
    """A shared ``c_char`` array: also ``value`` (up to the first NUL) and ``raw``."""

    @property
    def value(self):
        with self._lock:
            return self._obj.value

    @value.setter
    def value(self, value):
        with self._lock:
            self._obj.value = value

    @property
    def raw(self):
        with self._lock:
            return self._obj.raw

    @raw.setter
    def raw(self, value):
        with self._lock:
            self._obj.raw = value
