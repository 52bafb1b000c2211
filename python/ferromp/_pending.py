"""Placeholders for the parts of the API whose issue has not landed yet.

Each stands where the stdlib has a name, so imports work, and raises
NotImplementedError naming itself and its issue when used. Nothing else in ferromp
may raise NotImplementedError for an unbuilt feature.
"""

__all__ = []


def missing(qualname, issue):
    """A class that can be imported and subclassed but not instantiated."""

    def __init__(self, *args, **kwds):
        raise NotImplementedError(
            f'ferromp.{qualname} is not implemented yet (tracked in issue {issue})')

    name = qualname.rpartition('.')[2]
    return type(name, (object,), {'__init__': __init__, '__qualname__': name,
                                  '__module__': 'ferromp.' + qualname.rpartition('.')[0]})


def missing_function(qualname, issue):
    def fn(*args, **kwds):
        raise NotImplementedError(
            f'ferromp.{qualname} is not implemented yet (tracked in issue {issue})')
    fn.__name__ = fn.__qualname__ = qualname.rpartition('.')[2]
    return fn
