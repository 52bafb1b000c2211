"""ferromp.synchronize: not built yet (issue 3); the names exist so imports work."""

from ._pending import missing, missing_function  # noqa: F401

__all__ = ['Lock', 'RLock', 'Semaphore', 'BoundedSemaphore', 'Condition', 'Event']

Lock = missing('synchronize.Lock', 3)
RLock = missing('synchronize.RLock', 3)
Semaphore = missing('synchronize.Semaphore', 3)
BoundedSemaphore = missing('synchronize.BoundedSemaphore', 3)
Condition = missing('synchronize.Condition', 3)
Event = missing('synchronize.Event', 3)
Barrier = missing('synchronize.Barrier', 3)
SemLock = missing('synchronize.SemLock', 3)
