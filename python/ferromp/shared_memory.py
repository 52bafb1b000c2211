"""ferromp.shared_memory: not built yet (issue 3); the names exist so imports work."""

from ._pending import missing, missing_function  # noqa: F401

__all__ = ['SharedMemory', 'ShareableList']

SharedMemory = missing('shared_memory.SharedMemory', 3)
ShareableList = missing('shared_memory.ShareableList', 3)
