"""ferromp.pool: not built yet (issue 5); the names exist so imports work."""

from ._pending import missing, missing_function  # noqa: F401

__all__ = ['Pool', 'ThreadPool']

Pool = missing('pool.Pool', 5)
ThreadPool = missing('pool.ThreadPool', 5)
AsyncResult = missing('pool.AsyncResult', 5)
ApplyResult = missing('pool.ApplyResult', 5)
MapResult = missing('pool.MapResult', 5)
IMapIterator = missing('pool.IMapIterator', 5)
IMapUnorderedIterator = missing('pool.IMapUnorderedIterator', 5)
RemoteTraceback = missing('pool.RemoteTraceback', 5)
MaybeEncodingError = missing('pool.MaybeEncodingError', 5)
RUN = 0
CLOSE = 1
TERMINATE = 2
