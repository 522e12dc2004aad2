"""Keeping a models folder live: a reload when a GGUF file is added, replaced or removed."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from .kvcache import DiskRunner, run_here
from .modelsdir import Listings
from .reload import ConfigReloader


class FolderReloader(ConfigReloader):
    """A :class:`ConfigReloader` that also reloads when a models folder changes.

    Its stamp covers the configuration file (if any) and every ``*.gguf`` in the
    folders (name, size, mtime), so ``--watch-config`` sees a file added, replaced
    or removed.  Taking it is a ``stat`` per file (20,000 files: 0.1 s; a network
    share: far more), so each poll takes it with ``disk`` (a thread in production),
    as the rescan itself runs in the loader: off the reactor thread.  The files are
    listed and ``stat``-ed in the folders' walks (:class:`Listings`), so a mount that
    hangs costs a poll ``LIST_WAIT`` once, never the watch.
    """

    def __init__(
        self,
        folders: Callable[[], Sequence[str]],
        *args: Any,
        disk: DiskRunner[Any] = run_here,
        **kwargs: Any,
    ) -> None:
        self.folders = folders
        self._disk = disk
        super().__init__(*args, **kwargs)

    def described(self) -> str:
        """What a reload reads: the file, and the folders when there are any."""
        if not self.folders():
            return str(self.path)
        folders = f"models folders {', '.join(self.folders())}"
        return f"{self.path} ({folders})" if self.path else folders

    def _check(self) -> object:
        return self._disk(self._stamp).addCallback(self._compare)

    def _stamp(self) -> Any:  # compared for equality only
        config = None
        if self.path:
            try:
                info = os.stat(self.path)
                config = (info.st_mtime_ns, info.st_size, info.st_ino)
            except OSError:
                pass
        listings = Listings(self.folders())  # one on a hung mount: left out, looked at again
        unsaid: list[str] = []  # said by the load that left it out, not every poll
        # each file's stat is made in its folder's walk, with the listing's deadline
        files = tuple(s for folder in self.folders() for s in listings.of(folder, unsaid).stamps)
        return config, files, tuple(listings.unlisted)
