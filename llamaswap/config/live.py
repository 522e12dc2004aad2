"""The configuration in use, with one owner: a reload replaces it and every reader
hears of it, so no part keeps a slice of an older one."""

from __future__ import annotations

from collections.abc import Callable

from .objects import Config

#: what a reader reports about a switch (the scheduler: models started, stopped …)
Changes = dict[str, list[str]]
Follower = Callable[[Config], Changes | None]


class LiveConfig:
    """Holds ``current``; readers either read it at use or :meth:`subscribe`.

    :meth:`replace` takes a configuration the loader has already validated, makes it
    current, then tells the followers in the order they subscribed.
    """

    def __init__(self, current: Config) -> None:
        self.current = current
        self._followers: list[Follower] = []

    def subscribe(self, follower: Follower) -> None:
        """Call ``follower`` with every configuration that replaces this one."""
        self._followers.append(follower)

    def replace(self, new: Config) -> Changes:
        """Make ``new`` current and tell every follower; returns their reports merged."""
        self.current = new
        changes: Changes = {}
        for follower in self._followers:
            report = follower(new)
            if report:
                changes.update(report)
        return changes
