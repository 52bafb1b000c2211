"""ferromp.managers: not built yet (issue 6); the names exist so imports work.

``BaseManager.register`` works (it only records the type in the class's registry), so
modules that declare managers at import time import cleanly; starting or connecting a
manager raises NotImplementedError naming the issue.
"""

from ._pending import missing

__all__ = ['BaseManager', 'SyncManager', 'BaseProxy', 'Token', 'SharedMemoryManager']


class RemoteError(Exception):
    """An exception raised in the manager's server process, re-raised in the client."""

    def __str__(self):
        return ('\n' + '-' * 75 + '\n' + str(self.args[0]) + '-' * 75)


class Token(object):
    """Identifies a shared object: its type id, the server's address, and its id."""

    __slots__ = ('typeid', 'address', 'id')

    def __init__(self, typeid, address, id):
        (self.typeid, self.address, self.id) = (typeid, address, id)

    def __getstate__(self):
        return (self.typeid, self.address, self.id)

    def __setstate__(self, state):
        (self.typeid, self.address, self.id) = state

    def __repr__(self):
        return '%s(typeid=%r, address=%r, id=%r)' % \
               (self.__class__.__name__, self.typeid, self.address, self.id)


class BaseManager(object):
    """Placeholder: ``register`` records types; instances cannot be made yet."""

    _registry = {}

    def __init__(self, *args, **kwds):
        raise NotImplementedError(
            'ferromp.managers.BaseManager is not implemented yet (tracked in issue 6)')

    @classmethod
    def register(cls, typeid, callable=None, proxytype=None, exposed=None,
                 method_to_typeid=None, create_method=True):
        """Register a type (or callable) that the manager's server can create."""
        if '_registry' not in cls.__dict__:
            cls._registry = cls._registry.copy()
        cls._registry[typeid] = (callable, exposed, method_to_typeid, proxytype)


class SyncManager(BaseManager):
    """Placeholder for the manager of the stdlib's shared types."""


class SharedMemoryManager(BaseManager):
    """Placeholder for the manager of shared memory segments."""


class BaseProxy(object):
    """Placeholder base class of proxies (subclassable, not instantiable)."""

    def __init__(self, *args, **kwds):
        raise NotImplementedError(
            'ferromp.managers.BaseProxy is not implemented yet (tracked in issue 6)')


Namespace = missing('managers.Namespace', 6)
AutoProxy = missing('managers.AutoProxy', 6)
