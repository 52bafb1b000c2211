"""ferromp.managers: not built yet (issue 6); the names exist so imports work."""

from ._pending import missing, missing_function  # noqa: F401

__all__ = ['BaseManager', 'SyncManager', 'BaseProxy', 'Token', 'SharedMemoryManager']

BaseManager = missing('managers.BaseManager', 6)
SyncManager = missing('managers.SyncManager', 6)
BaseProxy = missing('managers.BaseProxy', 6)
Token = missing('managers.Token', 6)
SharedMemoryManager = missing('managers.SharedMemoryManager', 6)
RemoteError = missing('managers.RemoteError', 6)
Namespace = missing('managers.Namespace', 6)
AutoProxy = missing('managers.AutoProxy', 6)
