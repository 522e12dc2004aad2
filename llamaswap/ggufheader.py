"""A GGUF file's header, read as a stream: its key/value metadata and tensor table.

The ``gguf`` package's reader maps the whole file and builds an array view for
every element of every metadata array, which takes seconds for a model with a large
vocabulary (the tokenizer's tokens, scores and merges live in the header) and holds
the GIL meanwhile.  llamaswap needs a few scalars, the length of the token list and
the tensor table, so this reader decodes scalars and short numeric arrays and only
steps over the rest.  It reads with ``read()`` (never ``mmap``: a file truncated
while it is being read cannot kill the daemon with SIGBUS), and every count is
checked against the bytes the file has, so a hostile header cannot make it allocate
or loop beyond the file's size.  A file's size costs nothing (a sparse file), so the
header is also bounded on its own: at most :data:`MAX_HEADER` bytes, strings it decodes
at most :data:`MAX_STRING`.
"""

from __future__ import annotations

import struct
from typing import IO, Any

import attrs

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
#: numeric arrays up to this length are decoded (per-layer values); longer ones counted
SHORT_ARRAY = 4096
_CHUNK = 1 << 20
#: the largest header read: real ones (a 256k-token vocabulary and its merges) take
#: tens of MiB; the bound keeps a sparse file from costing minutes of CPU
MAX_HEADER = 128 << 20
#: the longest string value decoded (chat templates take tens of KiB)
MAX_STRING = 4 << 20

# value types of the format: (struct code, size)
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, str] = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip


class HeaderError(ValueError):
    """The bytes are not a GGUF header this reader understands (the reason says why)."""


@attrs.frozen
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int  # a ggml type id
    offset: int  # from the start of the data section


@attrs.frozen
class Header:
    version: int
    #: scalars and short numeric arrays; strings decoded as UTF-8
    fields: dict[str, Any]
    #: the element count of every array field (decoded or not)
    array_lengths: dict[str, int]
    tensors: tuple[TensorInfo, ...]
    #: where the tensor data starts in the file
    data_start: int


class _Stream:
    """Bytes of ``file`` from the start, read ahead in chunks; every read is bounded
    by ``size`` (the file's length when it was looked at) and :data:`MAX_HEADER`."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self.file = file
        self.size = size
        self.limit = min(size, MAX_HEADER)
        self.buffer = b""
        self.base = 0  # file offset of buffer[0]
        self.at = 0  # position in buffer

    @property
    def offset(self) -> int:
        return self.base + self.at

    def within(self, n: int) -> None:
        """Refuse to go ``n`` bytes further: past the file, or past :data:`MAX_HEADER`."""
        if n < 0 or self.offset + n > self.size:
            raise HeaderError(f"truncated: the header runs past the file's {self.size} bytes")
        if self.offset + n > self.limit:
            raise HeaderError(f"damaged: a header longer than {MAX_HEADER >> 20} MiB")

    def need(self, n: int) -> None:
        self.within(n)
        if self.at + n <= len(self.buffer):
            return
        rest = self.buffer[self.at :]
        self.base += self.at
        more = self.file.read(max(n - len(rest), _CHUNK))
        self.buffer, self.at = rest + more, 0
        if len(self.buffer) < n:
            raise HeaderError("truncated: the file ended while its header was read")

    def unpack(self, code: str) -> Any:
        size = struct.calcsize("<" + code)
        self.need(size)
        (value,) = struct.unpack_from("<" + code, self.buffer, self.at)
        self.at += size
        return value

    def skip(self, n: int) -> None:
        self.within(n)
        if self.at + n <= len(self.buffer):
            self.at += n
            return
        self.base, self.buffer, self.at = self.offset + n, b"", 0
        self.file.seek(self.base)

    def count(self, each: int) -> int:
        """A uint64 count of items of at least ``each`` bytes, checked against the file."""
        n: int = self.unpack("Q")
        if n * each > self.size - self.offset:
            raise HeaderError(f"truncated or damaged: a count of {n} cannot fit in the file")
        self.within(n * each)
        return n

    def string(self) -> str:
        n = self.count(1)
        if n > MAX_STRING:
            raise HeaderError(f"damaged: a string of {n} bytes in its header")
        self.need(n)
        raw = self.buffer[self.at : self.at + n]
        self.at += n
        return raw.decode("utf-8", "replace")

    def skip_strings(self, n: int) -> None:
        for _ in range(n):
            self.skip(self.count(1))


def read_header(file: IO[bytes], size: int) -> Header:
    """The header of the GGUF file open as ``file``, ``size`` bytes long."""
    stream = _Stream(file, size)
    if size < 24:
        raise HeaderError(f"not a GGUF file ({size} bytes)")
    if stream.unpack("4s") != MAGIC:
        raise HeaderError("not a GGUF file (no GGUF magic at its start)")
    version = stream.unpack("I")
    if version not in (2, 3):
        raise HeaderError(f"GGUF version {version} is not supported (2 and 3 are)")
    tensor_count = stream.count(8 + 4 + 4 + 8)  # name length, dims, type, offset at least
    kv_count = stream.count(8 + 4)
    fields: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(kv_count):
        key = stream.string()
        kind = stream.unpack("I")
        if kind == _ARRAY:
            lengths[key], value = _array(stream)
            if value is not None:
                fields[key] = value
        else:
            fields[key] = _scalar(stream, kind)
    tensors = []
    for _ in range(tensor_count):
        name = stream.string()
        dims = stream.unpack("I")
        if dims > 8:
            raise HeaderError(f"damaged: tensor {name!r} has {dims} dimensions")
        shape = tuple(stream.unpack("Q") for _ in range(dims))
        tensors.append(TensorInfo(name, shape, stream.unpack("I"), stream.unpack("Q")))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = DEFAULT_ALIGNMENT
    data_start = -(-stream.offset // alignment) * alignment
    return Header(version, fields, lengths, tuple(tensors), data_start)


def _scalar(stream: _Stream, kind: int) -> Any:
    if kind == _STRING:
        return stream.string()
    code = _SCALARS.get(kind)
    if code is None:
        raise HeaderError(f"damaged: unknown value type {kind}")
    return stream.unpack(code)


def _array(stream: _Stream, depth: int = 0) -> tuple[int, list[Any] | None]:
    """(length, the values if short and numeric, else None)."""
    if depth > 4:
        raise HeaderError("damaged: arrays nested too deep")
    kind = stream.unpack("I")
    if kind == _STRING:
        n = stream.count(8)
        stream.skip_strings(n)
        return n, None
    if kind == _ARRAY:
        n = stream.count(4 + 8)
        for _ in range(n):
            _array(stream, depth + 1)
        return n, None
    code = _SCALARS.get(kind)
    if code is None:
        raise HeaderError(f"damaged: unknown array element type {kind}")
    width = struct.calcsize("<" + code)
    n = stream.count(width)
    if n > SHORT_ARRAY:
        stream.skip(n * width)
        return n, None
    return n, [stream.unpack(code) for _ in range(n)]
