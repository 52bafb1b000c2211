"""Stand-in for CPython's ``_multiprocessing`` C module, as it is on Linux.

The stdlib's ``multiprocessing.synchronize`` imports ``SemLock`` and ``sem_unlink``
from it; code that does the same against ferromp (and CPython's own test suite, which
the compat harness points here) gets ferromp's memfd-backed SemLock. ``SemLock`` keeps
the C type's constructor signature ``SemLock(kind, value, maxvalue, name, unlink)``;
see ``src/py/sync.rs`` for what ``name`` and ``sem_unlink`` mean without named
semaphores.

The C module's Windows-only functions (``closesocket``, ``recv``, ``send``) do not
exist on Linux, so they are not here either.
"""

from ._core import SemLock, sem_unlink

__all__ = ['SemLock', 'sem_unlink', 'flags']

# What the C module reports on Linux. There is no HAVE_BROKEN_SEM_GETVALUE: the value
# of a semaphore can always be read (the C module only defines the flag where it is
# broken, and the test suite reads it with getattr).
flags = {'HAVE_SEM_OPEN': 1, 'HAVE_SEM_TIMEDWAIT': 1}
