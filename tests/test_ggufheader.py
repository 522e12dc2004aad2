"""The streaming GGUF header reader: the same facts as llama.cpp's own reader, and
nothing but a clear error (or a header) from a damaged or hostile file."""

from __future__ import annotations

import contextlib
import io
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.ggufheader import MAX_HEADER, MAX_STRING, HeaderError, read_header


def model_bytes(vocab: int = 3000) -> bytes:
    """A small model file with what real ones have: a long token list, per-layer
    values, a nested array, and tensors of two types."""
    with tempfile.TemporaryDirectory() as where:
        path = Path(where) / "m.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_name("tiny")
        writer.add_block_count(3)
        writer.add_context_length(2048)
        writer.add_head_count_kv([2, 4, 2])
        writer.add_token_list([f"tok{i}" for i in range(vocab)])
        writer.add_token_scores([0.5] * vocab)
        writer.add_array("test.nested", [[1, 2], [3]])
        writer.add_chat_template("{{ messages }}")
        writer.add_tensor("a.weight", np.zeros((8, 32), dtype=np.float32))
        writer.add_tensor("b.weight", np.zeros((4, 32), dtype=np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


WHOLE = model_bytes()


def read(data: bytes) -> object:
    return read_header(io.BytesIO(data), len(data))


class ReadTests(SynchronousTestCase):
    def test_the_same_as_llama_cpps_reader(self) -> None:
        with tempfile.NamedTemporaryFile(suffix=".gguf") as file:
            file.write(WHOLE)
            file.flush()
            reference = gguf.GGUFReader(file.name)
            header = read_header(open(file.name, "rb"), len(WHOLE))  # noqa: SIM115
        self.assertEqual(header.fields["general.name"], "tiny")
        self.assertEqual(header.fields["llama.context_length"], 2048)
        self.assertEqual(header.fields["llama.attention.head_count_kv"], [2, 4, 2])
        self.assertNotIn("tokenizer.ggml.tokens", header.fields)  # counted, not decoded
        self.assertEqual(header.array_lengths["tokenizer.ggml.tokens"], 3000)
        self.assertEqual(header.array_lengths["test.nested"], 2)
        self.assertIn("tokenizer.chat_template", header.fields)
        for key, field in reference.fields.items():
            if key in header.fields and not key.startswith("GGUF."):
                self.assertEqual(header.fields[key], field.contents(), key)
        self.assertEqual(
            [(t.name, t.type, header.data_start + t.offset) for t in header.tensors],
            [(t.name, int(t.tensor_type), int(t.data_offset)) for t in reference.tensors],
        )

    def test_every_cut_of_the_header_is_reported_as_truncated(self) -> None:
        end = read_header(io.BytesIO(WHOLE), len(WHOLE)).data_start
        for cut in range(24, end - 31, 7):  # the last 31 bytes may be alignment padding
            with self.assertRaises(HeaderError, msg=f"cut at {cut}") as caught:
                read(WHOLE[:cut])
            self.assertTrue(str(caught.exception).startswith("truncated"), caught.exception)

    def test_a_hostile_count_is_refused_without_looping_or_allocating(self) -> None:
        huge = WHOLE[:8] + struct.pack("<QQ", 0, 2**62) + WHOLE[24:]
        self.assertIn("cannot fit", str(self.assertRaises(HeaderError, read, huge)))
        many_strings = (
            WHOLE[:24]
            + struct.pack("<Q", 4)
            + b"keys"
            + struct.pack("<IIQ", 9, 8, 2**40)  # an array of 2^40 strings
        )
        many_strings += b"\0" * 64
        self.assertIn("cannot fit", str(self.assertRaises(HeaderError, read, many_strings)))

    def sparse(self, start: bytes, size: int = 1 << 30) -> str:
        """A file of ``size`` bytes that takes no disk: ``start``, then zeros."""
        path = str(self.mktemp())
        with open(path, "wb") as file:
            file.write(start)
            file.truncate(size)
        return path

    def read_file(self, path: str) -> object:
        with open(path, "rb") as file:
            return read_header(file, Path(path).stat().st_size)

    def test_a_huge_string_in_a_sparse_file_is_refused_before_it_is_read(self) -> None:
        # one key whose value claims to be a string just over the bound (a real one
        # can claim gigabytes: the file's size is free)
        start = (
            WHOLE[:8] + struct.pack("<QQQ", 0, 1, 1) + b"k" + struct.pack("<IQ", 8, MAX_STRING + 1)
        )
        caught = self.assertRaises(HeaderError, self.read_file, self.sparse(start))
        self.assertIn("a string of", str(caught))

    def test_a_sparse_file_cannot_make_the_reader_step_through_it(self) -> None:
        # zeros read as empty keys with a byte value each: without the bound the reader
        # would walk the whole file, 13 bytes a step
        start = WHOLE[:8] + struct.pack("<QQ", 0, MAX_HEADER // 12 + 1)
        caught = self.assertRaises(HeaderError, self.read_file, self.sparse(start))
        self.assertIn("header longer than", str(caught))
        # nor when every count fits on its own: a byte array stepped over whole, then
        # keys past the bound
        array = struct.pack("<IIQ", 9, 0, MAX_HEADER - 64)
        start = WHOLE[:8] + struct.pack("<QQQ", 0, 1000, 1) + b"k" + array
        caught = self.assertRaises(HeaderError, self.read_file, self.sparse(start))
        self.assertIn("header longer than", str(caught))

    def test_not_gguf(self) -> None:
        self.assertIn("not a GGUF file", str(self.assertRaises(HeaderError, read, b"x" * 100)))
        version_1 = WHOLE[:4] + struct.pack("<I", 1) + WHOLE[8:]
        self.assertIn("version 1", str(self.assertRaises(HeaderError, read, version_1)))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 2047), st.integers(0, 255)), max_size=8))
    def test_a_damaged_header_gives_a_header_or_a_clear_error(
        self, flips: list[tuple[int, int]]
    ) -> None:
        data = bytearray(WHOLE[:2048])
        for at, value in flips:
            data[at] = value
        with contextlib.suppress(HeaderError):
            read(bytes(data))
