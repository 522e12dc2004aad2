"""llamaswap's tests.

Whatever a test runs, in process or as a daemon, keeps its state (activity log, saved
KV states) under a directory of the test run's own, gone when the run ends: never in
the user's ``~/.local/state``.
"""

import atexit
import os
import shutil
import tempfile

STATE_HOME = tempfile.mkdtemp(prefix="llamaswap-test-state-")
os.environ["XDG_STATE_HOME"] = STATE_HOME
atexit.register(shutil.rmtree, STATE_HOME, True)
