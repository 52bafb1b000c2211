"""Named shared memory: the stdlib's ``multiprocessing.shared_memory``.

``SharedMemory`` is a POSIX shared-memory object (a file in ``/dev/shm``) that any
process can attach to by name. The core opens, sizes and unlinks it
(``_core.shm_open_sized`` / ``shm_unlink``, ``src/shm.rs``); the bytes are mapped
with ``mmap.mmap`` so that ``buf`` is an ordinary writable memoryview (numpy, ctypes
and ``struct`` use it without a copy). Every instance registers its name with the
resource tracker and ``unlink`` unregisters it, as in the stdlib, so the segments of
a program whose processes were all killed are unlinked by the tracker.

``ShareableList`` keeps the stdlib's layout byte for byte, so a ferromp process and a
stdlib process can share one list:

====================  ==============================================================
8 bytes               number of items N (``q``)
(N + 1) * 8 bytes     offset of each item in the data area, then the area's end
data area             the items, each in a slot of a multiple of 8 bytes
N * 8 bytes           each item's ``struct`` format (``8s``, NUL padded)
N bytes               each item's type code (see ``_back_transforms_mapping``)
====================  ==============================================================

Differences from the stdlib:

* A ``str`` item whose UTF-8 bytes do not fit the slot the stdlib sizes from its
  length in characters gets a slot sized from its bytes: the stdlib gives
  ``'ééééé'`` an 8-byte slot for 10 bytes and silently truncates it. Wherever the
  text fits, the format is the stdlib's.
* An index below ``-len(sl)`` raises IndexError; the stdlib wraps it around twice
  and reads another item.
* Assigning a value that cannot be packed (an int beyond 64 bits) leaves the item
  as it was; the stdlib has already rewritten the item's format by then.
* A name with an embedded NUL raises ValueError instead of naming another segment.
"""

__all__ = ['SharedMemory', 'ShareableList']

import functools
import mmap
import operator
import os
import struct
import types

from . import _core
from . import resource_tracker

_USE_POSIX = True

_O_CREX = os.O_CREAT | os.O_EXCL

# Names stay within 14 characters, the limit of some BSDs, as in the stdlib.
_SHM_SAFE_NAME_LENGTH = 14

_SHM_NAME_PREFIX = '/psm_'


def _make_filename():
    """A random name for a new segment (``/psm_`` and 8 hex digits)."""
    nbytes = (_SHM_SAFE_NAME_LENGTH - len(_SHM_NAME_PREFIX)) // 2
    assert nbytes >= 2, '_SHM_NAME_PREFIX too long'
    # os.urandom is what secrets.token_hex draws from; importing secrets costs more
    # than a SharedMemory does.
    return _SHM_NAME_PREFIX + os.urandom(nbytes).hex()


class SharedMemory:
    """Creates a new shared memory block or attaches to an existing one.

    Every block has a unique name, by which another process attaches to it. A block
    outlives the processes that use it until ``unlink()`` is called (once, by any
    one of them); ``close()`` only lets go of this process's view of it."""

    # Class-level defaults, so close() and unlink() work on a half-built instance.
    # A subclass may change _flags (O_CREAT without O_EXCL attaches or creates).
    _name = None
    _fd = -1
    _mmap = None
    _buf = None
    _flags = os.O_RDWR
    _mode = 0o600
    _prepend_leading_slash = True

    def __init__(self, name=None, create=False, size=0):
        if not size >= 0:
            raise ValueError("'size' must be a positive integer")
        if create:
            self._flags = _O_CREX | os.O_RDWR
            if size == 0:
                raise ValueError("'size' must be a positive number different from zero")
        if name is None and not self._flags & os.O_EXCL:
            raise ValueError("'name' can only be None if create=True")

        # Only a creator sizes the segment; an attacher's size argument is ignored.
        new_size = size if create else 0
        if name is None:
            while True:
                # Looked up at each call: the test suite patches _make_filename.
                path = _make_filename()
                try:
                    self._fd, size = _core.shm_open_sized(
                        path, self._flags, self._mode, new_size)
                except FileExistsError:
                    continue
                break
        else:
            path = '/' + name if self._prepend_leading_slash else name
            self._fd, size = _core.shm_open_sized(path, self._flags, self._mode, new_size)
        self._name = path
        try:
            self._mmap = mmap.mmap(self._fd, size)
        except OSError:
            if self._flags & _O_CREX == _O_CREX:
                # We created it and nobody can have it yet: leave no name behind.
                _core.shm_unlink(path)
                self._name = None
            self.close()
            raise
        resource_tracker.register(path, 'shared_memory')
        self._size = size
        self._buf = memoryview(self._mmap)

    def __del__(self):
        try:
            self.close()
        except OSError:
            pass

    def __reduce__(self):
        # By name: the receiving process attaches to the same block.
        return (self.__class__, (self.name, False, self.size))

    def __repr__(self):
        return f'{self.__class__.__name__}({self.name!r}, size={self.size})'

    @property
    def buf(self):
        "A memoryview of contents of the shared memory block."
        return self._buf

    @property
    def name(self):
        "Unique name that identifies the shared memory block."
        name = self._name
        if self._prepend_leading_slash and name.startswith('/'):
            return name[1:]
        return name

    @property
    def size(self):
        "Size in bytes."
        return self._size

    def close(self):
        """Closes access to the shared memory from this instance but does
        not destroy the shared memory block."""
        if self._buf is not None:
            self._buf.release()
            self._buf = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def unlink(self):
        """Requests that the underlying shared memory block be destroyed.

        Call it once, from any one process, when no process needs the block any
        more; mappings that are still open stay valid until closed."""
        if self._name:
            _core.shm_unlink(self._name)
            resource_tracker.unregister(self._name, 'shared_memory')


