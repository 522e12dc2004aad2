"""One llamaswap per state directory: the activity store's and the KV store's.

Locks in one process (flock locks belong to an open file description, so two
holders here conflict as two daemons do), a holder killed with SIGKILL, a reload
through the real reloader, and a real second ``twistd -n llamaswap``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import Config, parse_config
from llamaswap.reload import ConfigReloader
from llamaswap.statelock import (
    LOCK_FILE,
    LockFileRefused,
    StateHeld,
    StateLocks,
    state_dirs,
)
from llamaswap.tap import LlamaswapService, Options, makeService

from .daemon import TWISTD, daemon_env, free_port
from .integration import FAKE, LiveTestCase, pid_alive


def config_yaml(store: str, kv: str) -> str:
    return (
        f"store: {{path: '{store}'}}\n"
        f"kvCache: {{path: '{kv}'}}\n"
        "models:\n"
        f"  a:\n    cmd: {FAKE}\n    kvCache: true\n"
    )


def config_of(store: str, kv: str) -> Config:
    return parse_config(config_yaml(store, kv), "test.yaml")


def lock_and_release(config: Config) -> None:
    """Raises StateHeld if another holder has one of ``config``'s directories."""
    locks = StateLocks()
    locks.take(config)
    locks.release_all()


class InOneProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.config = config_of(
            str(self.root / "state" / "activity.sqlite3"), str(self.root / "kv")
        )

    def test_a_second_holder_is_refused_naming_the_path_the_pid_and_the_setting(self) -> None:
        first, second = StateLocks(), StateLocks()
        first.take(self.config)
        self.addCleanup(first.release_all)
        error = self.assertRaises(StateHeld, second.take, self.config)
        self.assertIn(str(self.root / "state"), str(error))
        self.assertIn(f"pid {os.getpid()}", str(error))
        self.assertIn("store.path", str(error))
        self.assertEqual(second.directories, [])  # nothing half-taken
        first.release_all()
        second.take(self.config)  # released: free for the next one
        second.release_all()

    def test_the_kv_directory_is_locked_on_its_own(self) -> None:
        first = StateLocks()
        first.take(config_of(":memory:", str(self.root / "kv")))
        self.addCleanup(first.release_all)
        error = self.assertRaises(StateHeld, lock_and_release, self.config)
        self.assertIn(str(self.root / "kv"), str(error))
        self.assertIn("kvCache.path", str(error))

    def test_in_memory_and_without_kv_models_nothing_is_locked(self) -> None:
        config = parse_config(
            "store: {path: ':memory:'}\nmodels:\n  a:\n    cmd: sleep --port ${PORT}\n", "test.yaml"
        )
        self.assertEqual(state_dirs(config), [])

    def test_one_directory_for_both_is_locked_once(self) -> None:
        locks = StateLocks()
        locks.take(config_of(str(self.root / "activity.sqlite3"), str(self.root)))
        self.addCleanup(locks.release_all)
        self.assertEqual(locks.directories, [str(self.root)])

    def test_one_directory_named_through_a_symlink_is_locked_once(self) -> None:
        # before: store.path under /srv/llamaswap, a symlink to kvCache.path's
        # /data/llamaswap: the daemon refused to start, "in use by" its own pid
        (self.root / "data").mkdir(parents=True)
        (self.root / "srv").symlink_to(self.root / "data")
        locks = StateLocks()
        locks.take(
            config_of(str(self.root / "srv" / "activity.sqlite3"), str(self.root / "data")),
            pin_store=True,
        )
        self.addCleanup(locks.release_all)
        self.assertEqual(locks.directories, [str(self.root / "data")])
        locks.take(config_of(str(self.root / "data" / "a.sqlite3"), str(self.root / "srv")))
        self.assertEqual(locks.directories, [str(self.root / "data")])

    def test_a_lock_file_planted_as_a_symlink_is_not_followed(self) -> None:
        # store.path in a shared directory: another user plants llamaswap.lock as a
        # symlink to a file of ours; taking the lock truncated it to our pid
        state = self.root / "state"
        state.mkdir(parents=True)
        victim = self.root / "victim.txt"
        victim.write_text("precious\n")
        (state / LOCK_FILE).symlink_to(victim)
        locks = StateLocks()
        error = self.assertRaises(LockFileRefused, locks.take, self.config)
        self.assertIn(str(state / LOCK_FILE), str(error))
        self.assertIn("store.path", str(error))
        self.assertEqual(victim.read_text(), "precious\n")
        self.assertEqual(locks.directories, [])

    def test_a_lock_file_that_is_no_regular_file_is_refused_not_ignored(self) -> None:
        # before: a folder in its place was "not locking" and two daemons shared the
        # state; a FIFO was taken as the lock file
        state = self.root / "state"
        state.mkdir(parents=True)
        lock_file = state / LOCK_FILE
        lock_file.mkdir()
        error = self.assertRaises(LockFileRefused, lock_and_release, self.config)
        self.assertIn("not a regular file", str(error))
        lock_file.rmdir()
        os.mkfifo(lock_file)
        error = self.assertRaises(LockFileRefused, lock_and_release, self.config)
        self.assertIn("not a regular file", str(error))
        short = Path(tempfile.mkdtemp())  # a socket's path is at most 107 bytes
        self.addCleanup(shutil.rmtree, short)
        listening = socket.socket(socket.AF_UNIX)  # open() fails: ENXIO
        self.addCleanup(listening.close)
        listening.bind(str(short / LOCK_FILE))
        config = config_of(str(short / "activity.sqlite3"), str(self.root / "kv"))
        error = self.assertRaises(LockFileRefused, lock_and_release, config)
        self.assertIn("not a regular file", str(error))

    def test_a_lock_file_hard_linked_to_another_file_is_refused(self) -> None:
        state = self.root / "state"
        state.mkdir(parents=True)
        victim = self.root / "victim.txt"
        victim.write_text("precious\n")
        os.link(victim, state / LOCK_FILE)
        self.assertRaises(LockFileRefused, lock_and_release, self.config)
        self.assertEqual(victim.read_text(), "precious\n")

    def test_the_lock_of_a_killed_holder_is_free_and_its_file_is_taken_over(self) -> None:
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys\n"
                "from llamaswap.config import parse_config\n"
                "from llamaswap.statelock import StateLocks\n"
                "StateLocks().take(parse_config(sys.stdin.read(), 'held.yaml'))\n"
                "print('held', flush=True)\n"
                "sys.stdin.close()\n"
                "import time; time.sleep(60)\n",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(
            config_yaml(str(self.root / "state" / "a.sqlite3"), str(self.root / "kv"))
        )
        holder.stdin.close()
        self.assertEqual(holder.stdout.readline(), "held\n")
        locks = StateLocks()
        error = self.assertRaises(StateHeld, locks.take, self.config)
        self.assertIn(f"pid {holder.pid}", str(error))
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        lock_file = self.root / "state" / LOCK_FILE
        self.assertEqual(lock_file.read_text(), f"{holder.pid}\n")  # left behind
        locks.take(self.config)
        self.addCleanup(locks.release_all)
        self.assertEqual(lock_file.read_text(), f"{os.getpid()}\n")


