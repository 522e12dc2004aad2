"""The twistd plugin and its command line, including what twistd itself prints."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.tap import DEFAULT_LISTEN, Options

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


class OptionsTests(SynchronousTestCase):
    def config_file(self, text: str) -> str:
        path = str(self.mktemp())
        Path(path).write_text(text)
        return path

    def test_plugin_is_found(self) -> None:
        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "llamaswap"]
        self.assertEqual(len(makers), 1)
        self.assertIsInstance(makers[0].options(), Options)

    def test_defaults_and_repeatable_listen(self) -> None:
        path = self.config_file("models:\n  m:\n    cmd: s --port ${PORT}\n")
        options = Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        self.assertEqual(list(options["config_obj"].models), ["m"])
        options = Options()
        options.parseOptions(
            ["--config", path, "--listen", "tcp:9000", "--listen", "unix:/tmp/llamaswap.sock"]
        )
        self.assertEqual(options["listen"], ["tcp:9000", "unix:/tmp/llamaswap.sock"])

    def test_config_is_required_and_validated(self) -> None:
        self.assertIn(
            "--config FILE is required",
            str(self.assertRaises(UsageError, Options().parseOptions, [])),
        )
        path = self.config_file("models:\n  m:\n    cmd: s --port ${PORT}\n    ttl: forever\n")
        error = self.assertRaises(UsageError, Options().parseOptions, ["--config", path])
        self.assertIn(f"{path}: models.m.ttl: expected a number, got str 'forever'", str(error))

    def test_help_mentions_the_options(self) -> None:
        text = str(Options())
        self.assertIn("--config", text)
        self.assertIn("--listen", text)


class TwistdTests(TestCase):
    """Run the real ``twistd`` the way users do."""

    timeout = 60

    async def run_twistd(self, *args: str) -> tuple[int, str]:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "llamaswap", *args], env=env, reactor=reactor
        )
        return code, (out + err).decode()

    async def test_a_port_in_use_stops_startup_with_a_clear_message(self) -> None:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        code, output = await self.run_twistd(
            "--config",
            str(ROOT / "config.example.yaml"),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        )
        self.assertNotEqual(code, 0)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", output)
        self.assertIn("Address already in use", output)
        self.assertNotIn("Traceback", output)

    async def test_an_invalid_config_exits_non_zero_naming_the_key(self) -> None:
        path = self.mktemp()
        Path(path).write_text("models:\n  m:\n    cmd: s --port ${PORT}\n    aliasses: [x]\n")
        code, output = await self.run_twistd("--config", path)
        self.assertNotEqual(code, 0)
        self.assertIn("models.m.aliasses: unknown key (did you mean 'aliases'?)", output)