_encoding = 'utf8'


class ShareableList:
    """A list of fixed length whose items (int, float, bool, str, bytes, None) live
    in a shared memory block, readable and writable from every process that
    attaches to it by name. Items may be replaced, also by items of another type,
    as long as they fit their slot; the list cannot grow or shrink."""

    _types_mapping = {
        int: 'q',
        float: 'd',
        bool: 'xxxxxxx?',
        str: '%ds',
        bytes: '%ds',
        type(None): 'xxxxxx?x',
    }
    _alignment = 8
    _back_transforms_mapping = {
        0: lambda value: value,                                    # int, float, bool
        1: lambda value: value.rstrip(b'\x00').decode(_encoding),  # str
        2: lambda value: value.rstrip(b'\x00'),                    # bytes
        3: lambda _value: None,                                    # None
    }

    @staticmethod
    def _extract_recreation_code(value):
        """The type code stored for ``value`` (a key of _back_transforms_mapping)."""
        if isinstance(value, str):
            return 1
        if isinstance(value, bytes):
            return 2
        if value is None:
            return 3
        return 0

    def __init__(self, sequence=None, *, name=None):
        if name is not None and sequence is None:
            self.shm = SharedMemory(name)
            self._list_len = len(self)
            self._allocated_offsets = list(struct.unpack_from(
                self._format_size_metainfo, self.shm.buf, 8))
            return

        items = list(sequence or ())
        values = [v.encode(_encoding) if isinstance(v, str) else v for v in items]
        formats = []
        for item, value in zip(items, values):
            fmt = self._types_mapping[type(item)]
            if isinstance(item, (str, bytes)):
                # The stdlib's slot (from the length in characters), unless the
                # UTF-8 bytes do not fit it.
                slot = self._slot_size(len(item))
                if len(value) > slot:
                    slot = self._slot_size(len(value))
                fmt %= slot
            formats.append(fmt)
        # Each format is stored in 8 bytes (an item of 100 MB would not fit).
        assert all(len(fmt) <= 8 for fmt in formats), 'item too large for its format'
        self._list_len = len(formats)
        offsets = [0]
        for fmt in formats:
            offsets.append(offsets[-1] + (int(fmt[:-1]) if fmt[-1] == 's'
                                          else self._alignment))
        self._allocated_offsets = offsets
        data_format = ''.join(formats)
        size = struct.calcsize('q' + self._format_size_metainfo + data_format
                               + self._format_packing_metainfo
                               + self._format_back_transform_codes)
        self.shm = SharedMemory(name, create=True, size=size)
        buf = self.shm.buf
        struct.pack_into('q' + self._format_size_metainfo, buf, 0,
                         self._list_len, *offsets)
        struct.pack_into(data_format, buf, self._offset_data_start, *values)
        struct.pack_into(self._format_packing_metainfo, buf, self._offset_packing_formats,
                         *(fmt.encode(_encoding) for fmt in formats))
        struct.pack_into(self._format_back_transform_codes, buf,
                         self._offset_back_transform_codes,
                         *(self._extract_recreation_code(item) for item in items))

    def _slot_size(self, nbytes):
        # A str/bytes item gets the next multiple of 8 strictly above its length.
        return self._alignment * (nbytes // self._alignment + 1)

    def _get_packing_format(self, position):
        "Gets the packing format for a single value stored in the list."
        position = self._position(position)
        raw = struct.unpack_from('8s', self.shm.buf,
                                 self._offset_packing_formats + position * 8)[0]
        return raw.rstrip(b'\x00').decode(_encoding)

    def _get_back_transform(self, position):
        "Gets the back transformation function for a single value."
        position = self._position(position)
        code = struct.unpack_from('b', self.shm.buf,
                                  self._offset_back_transform_codes + position)[0]
        return self._back_transforms_mapping[code]

    def _set_packing_format_and_transform(self, position, fmt_as_str, value):
        """Sets the packing format and back transformation code for a
        single value in the list at the specified position."""
        position = self._position(position)
        struct.pack_into('8s', self.shm.buf, self._offset_packing_formats + position * 8,
                         fmt_as_str.encode(_encoding))
        struct.pack_into('b', self.shm.buf, self._offset_back_transform_codes + position,
                         self._extract_recreation_code(value))

    def _position(self, position):
        # The index, made non-negative; IndexError when out of range.
        position = operator.index(position)
        if position < 0:
            position += self._list_len
        if not 0 <= position < self._list_len:
            raise IndexError('Requested position out of range.')
        return position

    def __getitem__(self, position):
        try:
            position = self._position(position)
        except IndexError:
            raise IndexError('index out of range') from None
        offset = self._offset_data_start + self._allocated_offsets[position]
        (value,) = struct.unpack_from(self._get_packing_format(position),
                                      self.shm.buf, offset)
        return self._get_back_transform(position)(value)

    def __setitem__(self, position, value):
        try:
            position = self._position(position)
        except IndexError:
            raise IndexError('assignment index out of range') from None
        start = self._allocated_offsets[position]
        if isinstance(value, (str, bytes)):
            encoded = value.encode(_encoding) if isinstance(value, str) else value
            room = self._allocated_offsets[position + 1] - start
            if len(encoded) > room:
                raise ValueError('bytes/str item exceeds available storage')
            current = self._get_packing_format(position)
            # The slot keeps its width: a shorter string is NUL padded.
            fmt = current if current[-1] == 's' else self._types_mapping[str] % room
        else:
            encoded = value
            fmt = self._types_mapping[type(value)]
        # Pack first, so a value that does not fit leaves the item untouched.
        packed = struct.pack(fmt, encoded)
        self._set_packing_format_and_transform(position, fmt, value)
        offset = self._offset_data_start + start
        self.shm.buf[offset:offset + len(packed)] = packed

    def __iter__(self):
        for position in range(self._list_len):
            yield self[position]

    def __reduce__(self):
        return functools.partial(self.__class__, name=self.shm.name), ()

    def __len__(self):
        return struct.unpack_from('q', self.shm.buf, 0)[0]

    def __repr__(self):
        return f'{self.__class__.__name__}({list(self)}, name={self.shm.name!r})'

    @property
    def format(self):
        "The struct packing format used by all currently stored items."
        return ''.join(self._get_packing_format(i) for i in range(self._list_len))

    @property
    def _format_size_metainfo(self):
        "The struct packing format used for the items' storage offsets."
        return 'q' * (self._list_len + 1)

    @property
    def _format_packing_metainfo(self):
        "The struct packing format used for the items' packing formats."
        return '8s' * self._list_len

    @property
    def _format_back_transform_codes(self):
        "The struct packing format used for the items' back transforms."
        return 'b' * self._list_len

    @property
    def _offset_data_start(self):
        # The item count and the N + 1 offsets come first.
        return (self._list_len + 2) * 8

    @property
    def _offset_packing_formats(self):
        return self._offset_data_start + self._allocated_offsets[-1]

    @property
    def _offset_back_transform_codes(self):
        return self._offset_packing_formats + self._list_len * 8

    def count(self, value):
        "L.count(value) -> integer -- return number of occurrences of value."
        return sum(value == entry for entry in self)

    def index(self, value):
        """L.index(value) -> integer -- return first index of value.
        Raises ValueError if the value is not present."""
        for position, entry in enumerate(self):
            if value == entry:
                return position
        raise ValueError(f'{value!r} not in this container')

    __class_getitem__ = classmethod(types.GenericAlias)
