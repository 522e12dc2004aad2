"""Crash-loop protection: a model that keeps failing is left alone for a while.

After ``max_failures`` failed starts or crashes within ``window`` seconds, the model
is blocked for ``cooldown`` seconds; each further trip doubles the cooldown up to
``max_cooldown``.  A start that succeeds resets the doubling.  Pure: the caller
passes the time in.
"""

from __future__ import annotations

from collections import deque

from .config.settings import CrashLoopPolicy as CrashLoopPolicy


class CrashGuard:
    def __init__(self, policy: CrashLoopPolicy) -> None:
        self.policy = policy
        self._failures: deque[float] = deque()
        self._next_cooldown = policy.cooldown
        self.blocked_until = 0.0

    def failed(self, now: float) -> None:
        self._failures.append(now)
        while self._failures and self._failures[0] < now - self.policy.window:
            self._failures.popleft()
        if len(self._failures) >= self.policy.max_failures:
            self.blocked_until = now + self._next_cooldown
            self._next_cooldown = min(self._next_cooldown * 2, self.policy.max_cooldown)
            self._failures.clear()

    def started(self) -> None:
        self._failures.clear()
        self._next_cooldown = self.policy.cooldown

    def retry_in(self, now: float) -> float:
        """Seconds until the model may be tried again (0 when it may now)."""
        return max(0.0, self.blocked_until - now)
