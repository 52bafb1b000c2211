"""ferromp.sharedctypes: not built yet (issue 3); the names exist so imports work."""

from ._pending import missing, missing_function  # noqa: F401

__all__ = ['RawValue', 'RawArray', 'Value', 'Array', 'copy', 'synchronized']

RawValue = missing_function('sharedctypes.RawValue', 3)
RawArray = missing_function('sharedctypes.RawArray', 3)
Value = missing_function('sharedctypes.Value', 3)
Array = missing_function('sharedctypes.Array', 3)
copy = missing_function('sharedctypes.copy', 3)
synchronized = missing_function('sharedctypes.synchronized', 3)
