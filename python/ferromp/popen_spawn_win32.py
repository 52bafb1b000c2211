"""Windows spawn start method: present so the package layout matches the stdlib.

ferromp targets POSIX; on other platforms importing this module fails, exactly as the
stdlib's does outside Windows (it needs ``msvcrt`` and ``_winapi``).
"""

import sys

__all__ = []

if sys.platform != 'win32':
    raise ImportError('popen_spawn_win32 is only available on Windows')

raise ImportError('ferromp does not support Windows yet')