class ReloadTests(LiveTestCase):
    async def test_a_reload_to_a_held_directory_is_refused_and_one_moving_away_releases(
        self,
    ) -> None:
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        store = str(root / "state" / "activity.sqlite3")
        path = root / "config.yaml"
        path.write_text(config_yaml(store, str(root / "kv")))
        other = StateLocks()  # another llamaswap's
        other.take(config_of(":memory:", str(root / "theirs")))
        self.addCleanup(other.release_all)
        options = Options()
        options.parseOptions(["--config", str(path), "--listen", "tcp:0:interface=127.0.0.1"])
        service = makeService(options, reactor)
        assert isinstance(service, LlamaswapService)
        service.startService()
        stopping = False

        async def stop() -> None:
            if not stopping:
                await service.stopService()

        self.addCleanup(stop)
        [reloader] = [s for s in service if isinstance(s, ConfigReloader)]

        path.write_text(config_yaml(store, str(root / "theirs")))
        with capturedLogs() as events:
            self.assertFalse(await reloader.reload())
        refusals = [formatEvent(e) for e in events if e.get("log_level") is LogLevel.error]
        self.assertEqual(len(refusals), 1, refusals)
        self.assertIn(f"{root / 'theirs'} is in use by another llamaswap", refusals[0])
        self.assertIn("kvCache.path", refusals[0])
        self.assertEqual(service.live.current.kv_cache.path, str(root / "kv"))

        path.write_text(config_yaml(store, str(root / "mine")))
        self.assertTrue(await reloader.reload())
        lock_and_release(config_of(":memory:", str(root / "kv")))  # released: no raise
        self.assertRaises(StateHeld, lock_and_release, config_of(":memory:", str(root / "mine")))
        # the store keeps its file until a restart: its directory stays locked
        self.assertRaises(StateHeld, lock_and_release, config_of(store, str(root / "x")))

        stopping = True
        await service.stopService()
        lock_and_release(config_of(store, str(root / "mine")))  # shutdown released both

    async def test_a_reload_that_ends_after_the_shutdown_takes_no_lock(self) -> None:
        # before: the file read in a thread finished after stopService, the new
        # configuration was applied to the stopped service and its directories were
        # locked again, for good (release_all had run)
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        store = str(root / "state" / "activity.sqlite3")
        path = root / "config.yaml"
        path.write_text(config_yaml(store, str(root / "kv")))
        options = Options()
        options.parseOptions(["--config", str(path), "--listen", "tcp:0:interface=127.0.0.1"])
        service = makeService(options, reactor)
        assert isinstance(service, LlamaswapService)
        service.startService()
        [reloader] = [s for s in service if isinstance(s, ConfigReloader)]
        path.write_text(config_yaml(store, str(root / "mine")))
        reloading = reloader.reload()  # reads the file in a thread
        await service.stopService()
        self.assertFalse(await reloading)
        self.assertEqual(service.live.current.kv_cache.path, str(root / "kv"))
        lock_and_release(config_of(store, str(root / "mine")))  # nothing held
        lock_and_release(config_of(store, str(root / "kv")))


