"""The blackhole.py test suite: `make test` (standard library only).

An object left unclosed shows as a ResourceWarning in a __del__, which
unittest never sees; the hook below makes the run fail on it.
"""

import atexit
import faulthandler
import os
import sys

_unraisable = []


def _hook(unraisable):
    _unraisable.append(unraisable)
    sys.__unraisablehook__(unraisable)


def _check():
    if _unraisable:
        sys.stderr.write("\nFAILED: %d unraisable exception(s) or ResourceWarning(s) "
                         "above\n" % len(_unraisable))
        sys.stderr.flush()
        os._exit(1)


sys.unraisablehook = _hook
atexit.register(_check)
# A hang (a session thread that never ends, a stop() that waits on it) would
# stall the run instead of failing it: dump every thread's stack and exit.
faulthandler.dump_traceback_later(240, exit=True)
