"""One llamaswap per state directory.

Two daemons sharing the activity store or the KV slot store corrupt each other
silently: their activity row ids collide, so rows are dropped, and one's sweep of
stray slot files deletes the other's.  So each daemon holds an exclusive advisory
lock (``fcntl.flock``) on ``llamaswap.lock`` in every state directory it writes,
for as long as it uses it; the file holds the holder's pid, for the message the
next one gets.  The lock goes with its process: a killed daemon leaves a file,
never a lock.  flock locks belong to an open file description, so two holders in
one process conflict as two processes do.

Taking a lock is a local ``open`` and a non-blocking ``flock``: quick enough for
startup and for a reload, on the reactor.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat

import attrs

from .config import Config, ConfigError
from .logs import logger

LOCK_FILE = "llamaswap.lock"
IN_MEMORY = ":memory:"


class StateRefused(ConfigError):
    """A state directory this llamaswap may not use."""


class StateHeld(StateRefused):
    """A state directory is locked by another llamaswap."""

    def __init__(self, directory: str, setting: str, holder: str) -> None:
        super().__init__(
            setting,
            "",
            f"{directory} is in use by another llamaswap ({holder}); two daemons sharing "
            f"it would corrupt each other's state: give this one its own {setting} "
            "(or stop the other)",
        )


class LockFileRefused(StateRefused):
    """The lock file is not a plain file of its own: a symlink, a hard link, a
    folder, a FIFO (planted by whoever else may write in that directory)."""

    def __init__(self, path: str, setting: str, what: str) -> None:
        super().__init__(
            setting,
            "",
            f"{path} is {what}: llamaswap neither follows nor writes it (another user of "
            f"that directory may have planted it); remove it, or give {setting} a "
            "directory of its own",
        )


@attrs.frozen
class StateDir:
    """A directory llamaswap writes its state in, and the setting that names it."""

    path: str
    setting: str


def state_dirs(config: Config) -> list[StateDir]:
    """The state directories ``config`` has llamaswap write (in memory: none), each
    named by its real path: one directory reached through a symlink is one lock
    (two would conflict, as two daemons do)."""
    found = []
    if config.store_path != IN_MEMORY:
        found.append(StateDir(os.path.dirname(os.path.realpath(config.store_path)), "store.path"))
    # the KV store writes its index there as soon as one model saves slots
    if any(model.slot_save_path is not None for model in config.models.values()):
        found.append(StateDir(os.path.realpath(config.kv_cache.path), "kvCache.path"))
    return found


class DirectoryLock:
    """The lock of one state directory, held from :meth:`take` to :meth:`release`."""

    log = logger()

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.path = os.path.join(state.path, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def take(self) -> None:
        """Lock the directory (made if missing), or raise :class:`StateHeld`.

        A directory that cannot be made or written is not locked: nothing can be
        written there either, and its owner (the store) says so itself.  A lock file
        that is not a plain file of its own is never followed nor written: raise
        :class:`LockFileRefused` (``O_NOFOLLOW``; ``O_NONBLOCK`` for a FIFO)."""
        try:
            os.makedirs(self.state.path, mode=0o700, exist_ok=True)
            fd = os.open(
                self.path,
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                0o600,
            )
        except OSError as e:
            planted = _planted(self.path)  # a symlink, a folder, a socket: not opened
            if planted is not None:
                raise LockFileRefused(self.path, self.state.setting, planted) from None
            self.log.info("not locking {path}: {error}", path=self.path, error=e)
            return
        unsafe = _unsafe(os.fstat(fd))
        if unsafe is not None:
            os.close(fd)
            raise LockFileRefused(self.path, self.state.setting, unsafe)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StateHeld(self.state.path, self.state.setting, holder) from None
        except OSError as e:  # a file system without flock: no lock to take
            os.close(fd)
            self.log.info("not locking {path}: {error}", path=self.path, error=e)
            return
        self._fd = fd
        self.write_pid()

    def write_pid(self) -> None:
        """Say who holds it (again after ``twistd`` forked into the background)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # the lock stands without it
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Let go (closing the file releases the lock); safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _planted(path: str) -> str | None:
    """What stands at ``path`` that the lock file's ``open`` refused (None: nothing
    unsafe, the directory cannot be written)."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "a symlink"
    return _unsafe(info)


def _unsafe(info: os.stat_result) -> str | None:
    """What makes a lock file one not to write (None: a plain file)."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_nlink > 1:  # truncating it would truncate the other name's file
        return "a hard link to another file"
    return None


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


class StateLocks:
    """Owner of this daemon's state directory locks.

    The activity store keeps the file it opened at startup until a restart, so its
    directory stays locked for the whole run; a reload that moves ``store.path``
    locks the new directory too (the next start uses it)."""

    def __init__(self) -> None:
        self._held: dict[str, DirectoryLock] = {}  # by directory
        self._pinned: set[str] = set()  # directories kept whatever the configuration

    @property
    def directories(self) -> list[str]:
        return sorted(self._held)

    def take(self, config: Config, pin_store: bool = False) -> None:
        """Lock every state directory ``config`` writes; raise :class:`StateRefused`
        (holding nothing new) if another llamaswap holds one or its lock file is
        unsafe.  ``pin_store``: the activity store's directory stays locked until
        :meth:`release_all`."""
        taken = []
        try:
            for state in state_dirs(config):
                if state.path in self._held:
                    continue
                lock = DirectoryLock(state)
                lock.take()
                if lock.held:
                    self._held[state.path] = lock
                    taken.append(state.path)
        except StateRefused:
            for path in taken:
                self._held.pop(path).release()
            raise
        if pin_store:
            self._pinned |= {s.path for s in state_dirs(config) if s.setting == "store.path"}

    def keep_only(self, config: Config) -> None:
        """Release the directories ``config`` no longer writes (after a reload)."""
        wanted = {s.path for s in state_dirs(config)} | self._pinned
        for path in [p for p in self._held if p not in wanted]:
            self._held.pop(path).release()

    def write_pids(self) -> None:
        for lock in self._held.values():
            lock.write_pid()

    def release_all(self) -> None:
        held, self._held = self._held, {}
        for lock in held.values():
            lock.release()
