"""What a GGUF file says about its model, and how much memory serving it takes.

The header (key/value metadata and tensor table, never the tensor data) is read by
:mod:`llamaswap.ggufheader`; the ``gguf`` package (llama.cpp's own) names the keys,
file types and tensor types.  Results are kept per file version (path, size, mtime):
a rescan reads only new or changed files.

The memory estimate is weights + KV cache for the context the command asks for + a
compute allowance; the scheduler plans with it until the child's measured footprint
is known (see :mod:`llamaswap.resources`).
"""

from __future__ import annotations

import math
import os
import stat
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

import attrs

from .ggufheader import HeaderError, read_header

#: the server binary, its threads and heap: what is not weights, KV cache or compute
RUNTIME_OVERHEAD = 24 * 2**20
#: llama-server's default physical batch (``-ub``)
DEFAULT_UBATCH = 512


class GgufError(Exception):
    """A file that is not a readable GGUF model (truncated, still being copied, not GGUF)."""


NOT_A_FILE = "not a regular file (a FIFO, a device, a folder): not read"


@attrs.frozen
class GgufFacts:
    """The facts about one model that llamaswap uses or shows; shards added up."""

    architecture: str
    name: str = ""
    parameters: int = 0
    quantization: str = ""
    context_length: int | None = None
    embedding_length: int | None = None
    feed_forward_length: int | None = None
    block_count: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    vocab_size: int | None = None
    pooling: str | None = None
    causal: bool = True
    chat_template: bool = False
    weights_bytes: int = 0

    @property
    def capabilities(self) -> tuple[str, ...]:
        """What a client can ask of it: ``chat``, ``embeddings``, ``rerank``."""
        if self.pooling == "rank":
            return ("rerank",)
        if self.pooling not in (None, "none") or not self.causal:
            return ("embeddings",)
        return ("chat",)

    def describe(self) -> dict[str, Any]:
        """The facts as shown in ``/v1/models`` (unknown ones left out)."""
        facts = attrs.asdict(self)
        return {key: value for key, value in facts.items() if value not in (None, "")}


@attrs.frozen
class Estimate:
    """Memory a llama-server child is expected to take, by part, in bytes."""

    weights: int
    kv_cache: int
    compute: int
    context: int | None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + RUNTIME_OVERHEAD

    def describe(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "overhead": RUNTIME_OVERHEAD, "total": self.total}


def read_facts(paths: Sequence[str]) -> GgufFacts:
    """Facts of the model whose weights are in ``paths`` (one file, or its shards in order).

    Raises :class:`GgufError` with a reason a person understands.
    """
    first = _read_cached(paths[0])
    if not first.architecture:
        raise GgufError("no general.architecture in its header (not a model's first file)")
    rest = []
    for path in paths[1:]:
        try:
            rest.append(_read_cached(path))
        except GgufError as e:
            raise GgufError(f"its shard {path}: {e}") from e
    if not rest:
        return first
    return attrs.evolve(
        first,
        parameters=first.parameters + sum(shard.parameters for shard in rest),
        weights_bytes=first.weights_bytes + sum(shard.weights_bytes for shard in rest),
    )


def estimate(facts: GgufFacts, argv: Sequence[str], extra_weights: int = 0) -> Estimate:
    """Memory for serving ``facts`` with the llama-server command ``argv``.

    ``extra_weights`` are other files the command loads (a vision projector).
    """
    context = _int_option(argv, ("-c", "--ctx-size")) or facts.context_length
    kv = 0
    if facts.causal and facts.capabilities == ("chat",) and context:
        per_token = _kv_bytes_per_token(facts, _cache_type(argv, "k"), _cache_type(argv, "v"))
        kv = context * per_token
    ubatch = _int_option(argv, ("-ub", "--ubatch-size")) or DEFAULT_UBATCH
    width = (facts.embedding_length or 0) + (facts.feed_forward_length or 0)
    # activations of one physical batch (f32, a few live at a time) and the logits
    compute = ubatch * width * 16 + (facts.vocab_size or 0) * 4 * 8
    return Estimate(
        weights=facts.weights_bytes + extra_weights, kv_cache=kv, compute=compute, context=context
    )


# --- reading ----------------------------------------------------------------------

_cache: dict[str, tuple[tuple[int, int, int], GgufFacts | GgufError]] = {}
_cache_lock = threading.Lock()  # rescans read headers in a thread


def _read_cached(path: str) -> GgufFacts:
    try:
        info = os.stat(path)
    except OSError as e:
        raise GgufError(f"cannot read it: {e.strerror or e}") from e
    if not stat.S_ISREG(info.st_mode):
        raise GgufError(NOT_A_FILE)
    stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
    with _cache_lock:
        cached = _cache.get(path)
    if cached is None or cached[0] != stamp:
        result: GgufFacts | GgufError
        try:
            result = _read(path, info.st_size)
        except GgufError as e:
            result = e
        except Exception as e:  # a header nobody foresaw costs its own file, not the scan
            result = GgufError(f"its header cannot be used: {e!r}")
        with _cache_lock:
            _cache[path] = (stamp, result)
    else:
        result = cached[1]
    if isinstance(result, GgufError):
        raise result
    return result


def forget(paths: Sequence[str]) -> None:
    """Drop what was read from files that are gone (keeps the cache as small as the folder)."""
    with _cache_lock:
        for path in paths:
            _cache.pop(path, None)


def cached_paths() -> list[str]:
    with _cache_lock:
        return list(_cache)


