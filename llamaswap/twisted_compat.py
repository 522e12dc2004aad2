"""The one place llamaswap reaches into Twisted where Twisted has no public way.

Every use below says why no public API does the job and which Twisted version it
was checked against; ``tests/test_twisted_compat.py`` fails loudly if Twisted
changes underneath (the attribute disappears or stops meaning what we rely on),
and checks that no other module of the package names a private Twisted attribute.
"""

from __future__ import annotations

from typing import Any

CHECKED_WITH = "26.10.0"
"""The Twisted release each use below was read against."""


def forget_exit_signal(reactor: Any) -> None:
    """Let ``twistd`` exit 0 after a shutdown that a signal asked for.

    The reactor's SIGTERM/SIGINT handlers record the signal in
    ``reactor._exitSignal`` (``twisted.internet.base.ReactorBase.sigTerm``); after
    the reactor stops, ``twistd`` (``ApplicationRunner.startReactor`` then
    ``twisted.scripts.twistd.runApp``) re-raises it, so the process would die *by*
    the signal.  llamaswap treats SIGTERM as "shut down cleanly" and reports that
    with exit status 0 once every child is gone.  Twisted has no public hook for the
    exit status (checked with 26.10.0: the attribute belongs to the private
    ``_ISupportsExitSignalCapturing`` interface).  A reactor without the attribute
    (a test clock, another reactor) is left alone.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None
