"""ferromp.resource_tracker: not built yet (issue 3); the names exist so imports work."""

from ._pending import missing, missing_function  # noqa: F401

__all__ = ['ensure_running', 'register', 'unregister']

ensure_running = missing_function('resource_tracker.ensure_running', 3)
register = missing_function('resource_tracker.register', 3)
unregister = missing_function('resource_tracker.unregister', 3)


def getfd():
    # No tracker process yet: spawn children get none.
    return None


class ResourceTracker(object):
    def __init__(self):
        self._fd = None
        self._pid = None

    def _stop(self):
        pass


_resource_tracker = ResourceTracker()
_CLEANUP_FUNCS = {}