def _open(path: str) -> IO[bytes]:
    """``path`` opened for reading, if it is still a regular file.

    ``O_NONBLOCK``: a FIFO put in its place since the ``stat`` is not waited on (for
    a writer that may never come); the ``fstat`` then refuses it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise GgufError(NOT_A_FILE)
    return os.fdopen(fd, "rb")


def _read(path: str, size: int) -> GgufFacts:
    try:
        with _open(path) as file:
            header = read_header(file, size)
    except HeaderError as e:
        message = str(e)
        raise GgufError(
            message + ("; still being copied?" if message.startswith("truncated") else "")
        ) from e
    except OSError as e:
        raise GgufError(f"cannot read it: {e.strerror or e}") from e
    # imported here: the package pulls in numpy (~15 MiB), needed only with GGUF files
    import gguf

    sizes = []
    for tensor in header.tensors:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor.type)]
        except (ValueError, KeyError):
            raise GgufError(f"tensor {tensor.name!r} has an unknown type {tensor.type}") from None
        elements = math.prod(tensor.shape)
        sizes.append((tensor, elements, elements // block * type_size))
    ends = [header.data_start + t.offset + n_bytes for t, _, n_bytes in sizes]
    if ends and max(ends) > size:
        raise GgufError(
            f"truncated: its tensors need {max(ends)} bytes, the file has {size}; "
            "still being copied?"
        )
    fields = header.fields
    arch = str(fields.get("general.architecture") or "")  # only the first shard has it

    def number(key: str) -> int | None:
        """A count or size: a whole number of at least 0 (a header may say NaN or -1)."""
        value = fields.get(key.format(arch=arch))
        if isinstance(value, list):  # per-layer values (a few architectures)
            value = max(value) if value else None
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            return None
        return int(value)

    bytes_by_type: dict[int, int] = {}
    for tensor, _, n_bytes in sizes:
        bytes_by_type[tensor.type] = bytes_by_type.get(tensor.type, 0) + n_bytes
    vocab = number(gguf.Keys.LLM.VOCAB_SIZE)
    if vocab is None:
        vocab = header.array_lengths.get("tokenizer.ggml.tokens")
    causal = fields.get(gguf.Keys.Attention.CAUSAL.format(arch=arch))
    return GgufFacts(
        architecture=arch,
        name=str(fields.get(gguf.Keys.General.NAME) or ""),
        parameters=sum(elements for _, elements, _ in sizes),
        quantization=_quantization(number(gguf.Keys.General.FILE_TYPE), bytes_by_type),
        context_length=number(gguf.Keys.LLM.CONTEXT_LENGTH),
        embedding_length=number(gguf.Keys.LLM.EMBEDDING_LENGTH),
        feed_forward_length=number(gguf.Keys.LLM.FEED_FORWARD_LENGTH),
        block_count=number(gguf.Keys.LLM.BLOCK_COUNT),
        head_count=number(gguf.Keys.Attention.HEAD_COUNT),
        head_count_kv=number(gguf.Keys.Attention.HEAD_COUNT_KV),
        key_length=number(gguf.Keys.Attention.KEY_LENGTH),
        value_length=number(gguf.Keys.Attention.VALUE_LENGTH),
        vocab_size=vocab,
        pooling=_pooling_name(number(gguf.Keys.LLM.POOLING_TYPE)),
        causal=causal is not False,
        chat_template=gguf.Keys.Tokenizer.CHAT_TEMPLATE in fields,
        weights_bytes=sum(n_bytes for _, _, n_bytes in sizes),
    )


def _pooling_name(value: int | None) -> str | None:
    import gguf

    names = {p.value: p.name.lower() for p in gguf.PoolingType}
    return names.get(value) if value is not None else None


def _quantization(file_type: int | None, bytes_by_type: Mapping[int, int]) -> str:
    import gguf

    if file_type is not None:
        try:
            name = gguf.LlamaFileType(file_type).name
        except ValueError:
            name = ""
        if name:
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    # no (known) file type: the tensor type holding the most bytes
    if not bytes_by_type:
        return ""
    return gguf.GGMLQuantizationType(max(bytes_by_type, key=lambda t: bytes_by_type[t])).name


# --- the command line -------------------------------------------------------------


def _option(argv: Sequence[str], names: tuple[str, ...]) -> str | None:
    """The value of the last of ``names`` in ``argv`` (``-c 4096`` or ``--ctx-size=4096``)."""
    found = None
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if name in names:
            found = value if equals else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def _int_option(argv: Sequence[str], names: tuple[str, ...]) -> int | None:
    value = _option(argv, names)
    try:
        return int(value) if value is not None and int(value) > 0 else None
    except ValueError:
        return None


def _cache_type(argv: Sequence[str], which: str) -> float:
    """Bytes per element of the K or V cache (``-ctk q8_0``), f16 by default."""
    import gguf

    name = _option(argv, (f"-ct{which}", f"--cache-type-{which}")) or "f16"
    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]
    except KeyError:
        return 2.0
    return size / block


def _kv_bytes_per_token(facts: GgufFacts, k_bytes: float, v_bytes: float) -> int:
    layers = facts.block_count or 0
    heads = facts.head_count or 0
    heads_kv = facts.head_count_kv or heads
    head_dim = (facts.embedding_length or 0) // heads if heads else 0
    k = facts.key_length or head_dim
    v = facts.value_length or head_dim
    return int(layers * heads_kv * (k * k_bytes + v * v_bytes))
