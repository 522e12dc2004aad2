"""Models folders: GGUF files served without a YAML entry, sized from their own headers.

The small GGUF files are written here with ``gguf.GGUFWriter`` (llama.cpp's own
writer); the end-to-end tests at the bottom use the real SmolLM2 model and the real
llama-server (``LLAMASWAP_MODEL``, ``LLAMA_SERVER``; skipped without them, except
under CI).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import openai
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from llamaswap import modelsdir
from llamaswap.config import Config, ConfigError, load_config, parse_config
from llamaswap.gguf_models import RUNTIME_OVERHEAD, GgufError, _read, cached_paths, read_facts
from llamaswap.livefolder import FolderReloader
from llamaswap.tap import Options

from .daemon import TWISTD, daemon_env, free_port, pid_alive
from .helpers import notices_of

ENVIRON = {"LLAMA_SERVER": "/opt/llama/llama-server", "PATH": ""}


def write_gguf(
    path: Path,
    arch: str = "llama",
    *,
    name: str = "",
    pooling: gguf.PoolingType | None = None,
    causal: bool | None = None,
    context: int = 4096,
    shards: int = 1,
    tensors: int = 2,
) -> None:
    """A small but well-formed GGUF model file (or ``shards`` files beside each other)."""
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=1 if shards > 1 else 0)
    writer.add_name(name or path.stem)
    writer.add_block_count(4)
    writer.add_context_length(context)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_vocab_size(1000)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if pooling is not None:
        writer.add_pooling_type(pooling)
    if causal is not None:
        writer.add_causal_attention(causal)
    for i in range(max(tensors, shards)):
        writer.add_tensor(f"blk.{i}.weight", np.zeros((16, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def folder() -> Path:
    path = Path(tempfile.mkdtemp(prefix="llamaswap-models-"))
    return path


#: seconds a test double's hung call waits before it returns all the same: a test
#: of code that waits on it (without a deadline) fails rather than hangs
STUCK_AT_MOST = 10.0


def hang_calls(
    case: SynchronousTestCase, owner: object, name: str, stuck: Callable[[Any], bool]
) -> tuple[threading.Event, list[threading.Thread]]:
    """Calls of ``owner.name`` whose first argument is ``stuck`` do not return (as on
    a dead NFS mount, which cannot be made here) until the event is set; the threads
    that made them."""
    release = threading.Event()
    case.addCleanup(release.set)
    callers: list[threading.Thread] = []
    real = getattr(owner, name)

    def call(first: Any, *args: Any, **kwargs: Any) -> Any:
        if stuck(first):
            callers.append(threading.current_thread())
            release.wait(STUCK_AT_MOST)
        return real(first, *args, **kwargs)

    case.patch(owner, name, call)
    return release, callers


def hang_listing_of(
    case: SynchronousTestCase, hung: Path
) -> tuple[threading.Event, list[threading.Thread]]:
    """Listings of ``hung`` do not return until the event is set; the threads that
    listed it."""
    return hang_calls(case, modelsdir, "listing", lambda path: path == str(hung))


def hang_stat_of(
    case: SynchronousTestCase, hung: Path
) -> tuple[threading.Event, list[threading.Thread]]:
    """``os.stat`` of ``hung`` does not return until the event is set (the file is
    on a mount that died after its folder was listed); the threads that called it."""
    return hang_calls(case, os, "stat", lambda path: os.fspath(path) == str(hung))


def stuck_once_then_released(
    case: SynchronousTestCase, stuck: list[threading.Thread], release: threading.Event
) -> None:
    """One call hung, in a daemon thread of its own (not the caller's, not a pool's:
    exit is not held); then the mount comes back and it ends."""
    case.assertEqual(len(stuck), 1)
    case.assertTrue(stuck[0].daemon)
    case.assertNotEqual(stuck[0], threading.current_thread())
    release.set()
    stuck[0].join(10)


class ScanTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = folder()
        self.addCleanup(shutil.rmtree, self.dir)

    def load(self, text: str = "{}", **kwargs: Any) -> Config:
        return parse_config(
            text, "test.yaml", ENVIRON, models_dirs=[str(self.dir), *kwargs.get("more", [])]
        )

    def test_every_kind_of_model_file_becomes_a_model(self) -> None:
        write_gguf(self.dir / "chat-7b.gguf")
        (self.dir / "vision").mkdir()
        write_gguf(self.dir / "vision" / "big.gguf", shards=3)
        write_gguf(self.dir / "vision" / "mmproj-big-f16.gguf", arch="clip", tensors=1)
        write_gguf(
            self.dir / "embed.gguf", arch="bert", pooling=gguf.PoolingType.MEAN, causal=False
        )
        write_gguf(self.dir / "ranker.gguf", arch="bert", pooling=gguf.PoolingType.RANK)
        write_gguf(self.dir / ".partial.gguf")  # rsync's temporary name: not looked at
        (self.dir / "notes.txt").write_text("not a model")

        config = self.load()

        self.assertEqual(sorted(config.models), ["chat-7b", "embed", "ranker", "vision"])
        self.assertEqual(notices_of(config), ())
        chat = config.models["chat-7b"]
        self.assertEqual(
            chat.cmd.argv,
            (
                "/opt/llama/llama-server", "--host", "127.0.0.1", "--port", "${PORT}",
                "--alias", "chat-7b", "-m", str(self.dir / "chat-7b.gguf"),
                "--slot-save-path", chat.slot_save_path,  # kvCache: on for llama-server
            ),
        )  # fmt: skip
        self.assertEqual(chat.gguf["capabilities"], ["chat"])
        self.assertEqual(chat.gguf["architecture"], "llama")
        self.assertEqual(chat.gguf["context_length"], 4096)
        self.assertEqual(chat.gguf["quantization"], "F32")
        self.assertEqual(chat.gguf["parameters"], 2 * 16 * 64)

        vision = config.models["vision"]
        argv = vision.cmd.argv
        self.assertEqual(
            argv[argv.index("-m") + 1], str(self.dir / "vision" / "big-00001-of-00003.gguf")
        )
        self.assertEqual(
            argv[argv.index("--mmproj") + 1], str(self.dir / "vision" / "mmproj-big-f16.gguf")
        )
        self.assertEqual(vision.gguf["parameters"], 3 * 16 * 64)  # the shards added up
        self.assertEqual(len(vision.gguf["files"]), 3)
        # the projector's weights are part of the estimate
        self.assertEqual(vision.gguf["estimate"]["weights"], 4 * 16 * 64 * 4)

        self.assertIn("--embedding", config.models["embed"].cmd.argv)
        self.assertEqual(config.models["embed"].gguf["capabilities"], ["embeddings"])
        self.assertEqual(config.models["embed"].gguf["estimate"]["kv_cache"], 0)
        self.assertIn("--rerank", config.models["ranker"].cmd.argv)
        self.assertEqual(config.models["ranker"].gguf["capabilities"], ["rerank"])

    def test_memory_is_estimated_from_the_header_and_the_context_asked_for(self) -> None:
        write_gguf(self.dir / "chat.gguf", context=4096)
        text = 'modelDefaults:\n  args:\n    "ch*": --ctx-size 1024 -ctk q8_0\n'
        model = self.load(text).models["chat"]
        estimate = model.gguf["estimate"]
        self.assertEqual(estimate["context"], 1024)
        # 4 layers x 2 KV heads x (K: 16 dims at q8_0's 34/32 bytes + V: 16 dims f16) per token
        self.assertEqual(estimate["kv_cache"], 1024 * 4 * 2 * int(16 * 34 / 32 + 16 * 2))
        self.assertEqual(estimate["weights"], 2 * 16 * 64 * 4)
        self.assertEqual(
            estimate["total"],
            estimate["weights"] + estimate["kv_cache"] + estimate["compute"] + RUNTIME_OVERHEAD,
        )
        self.assertEqual(dict(model.memory), {"ram": estimate["total"]})
        # with a VRAM budget, the figure is GPU memory
        vram = self.load(text + "resources: {vram: 24GiB}\n").models["chat"]
        self.assertEqual(dict(vram.memory), {"vram": estimate["total"]})
        # without --ctx-size, llama-server takes the trained context
        self.assertEqual(self.load().models["chat"].gguf["estimate"]["context"], 4096)

    def test_an_entry_in_the_file_wins_and_keeps_its_declared_memory(self) -> None:
        write_gguf(self.dir / "chat.gguf")
        write_gguf(self.dir / "other.gguf")
        text = (
            "models:\n"
            "  chat:\n"
            f"    cmd: my-server --port ${{PORT}} -m {self.dir / 'chat.gguf'}\n"
            "    memory: 5GiB\n"
            "    aliases: [other]\n"
        )
        config = self.load(text)
        self.assertEqual(list(config.models), ["chat"])  # 'other' is the entry's alias
        self.assertEqual(config.models["chat"].cmd.argv[0], "my-server")
        self.assertEqual(dict(config.models["chat"].memory), {"ram": 5 * 2**30})
        # a hand-written entry is described from the file its command loads, too
        self.assertEqual(config.models["chat"].gguf["architecture"], "llama")

    def test_model_defaults_template(self) -> None:
        write_gguf(self.dir / "a.gguf")
        (self.dir / "v").mkdir()
        write_gguf(self.dir / "v" / "v.gguf")
        write_gguf(self.dir / "v" / "mmproj.gguf", arch="clip")
        text = (
            "macros:\n  threads: '4'\n"
            "modelDefaults:\n"
            "  cmd: |\n"
            "    srv --port ${PORT} -m ${MODEL_PATH} ${MMPROJ} -t ${threads}\n"
            "    # the last line is a comment\n"
            "  args:\n    '*': --flash-attn on\n    'v': -ngl 99\n"
            "  ttl: 60\n"
            "  env: [OMP_WAIT_POLICY=passive]\n"
        )
        config = self.load(text)
        a, v = config.models["a"], config.models["v"]
        self.assertEqual(
            a.cmd.argv,
            (
                "srv",
                "--port",
                "${PORT}",
                "-m",
                str(self.dir / "a.gguf"),
                "-t",
                "4",
                "--flash-attn",
                "on",
            ),
        )
        self.assertEqual(v.cmd.argv[-6:], ("-t", "4", "--flash-attn", "on", "-ngl", "99"))
        self.assertIn("--mmproj", v.cmd.argv)
        self.assertEqual((a.ttl, a.env), (60, (("OMP_WAIT_POLICY", "passive"),)))

    def test_a_broken_file_is_skipped_with_one_clear_notice(self) -> None:
        write_gguf(self.dir / "good.gguf")
        write_gguf(self.dir / "half.gguf")
        whole = (self.dir / "half.gguf").read_bytes()
        (self.dir / "half.gguf").write_bytes(whole[: len(whole) - 100])  # still being copied
        (self.dir / "junk.gguf").write_bytes(b"not a model at all" * 10)
        (self.dir / "empty.gguf").write_bytes(b"")
        write_gguf(self.dir / "split.gguf", shards=3)
        os.remove(self.dir / "split-00002-of-00003.gguf")
        (self.dir / "bad:name.gguf").write_bytes((self.dir / "good.gguf").read_bytes())
        (self.dir / "two\nlines.gguf").write_bytes((self.dir / "good.gguf").read_bytes())

        config = self.load()

        self.assertEqual(list(config.models), ["good"])
        notices = "\n".join(notices_of(config))
        self.assertEqual(len(notices_of(config)), 6, notices)
        self.assertIn(f"{self.dir / 'half.gguf'}: skipped: truncated", notices)
        self.assertIn("still being copied?", notices)
        self.assertIn(f"{self.dir / 'junk.gguf'}: skipped: not a GGUF file", notices)
        self.assertIn(f"{self.dir / 'empty.gguf'}: skipped: not a GGUF file (0 bytes)", notices)
        self.assertIn("split-*-of-00003.gguf: skipped: shard(s) 2 of 3 missing", notices)
        self.assertIn("'bad:name' cannot be a model id", notices)
        self.assertIn("lines.gguf': skipped: its path holds '${' or a line break", notices)

    def test_a_file_name_is_one_argument_however_it_is_spelled(self) -> None:
        # found with a real llama-server: "--alias ${MODEL_ID}" split the id, so a file
        # "b c.gguf" failed to start ("invalid argument: c"), "Meta's llama.gguf" was
        # skipped (no closing quotation), and "m --host 0.0.0.0.gguf" started a child
        # listening on every interface, past llamaswap's keys
        names = ["b c", "Meta's llama", 'say "hi"', "m --host 0.0.0.0", "x \\ y"]
        for name in names:
            write_gguf(self.dir / f"{name}.gguf")

        config = self.load()

        self.assertEqual(sorted(config.models), sorted(names))
        self.assertEqual(notices_of(config), ())
        for name in names:
            model = config.models[name]
            argv = model.cmd.argv
            self.assertEqual(
                argv[argv.index("--alias") + 1 :][:3], (name, "-m", str(self.dir / f"{name}.gguf"))
            )
            self.assertEqual(argv.count("--host"), 1)

    def test_a_quoted_model_id_in_a_written_command_stays_one_argument(self) -> None:
        config = parse_config(
            'models:\n  "my model":\n'
            '    cmd: server --alias "${MODEL_ID}" --name=${MODEL_ID} ${PORT}\n'
            "    cmdStop: stop-it ${MODEL_ID} ${PID}\n"
        )
        model = config.models["my model"]
        self.assertEqual(
            model.cmd.argv, ("server", "--alias", "my model", "--name=my model", "${PORT}")
        )
        assert model.cmd_stop is not None
        self.assertEqual(model.cmd_stop.argv, ("stop-it", "my model", "${PID}"))

    def test_odd_numbers_in_a_header_are_unknown_not_fatal(self) -> None:
        # a context length of NaN raised out of the scan: the daemon did not start, and
        # each reload failed (so did a change of API keys) while the file was there
        write_gguf(self.dir / "good.gguf")
        writer = gguf.GGUFWriter(self.dir / "odd.gguf", "llama")
        writer.add_float32("llama.context_length", float("nan"))
        writer.add_float32("llama.embedding_length", float("inf"))
        writer.add_int32("llama.block_count", -1)
        writer.add_tensor("blk.0.weight", np.zeros((16, 64), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

        config = self.load()

        self.assertEqual(sorted(config.models), ["good", "odd"])
        facts = config.models["odd"].gguf
        for unknown in ("context_length", "embedding_length", "block_count"):
            self.assertNotIn(unknown, facts)
        self.assertGreater(facts["estimate"]["total"], 0)

    def test_no_config_file_at_all(self) -> None:
        write_gguf(self.dir / "m.gguf")
        config = load_config(None, ["tcp:8080"], [str(self.dir)])
        self.assertEqual(list(config.models), ["m"])
        self.assertEqual(config.models_dirs, (str(self.dir),))
        # an empty folder serves nothing yet, but it is no error: files may come
        os.remove(self.dir / "m.gguf")
        self.assertEqual(dict(load_config(None, (), [str(self.dir)]).models), {})

    def test_a_folder_that_is_not_there_is_an_error(self) -> None:
        nope = str(self.dir / "nope")
        error = self.assertRaises(ConfigError, load_config, None, (), [nope])
        self.assertEqual(str(error), f"--models-dir: {nope} is not a folder")  # said once
        config = self.dir / "c.yaml"
        config.write_text("models: {}\n")
        error = self.assertRaises(ConfigError, load_config, str(config), (), [nope])
        self.assertEqual(str(error), f"--models-dir: {nope} is not a folder")  # not the file's
        error = self.assertRaises(ConfigError, self.load, "modelsDir: [a, nope]\n")
        self.assertEqual(error.path, "modelsDir[0]")

    def test_models_dir_in_the_file_is_relative_to_the_file(self) -> None:
        (self.dir / "models").mkdir()
        write_gguf(self.dir / "models" / "m.gguf")
        path = self.dir / "config.yaml"
        path.write_text("modelsDir: models\n")
        self.assertEqual(list(load_config(path).models), ["m"])

    def test_a_found_model_whose_header_never_arrives_is_served_with_its_facts_unknown(
        self,
    ) -> None:
        # the folder listed, then its mount dies before the header is read
        write_gguf(self.dir / "hung.gguf")
        write_gguf(self.dir / "fine.gguf")
        hung = str(self.dir / "hung.gguf")
        release, readers = hang_calls(self, modelsdir, "read_facts", lambda paths: hung in paths)
        self.patch(modelsdir, "HEADER_WAIT", 0.05)

        # before: the read held the scan (the start, a reload's thread) for good
        config = self.load()
        self.assertEqual(sorted(config.models), ["fine", "hung"])
        self.assertEqual(config.models["hung"].gguf, {"files": [hung]})  # served, facts unknown
        self.assertEqual(config.models["hung"].cmd.argv[-3:-2], (hung,))
        self.assertEqual(config.models["fine"].gguf["architecture"], "llama")
        self.assertEqual(
            notices_of(config),
            (
                f"{hung}: served with its facts unknown: its header did not arrive "
                "within 0.05s (a hung network mount?)",
            ),
        )
        # the next scan does not wait for it again, nor begin another read of it
        config = self.load()
        self.assertEqual(config.models["hung"].gguf, {"files": [hung]})
        (notice,) = notices_of(config)
        self.assertIn(f"{hung}: served with its facts unknown: its header is still being", notice)
        stuck_once_then_released(self, readers, release)
        # the mount has come back: the next scan reads it
        config = self.load()
        self.assertEqual(config.models["hung"].gguf["architecture"], "llama")
        self.assertEqual(notices_of(config), ())

    def test_the_headers_of_found_models_are_read_together_in_one_wait(self) -> None:
        # the first read ends only once the last has begun: read one after the
        # other (each waiting for its own), the first gives up and its model is skipped
        paths = [str(self.dir / f"m{i}.gguf") for i in range(3)]
        for path in paths:
            write_gguf(Path(path))
        last_begun = threading.Event()
        self.addCleanup(last_begun.set)
        real = read_facts

        def read(files: list[str]) -> Any:
            if files[0] == paths[-1]:
                last_begun.set()
            elif files[0] == paths[0] and not last_begun.wait(STUCK_AT_MOST):
                raise GgufError("read alone")
            return real(files)

        self.patch(modelsdir, "read_facts", read)
        config = self.load()
        self.assertEqual(notices_of(config), ())
        for model_id in ("m0", "m1", "m2"):
            self.assertEqual(config.models[model_id].gguf["architecture"], "llama")

    def test_a_file_gone_from_the_folder_is_forgotten_without_looking_at_it(self) -> None:
        # its cached header is dropped because the listing no longer has it: an
        # exists() would hang on a mount dead since the listing
        write_gguf(self.dir / "gone.gguf")
        gone = str(self.dir / "gone.gguf")
        self.assertIn("gone", self.load().models)
        self.assertIn(gone, cached_paths())
        os.remove(gone)
        _, lookers = hang_stat_of(self, Path(gone))
        self.assertEqual(dict(self.load().models), {})
        self.assertEqual(lookers, [])
        self.assertNotIn(gone, cached_paths())


def unblocked(test: SynchronousTestCase, work: Callable[[], Any], fifo: Path) -> Any:
    """``work()``'s result; the test fails if it is still blocked on ``fifo`` after
    10 s (a writer is then opened to set it free, so no thread is left behind)."""
    done: Future[Any] = Future()

    def run() -> None:
        try:
            done.set_result(work())
        except BaseException as e:
            done.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    try:
        return done.result(timeout=10)
    except TimeoutError:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # EOF for the reader
        test.fail(f"blocked opening the FIFO {fifo}")


class UnluckyPathTests(SynchronousTestCase):
    """A model file named in a command that is a FIFO, a device or on a hung mount:
    the configuration still loads, the model is served with its facts unknown."""

    def setUp(self) -> None:
        self.dir = folder()
        self.addCleanup(shutil.rmtree, self.dir)

    def load(self, path: Path) -> Config:
        return parse_config(f"models:\n  m:\n    cmd: my-server --port ${{PORT}} -m {path}\n")

    def test_a_fifo_named_in_a_command_is_never_opened(self) -> None:
        fifo = self.dir / "model.gguf"
        os.mkfifo(fifo)
        config = unblocked(self, lambda: self.load(fifo), fifo)
        self.assertEqual(config.models["m"].gguf, {})  # listed, its facts unknown
        (notice,) = notices_of(config)
        self.assertIn("not a regular file", notice)

    def test_a_fifo_among_the_shards_is_never_opened(self) -> None:
        write_gguf(self.dir / "big.gguf", shards=2)
        second = self.dir / "big-00002-of-00002.gguf"
        second.unlink()
        os.mkfifo(second)
        config = unblocked(self, lambda: self.load(self.dir / "big-00001-of-00002.gguf"), second)
        self.assertEqual(config.models["m"].gguf, {})
        (notice,) = notices_of(config)
        self.assertIn(f"its shard {second}: not a regular file", notice)

    def test_two_models_of_one_file_are_both_described(self) -> None:
        write_gguf(self.dir / "m.gguf")
        config = parse_config(
            f"models:\n  a:\n    cmd: srv --port ${{PORT}} -m {self.dir / 'm.gguf'}\n"
            f"  b:\n    cmd: srv --port ${{PORT}} -m {self.dir / 'm.gguf'} -c 512\n"
        )
        self.assertEqual(notices_of(config), ())
        self.assertEqual(config.models["a"].gguf["architecture"], "llama")
        self.assertEqual(config.models["b"].gguf["architecture"], "llama")

    def test_a_device_is_never_read(self) -> None:
        config = self.load(Path("/dev/zero.gguf"))  # not there: said, never read
        self.assertEqual(len(notices_of(config)), 1)
        self.assertIn("/dev/zero.gguf: no such file (yet)", notices_of(config)[0])
        os.symlink("/dev/zero", self.dir / "zero.gguf")
        config = self.load(self.dir / "zero.gguf")
        self.assertEqual(config.models["m"].gguf, {})
        self.assertIn("not a regular file", notices_of(config)[0])

    def test_a_fifo_put_in_place_after_the_stat_is_not_waited_on(self) -> None:
        fifo = self.dir / "model.gguf"
        os.mkfifo(fifo)
        # what the reader does once the stat has seen a regular file
        error = unblocked(self, lambda: self.assertRaises(GgufError, _read, str(fifo), 4096), fifo)
        self.assertIn("not a regular file", str(error))

    def test_a_header_that_never_arrives_is_waited_for_once_and_not_by_the_load(self) -> None:
        # a read that never returns, as on a dead NFS mount (which cannot be made here)
        release = threading.Event()
        self.addCleanup(release.set)
        readers: list[threading.Thread] = []

        def hung(path: str) -> None:
            readers.append(threading.current_thread())
            release.wait()

        self.patch(modelsdir, "_facts_of", hung)
        self.patch(modelsdir, "HEADER_WAIT", 0.05)
        path = self.dir / "model.gguf"

        config = self.load(path)
        self.assertEqual(config.models["m"].gguf, {})
        (notice,) = notices_of(config)
        self.assertIn("did not arrive within 0.05s", notice)
        # a reload does not wait for it again, nor start another read of it
        config = self.load(path)
        self.assertIn("still being read", notices_of(config)[0])
        stuck_once_then_released(self, readers, release)
        # the mount has come back: the next load reads it again
        self.patch(modelsdir, "_facts_of", lambda path: None)
        (notice,) = notices_of(self.load(path))  # read again: now simply not there
        self.assertIn("no such file (yet)", notice)

    def test_the_headers_of_many_models_are_read_together_in_one_wait(self) -> None:
        # before: one after the other, each waited for up to HEADER_WAIT, so ten
        # models on a hung mount held the start (or a reload) for 100 s.  Here the
        # first read ends only once the last has begun: read one after the other, it
        # runs out of its wait
        last_begun = threading.Event()
        self.addCleanup(last_begun.set)
        paths = [self.dir / f"m{i}.gguf" for i in range(3)]

        def read(path: str) -> None:
            if path == str(paths[-1]):
                last_begun.set()
            elif path == str(paths[0]):
                last_begun.wait()

        self.patch(modelsdir, "_facts_of", read)
        self.patch(modelsdir, "HEADER_WAIT", 5.0)
        entries = [f"  m{i}:\n    cmd: srv --port ${{PORT}} -m {p}\n" for i, p in enumerate(paths)]
        config = parse_config("models:\n" + "".join(entries))
        # every read ended (the double says "no such file"), none ran out of its wait
        notices = notices_of(config)
        self.assertEqual(len(notices), 3, notices)
        for notice in notices:
            self.assertIn("no such file (yet)", notice)
        self.assertEqual(sorted(config.models), ["m0", "m1", "m2"])

    def test_a_models_folder_on_a_hung_mount_is_waited_for_once_and_left_out(self) -> None:
        hung, fine = self.dir / "nfs", self.dir / "local"
        for where in (hung, fine):
            where.mkdir()
            write_gguf(where / f"{where.name}-model.gguf")
        release, listers = hang_listing_of(self, hung)
        self.patch(modelsdir, "LIST_WAIT", 0.05)

        def load() -> Config:
            return parse_config("{}", "test.yaml", ENVIRON, models_dirs=[str(hung), str(fine)])

        # before: the scandir held the load (a start, a reload's thread) for good
        config = load()
        self.assertEqual(sorted(config.models), ["local-model"])
        self.assertEqual(
            notices_of(config),
            (
                f"{hung}: left out: it was not listed within 0.05s (a hung network mount?); "
                "its models are not served until a reload can list it",
            ),
        )
        # a reload does not wait for it again, nor begin another listing of it
        config = load()
        self.assertEqual(sorted(config.models), ["local-model"])
        (notice,) = notices_of(config)
        self.assertIn(f"{hung}: left out: it is still being listed since an earlier", notice)
        stuck_once_then_released(self, listers, release)
        # the mount has come back: the next load lists it
        config = load()
        self.assertEqual(sorted(config.models), ["local-model", "nfs-model"])
        self.assertEqual(notices_of(config), ())


class OptionsTests(SynchronousTestCase):
    def test_models_dir_alone_or_with_a_config(self) -> None:
        path = folder()
        self.addCleanup(shutil.rmtree, path)
        write_gguf(path / "m.gguf")
        options = Options()
        options.parseOptions(["--models-dir", str(path)])
        self.assertEqual(list(options["config_obj"].models), ["m"])
        config = path / "c.yaml"
        config.write_text("models:\n  other:\n    cmd: srv --port ${PORT}\n")
        options = Options()
        options.parseOptions(["--config", str(config), "--models-dir", str(path)])
        self.assertEqual(sorted(options["config_obj"].models), ["m", "other"])
        self.assertIn("--models-dir", str(Options()))


class LiveFolderTests(SynchronousTestCase):
    """--watch-config notices a file added, grown or removed."""

    def watching(
        self, path: Path, clock: Clock, folders: Callable[[], list[str]], **kwargs: Any
    ) -> list[int]:
        """A running folder watch on ``path``; the reloads it asks for are counted."""
        reloads: list[int] = []
        reloader = FolderReloader(
            folders,
            None,
            lambda config: {},
            clock,
            lambda: load_config(None, (), [str(path)]),
            watch=True,
            on_signal=False,
            **kwargs,
        )
        reloader.reload = lambda: reloads.append(1)  # type: ignore[assignment,method-assign,return-value]
        reloader.startService()
        self.addCleanup(reloader.stopService)
        return reloads

    def test_the_reload_line_names_only_what_there_is(self) -> None:
        def reloader(path: str | None, folders: list[str]) -> FolderReloader:
            return FolderReloader(
                lambda: folders, path, lambda config: {}, Clock(), lambda: load_config(None)
            )

        self.assertEqual(reloader("c.yaml", []).described(), "c.yaml")  # no "(models folders )"
        self.assertEqual(reloader("c.yaml", ["/m"]).described(), "c.yaml (models folders /m)")
        self.assertEqual(reloader(None, ["/m"]).described(), "models folders /m")

    def test_a_change_in_the_folder_triggers_a_reload(self) -> None:
        path = folder()
        self.addCleanup(shutil.rmtree, path)
        clock = Clock()
        reloads = self.watching(path, clock, lambda: [str(path)])

        def polls() -> int:
            before = len(reloads)
            for _ in range(3):  # a change may have to hold still for a poll before it counts
                clock.advance(2)
            return len(reloads) - before

        self.assertEqual(polls(), 0)
        write_gguf(path / "new.gguf")
        with capturedLogs() as events:
            self.assertEqual(polls(), 1)
        said = [formatEvent(e) for e in events]
        self.assertIn(f"models folders {path} changed: reloading", said)  # not "None"
        with open(path / "new.gguf", "ab") as grown:
            grown.write(b"\0" * 32)
        self.assertEqual(polls(), 1)
        (path / "sub").mkdir()
        write_gguf(path / "sub" / "m.gguf")
        self.assertEqual(polls(), 1)
        (path / "notes.txt").write_text("not a model")
        self.assertEqual(polls(), 0)
        os.remove(path / "new.gguf")
        self.assertEqual(polls(), 1)

    def test_a_folder_on_a_hung_mount_holds_one_look_and_reloads_when_it_answers(
        self,
    ) -> None:
        self.held_once_then_reloaded(lambda path: hang_listing_of(self, path))

    def test_a_file_whose_stat_hangs_holds_one_look_and_reloads_when_it_answers(
        self,
    ) -> None:
        # listed, then its mount dies before the stat: the watch's look (a pool
        # thread, the reloads it holds behind it) waited for good
        self.held_once_then_reloaded(lambda path: hang_stat_of(self, path / "m.gguf"))

    def held_once_then_reloaded(
        self, hang: Callable[[Path], tuple[threading.Event, list[threading.Thread]]]
    ) -> None:
        """A watch of a folder with a model, made to hang by ``hang`` (which gives
        its release and the threads stuck): one look waits, once; the reload comes
        when the mount answers."""
        path = folder()
        self.addCleanup(shutil.rmtree, path)
        write_gguf(path / "m.gguf")
        release, stuck = hang(path)
        self.patch(modelsdir, "LIST_WAIT", 0.05)
        clock = Clock()
        reloads = self.watching(path, clock, lambda: [str(path)])  # the first look: 0.05 s
        for _ in range(3):  # each poll (every 2 s of the reactor's time) fails at once
            clock.advance(2)
        self.assertEqual(reloads, [])
        stuck_once_then_released(self, stuck, release)  # then the mount answers
        for _ in range(2):
            clock.advance(2)
        self.assertEqual(reloads, [1])

    def test_the_folder_is_looked_at_off_the_reactor(self) -> None:
        # a stat per file: 20,000 files held the reactor 0.1 s every poll (/health
        # waited), a network share far longer
        path = folder()
        self.addCleanup(shutil.rmtree, path)
        clock = Clock()
        looked_at: list[int] = []
        pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

        def in_thread(work: Callable[[], Any]) -> Deferred[Any]:
            pending.append((work, Deferred()))
            return pending[-1][1]

        def folders() -> list[str]:
            looked_at.append(1)
            return [str(path)]

        reloads = self.watching(path, clock, folders, disk=in_thread)
        looked_at.clear()  # the first look, before the reactor runs
        write_gguf(path / "new.gguf")
        for _ in range(3):
            clock.advance(2)
        self.assertEqual((looked_at, len(pending)), ([], 1))  # one poll at a time
        for _ in range(2):  # the thread's answers: the change, then the same again
            work, done = pending.pop()
            done.callback(work())
            clock.advance(2)
        self.assertEqual(reloads, [1])


# --- end to end: twistd on a folder, the real model and llama-server ------------------

REAL = bool(os.environ.get("LLAMA_SERVER") and os.environ.get("LLAMASWAP_MODEL"))
if not REAL and os.environ.get("CI"):
    raise RuntimeError("CI must run the end-to-end tests: LLAMA_SERVER/LLAMASWAP_MODEL unset")
real = pytest.mark.skipif(not REAL, reason="LLAMA_SERVER and LLAMASWAP_MODEL are not set")


def until(check: Callable[[], Any], what: str, seconds: float = 30.0) -> Any:
    """Poll a real process's observable state, bounded."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"never happened within {seconds}s: {what}")


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """A folder with the real model, a tiny file of our own and a broken one."""
    root = tmp_path / "models"
    root.mkdir()
    os.symlink(os.environ["LLAMASWAP_MODEL"], root / "smollm2.gguf")
    write_gguf(root / "tiny.gguf")
    (root / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    return root


@pytest.fixture
def daemon(models: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """``twistd -n llamaswap --models-dir DIR``, no configuration file."""
    port = free_port()
    log = tmp_path / "twistd.log"
    env = daemon_env(OMP_WAIT_POLICY="passive")
    with open(log, "w") as output:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "llamaswap", "--models-dir", str(models),
             "--listen", f"tcp:{port}:interface=127.0.0.1"],
            env=env, stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    try:
        yield process, f"http://127.0.0.1:{port}", log
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


@real
def test_a_folder_alone_serves_its_models_and_stays_live(
    daemon: tuple[subprocess.Popen[bytes], str, Path], models: Path
) -> None:
    process, base, log = daemon
    http = httpx.Client(base_url=base, timeout=60)

    def up() -> bool:
        try:
            return http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    until(up, "llamaswap answers /health", 60)
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert sorted(listed) == ["smollm2", "tiny"]
    smollm2 = listed["smollm2"]
    assert smollm2["capabilities"] == ["chat"]
    facts = smollm2["meta"]["gguf"]
    assert (facts["architecture"], facts["quantization"]) == ("llama", "Q4_1")
    assert facts["context_length"] == 8192 and facts["block_count"] == 30
    assert 130_000_000 < facts["parameters"] < 140_000_000
    text = log.read_text()
    assert text.count("broken.gguf: skipped:") == 1, text

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a fruit."}],
        max_tokens=8,
    )
    assert answer.choices[0].message.content
    assert answer.model == "smollm2"  # the default command gives the child the id

    # the estimate against what the child really uses (sampled every 5 s)
    def measured() -> dict[str, Any] | None:
        for row in http.get("/running").json()["running"]:
            if row["model"] == "smollm2" and row["memory"]["peak"].get("ram"):
                return dict(row)
        return None

    row = until(measured, "smollm2's memory was measured", 30)
    estimate = facts["estimate"]["total"]
    peak = row["memory"]["peak"]["ram"]
    assert row["memory"]["declared"] == {"ram": estimate}
    print(f"\nsmollm2 (ctx {facts['estimate']['context']}): estimate {estimate / 2**20:.1f} MiB, "
          f"measured {peak / 2**20:.1f} MiB ({(estimate - peak) / peak:+.1%})")  # fmt: skip
    assert 0.85 < estimate / peak < 1.25

    # the folder is live: one file removed (the running model), one added, SIGHUP
    pid = row["pid"]
    os.remove(models / "smollm2.gguf")
    write_gguf(models / "later.gguf")
    process.send_signal(signal.SIGHUP)
    until(
        lambda: sorted(m["id"] for m in http.get("/v1/models").json()["data"]) == ["later", "tiny"],
        "the rescan took the change",
    )
    until(lambda: not pid_alive(pid), "the removed model's server stopped")
    gone = http.post(
        "/v1/chat/completions",
        json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert gone.status_code == 404