class SecondDaemonTests(LiveTestCase):
    timeout = 90

    async def test_a_second_twistd_is_refused_while_the_first_runs_and_starts_after_a_kill(
        self,
    ) -> None:
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        config = root / "config.yaml"
        config.write_text(config_yaml(str(root / "state" / "activity.sqlite3"), str(root / "kv")))
        first, _ = await self.daemon(config)
        listen = f"tcp:{free_port()}:interface=127.0.0.1"
        out, err, code = await getProcessOutputAndValue(
            TWISTD,
            ["-n", "--pidfile=", "llamaswap", "--config", str(config), "--listen", listen],
            env=daemon_env(),
            reactor=reactor,
        )
        lines = (out + err).decode().strip().splitlines()
        self.assertEqual(code, 1, lines)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(str(root / "state"), lines[0])
        self.assertIn(f"pid {first.pid}", lines[0])
        self.assertIn("store.path", lines[0])
        self.assertEqual((await self.request("GET", "/health")).code, 200)  # unharmed

        # killed: its lock files stay, its locks are gone with it
        first.send_signal(signal.SIGKILL)
        first.wait()
        self.assertFalse(pid_alive(first.pid))
        second, _ = await self.daemon(config)
        self.assertEqual((await self.request("GET", "/health")).code, 200)
        self.assertEqual((root / "kv" / "llamaswap.lock").read_text(), f"{second.pid}\n")
