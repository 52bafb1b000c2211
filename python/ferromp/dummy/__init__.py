"""The multiprocessing API backed by threads: ferromp's ``multiprocessing.dummy``.

Code written for processes can switch to threads by importing this module instead:
"processes" are ``threading.Thread`` objects, queues and locks are the ``queue`` and
``threading`` ones, and ``Pool`` is a ``ThreadPool``. Nothing here touches the Rust core.
"""

__all__ = [
    'Process', 'current_process', 'active_children', 'freeze_support',
    'Lock', 'RLock', 'Semaphore', 'BoundedSemaphore', 'Condition',
    'Event', 'Barrier', 'Queue', 'Manager', 'Pipe', 'Pool', 'JoinableQueue',
]

import array
import sys
import threading
import weakref
from queue import Queue
from threading import Barrier, BoundedSemaphore, Condition, Event, Lock, RLock, Semaphore

from .connection import Pipe


class DummyProcess(threading.Thread):
    '''
    A thread with the parts of the Process API that make sense for a thread
    '''

    def __init__(self, group=None, target=None, name=None, args=(), kwargs=None):
        threading.Thread.__init__(self, group, target, name, args, kwargs)
        self._pid = None
        # Weak, so a finished and forgotten thread does not linger as a "child".
        self._children = weakref.WeakKeyDictionary()
        self._start_called = False
        # Like a process, a dummy process belongs to the thread that created it, and
        # only that thread may start it (and so see it in active_children()).
        self._parent = current_process()

    def start(self):
        if self._parent is not current_process():
            raise RuntimeError(
                "Parent is {0!r} but current_process is {1!r}".format(
                    self._parent, current_process()))
        self._start_called = True
        # A plain threading.Thread parent has no _children; it just does not track.
        if hasattr(self._parent, '_children'):
            self._parent._children[self] = None
        threading.Thread.start(self)

    @property
    def exitcode(self):
        # A thread has no exit status: a finished one counts as a clean exit.
        if self._start_called and not self.is_alive():
            return 0
        return None


Process = DummyProcess
current_process = threading.current_thread

# The importing thread (normally the main thread) becomes the root "process". If the
# stdlib's multiprocessing.dummy already gave it a children map, share that map rather
# than replace it, so neither module forgets the other's running threads.
if not isinstance(getattr(current_process(), '_children', None), weakref.WeakKeyDictionary):
    current_process()._children = weakref.WeakKeyDictionary()


def active_children():
    children = current_process()._children
    # Reap finished threads as a side effect, as the process version does.
    for p in list(children):
        if not p.is_alive():
            children.pop(p, None)
    return list(children)


def freeze_support():
    pass


class Namespace:
    def __init__(self, /, **kwds):
        self.__dict__.update(kwds)

    def __repr__(self):
        # Underscore attributes are private bookkeeping, hidden as managers hide them.
        shown = sorted('%s=%r' % (name, value)
                       for name, value in list(self.__dict__.items())
                       if not name.startswith('_'))
        return '%s(%s)' % (type(self).__name__, ', '.join(shown))


# Manager() returns this module, so manager.dict() / manager.list() must exist here.
dict = dict
list = list


def Array(typecode, sequence, lock=True):
    # Threads share memory already: an ordinary array is the shared array.
    return array.array(typecode, sequence)


class Value:
    def __init__(self, typecode, value, lock=True):
        self._typecode = typecode
        self._value = value

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        self._value = value

    def __repr__(self):
        return '<%s(%r, %r)>' % (type(self).__name__, self._typecode, self._value)


def Manager():
    # Threads need no server process: the module itself provides every proxy type.
    return sys.modules[__name__]


def shutdown():
    pass


def Pool(processes=None, initializer=None, initargs=()):
    # Imported on use so that this module imports even where the pool is unavailable.
    from ..pool import ThreadPool

    return ThreadPool(processes, initializer, initargs)


JoinableQueue = Queue
