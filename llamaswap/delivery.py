"""How much of what was sent a client has taken, as far as the kernel tells.

Twisted resumes a paused producer only once its whole write buffer has gone into
the socket, so a client that reads slowly can keep a connection paused for long
while it reads all the time.  To tell it from one that reads nothing, the stall
timer (:mod:`llamaswap.connections`) compares two samples of the socket:

- ``acked`` (Linux, TCP): ``tcpi_bytes_acked`` of ``TCP_INFO``, every byte the
  client's end has acknowledged since the connection opened.  Past its receive
  window a client acknowledges only what its program reads, so this grows while it
  reads and stands still when it does not.
- ``queued`` (``SIOCOUTQ``; a Unix socket, or a kernel without ``bytes_acked``):
  bytes written to the socket that the client has not taken.  Only the client's
  reading makes it shrink, but Twisted refills it as soon as there is room, so a
  reading client can show the same figure twice: it is a fallback.

Where neither can be read (another platform, a TLS transport without a socket
below it) a sample is empty and nothing counts as taken: the client is cut after
``stallTimeout`` as before.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import Any

import attrs

# struct tcp_info (linux/tcp.h, a stable ABI: fields are only appended):
# tcpi_bytes_acked is the u64 after tcpi_pacing_rate and tcpi_max_pacing_rate
_BYTES_ACKED_AT = 120
_TCP_INFO_SIZE = 256


@attrs.frozen
class Delivery:
    """One look at a connection's socket; None for what it could not tell."""

    acked: int | None = None
    queued: int | None = None

    def taken_since(self, before: Delivery) -> bool:
        """Whether the client took bytes between ``before`` and this sample."""
        if self.acked is not None and before.acked is not None:
            return self.acked > before.acked
        if self.queued is not None and before.queued is not None:
            return self.queued < before.queued
        return False


def delivery(transport: Any) -> Delivery:
    """A sample of the socket under ``transport`` (or of the one it wraps: TLS)."""
    sock = _socket_of(transport)
    if sock is None:
        return Delivery()
    return Delivery(acked=_bytes_acked(sock), queued=_queued(sock))


def _socket_of(transport: Any) -> socket.socket | None:
    for _ in range(4):  # a TLS transport wraps the TCP one (``ProtocolWrapper.transport``)
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


def _bytes_acked(sock: socket.socket) -> int | None:
    option = getattr(socket, "TCP_INFO", None)
    if option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_SIZE)
    except OSError:
        return None
    if len(info) < _BYTES_ACKED_AT + 8:  # a kernel older than 4.1
        return None
    acked: int = struct.unpack_from("Q", info, _BYTES_ACKED_AT)[0]
    return acked


def _queued(sock: socket.socket) -> int | None:
    request = getattr(termios, "TIOCOUTQ", None)  # SIOCOUTQ on Linux
    if request is None:
        return None
    try:
        answer = fcntl.ioctl(sock.fileno(), request, b"\0" * 4)
    except OSError:
        return None
    queued: int = struct.unpack("i", answer)[0]
    return queued
