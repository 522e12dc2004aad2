"""Sampling profiles of llamaswap with py-spy (when installed): top self and total time."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import VENV_BIN, log, which

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
RATE = 200


def short(path: str) -> str:
    for anchor in ("site-packages/", "lib/python3.", "/llamaswap/", "/bench/"):
        at = path.find(anchor)
        if at >= 0:
            rest = path[at + len(anchor) :]
            if anchor == "lib/python3.":
                rest = "stdlib/" + rest.split("/", 1)[-1]
            elif anchor in ("/llamaswap/", "/bench/"):
                rest = anchor.strip("/") + "/" + rest
            return rest
    return path.rsplit("/", 1)[-1]


def package(file: str) -> str:
    head = file.split("/", 1)[0]
    if file.startswith("stdlib/"):
        return "stdlib " + file.split("/")[1].removesuffix(".py")
    return head.removesuffix(".py")


def parse(raw: str) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    samples = 0
    idle_threads = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        names = []
        for frame in stack.split(";"):
            m = FRAME.match(frame)
            if m is None:
                names.append((frame, ""))
                continue
            file = short(m["file"])
            names.append((f"{m['func']} ({file})", file))
        if not names:
            continue
        leaf, leaf_file = names[-1]
        if leaf.startswith("Condition.wait") and any("_threadworker" in f for _, f in names):
            idle_threads += count  # an idle thread-pool worker waiting for work
            samples -= count
            continue
        self_time[leaf] += count
        by_package[package(leaf_file) if leaf_file else "?"] += count
        for name in {n for n, _ in names}:
            total_time[name] += count
    return {
        "samples": samples,
        "idle_thread_samples": idle_threads,
        "self": self_time.most_common(15),
        # drop the reactor plumbing that is on (nearly) every stack
        "total": [
            (name, count) for name, count in total_time.most_common(80) if count < 0.8 * samples
        ][:25],
        "packages": by_package.most_common(12),
    }


def make_profiler(workdir: Path) -> Callable[[int, Callable[[], Any], str], dict[str, Any]] | None:
    spy = which("py-spy") or (str(VENV_BIN / "py-spy") if (VENV_BIN / "py-spy").exists() else None)
    if spy is None:
        log("py-spy is not installed; skipping profiles (pip install py-spy)")
        return None

    def profile(pid: int, action: Callable[[], Any], name: str) -> dict[str, Any]:
        out = workdir / f"profile-{name}.txt"
        proc = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw", "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(1.0)  # attach
            start = time.perf_counter()
            action()
            elapsed = time.perf_counter() - start
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        if not out.exists():
            log(f"py-spy failed: {err.decode(errors='replace')[-300:]}")
            return {"error": err.decode(errors="replace")[-300:]}
        result = parse(out.read_text())
        result["seconds"] = elapsed
        result["rate"] = RATE
        result["file"] = str(out)
        return result

    return profile
