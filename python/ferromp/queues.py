"""ferromp.queues: not built yet (issue 4); the names exist so imports work."""

from ._pending import missing, missing_function  # noqa: F401

__all__ = ['Queue', 'SimpleQueue', 'JoinableQueue']

Queue = missing('queues.Queue', 4)
SimpleQueue = missing('queues.SimpleQueue', 4)
JoinableQueue = missing('queues.JoinableQueue', 4)
