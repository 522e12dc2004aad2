"""``${PORT}``: a port that is really free at the moment a child starts.

A fixed table computed at load time (as other proxies do) collides with anything
else on the machine; this allocator probes the port when it is needed and never
hands out one that another running child holds.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on ``host:port`` now (a bind probe, no traffic)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out ports from ``start`` upwards, skipping busy and leased ones."""

    def __init__(self, start: int, is_free: Callable[[int], bool] = port_is_free) -> None:
        self.start = start
        self._is_free = is_free
        self._leased: set[int] = set()
        self._next = start

    def follow(self, config: Config) -> None:
        """A reload: ports handed out from now on start at ``startPort``."""
        self.start = config.start_port

    def allocate(self) -> int:
        """Lease a free port; the caller returns it with :meth:`release`."""
        span = 65536 - self.start
        for offset in range(span):
            port = self.start + (self._next - self.start + offset) % span
            if port in self._leased or not self._is_free(port):
                continue
            self._leased.add(port)
            # round robin: a port just released may linger in TIME_WAIT elsewhere
            self._next = port + 1 if port < 65535 else self.start
            return port
        raise OSError(f"no free TCP port at or above {self.start}")

    def is_free(self, port: int) -> bool:
        """Nothing listens on ``port`` now (leased or not)."""
        return self._is_free(port)

    def release(self, port: int) -> None:
        self._leased.discard(port)
