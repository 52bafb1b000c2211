"""ferromp.heap: not built yet (issue 3); the names exist so imports work."""

from ._pending import missing, missing_function  # noqa: F401

__all__ = ['BufferWrapper']



Heap = missing('heap.Heap', 3)
BufferWrapper = missing('heap.BufferWrapper', 3)
