"""Memory: what models declare, what they really use, and what the machine allows.

``Footprint`` holds a model's declared needs per resource (``vram``, ``ram``) and
what was measured: resident memory of the child and its children (psutil) and GPU
memory per process (NVML, when a GPU and ``nvidia-ml-py`` are present).  The
learned footprint is the larger of the declaration and the peak measured, so a
wrong declaration corrects itself; a big mismatch is logged once.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.interfaces import IReactorTime

if TYPE_CHECKING:
    import psutil

from .logs import logger
from .periodic import Periodic

RESOURCES = ("vram", "ram")
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """``5GiB``, ``512MB``, ``1.5g`` or a plain number of bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError("a size, like 5GiB or 512MiB")
    if isinstance(value, int | float):
        return int(value)
    match = _SIZE.match(str(value))
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError("a size, like 5GiB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}TiB"


@attrs.define
class Footprint:
    """One model's memory, declared and measured, per resource."""

    declared: dict[str, int] = attrs.field(factory=dict)
    measured: dict[str, int] = attrs.field(factory=dict)
    peak: dict[str, int] = attrs.field(factory=dict)
    warned: bool = False

    def need(self, resource: str) -> int:
        return max(self.declared.get(resource, 0), self.peak.get(resource, 0))

    def observe(self, resource: str, value: int) -> None:
        self.measured[resource] = value
        self.peak[resource] = max(self.peak.get(resource, 0), value)

    def mismatch(self) -> str | None:
        for resource, declared in self.declared.items():
            peak = self.peak.get(resource, 0)
            if peak > declared * 1.25:
                return f"uses {human(peak)} of {resource}, more than the {human(declared)} declared"
        return None


def fits(budget: Mapping[str, int], footprints: Iterable[Footprint]) -> bool:
    """Do these models fit in the budget, for every budgeted resource?"""
    chosen = list(footprints)
    return all(sum(f.need(resource) for f in chosen) <= limit for resource, limit in budget.items())


def _gpu_usage() -> Callable[[], dict[int, int]] | None:
    """pid → GPU bytes through NVML, or None when there is no GPU to ask."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        devices = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        return None

    def usage() -> dict[int, int]:
        used: dict[int, int] = {}
        for device in devices:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(device):
                used[proc.pid] = used.get(proc.pid, 0) + int(proc.usedGpuMemory or 0)
        return used

    return usage


class MemoryMonitor:
    """Samples the memory of every running child now and then (cheap /proc reads)."""

    log = logger()

    def __init__(
        self,
        clock: IReactorTime,
        running: Callable[[], Mapping[str, int]],
        footprints: Callable[[str], Footprint | None],
        interval: float = 5.0,
    ) -> None:
        self.running = running
        self.footprints = footprints
        self.gpu = _gpu_usage()
        # survives any error (EMFILE, NVML hiccups): budgets must not silently fall
        # back to the declared figures
        self.loop = Periodic("memory sampling", self.sample, clock, interval)

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    def sample(self) -> None:
        running = self.running()
        if not running:
            return
        # imported once a model runs: an idle daemon stays ~1 MiB smaller
        import psutil

        gpu = self.gpu() if self.gpu is not None else {}
        for model_id, pid in running.items():
            footprint = self.footprints(model_id)
            if footprint is None:
                continue
            try:
                family = _family(pid)
                rss = sum(_rss(p) for p in family)
                vram = sum(gpu.get(p.pid, 0) for p in family)
            except psutil.Error:
                continue
            footprint.observe("ram", rss)
            if vram:
                footprint.observe("vram", vram)
            problem = footprint.mismatch()
            if problem is not None and not footprint.warned:
                footprint.warned = True
                self.log.warn(
                    "model {model} {problem}: fix its 'memory' in the config "
                    "(llamaswap plans with the measured figure meanwhile)",
                    model=model_id,
                    problem=problem,
                )


def _children_files() -> bool:
    """Does this kernel list each thread's children (``CONFIG_PROC_CHILDREN``)?"""
    pid = os.getpid()
    return os.path.exists(f"/proc/{pid}/task/{pid}/children")


CHILDREN_FILES = _children_files()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from ``/proc/PID/task/TID/children``.

    A few small reads per process of the family, where psutil's
    ``children(recursive=True)`` reads the status of every process on the machine
    (milliseconds on the reactor every sample, more on a busy host).  Like any walk
    of /proc it may miss a process born meanwhile; the next sample sees it.
    """
    found = [pid]
    for current in found:  # grows as children are found
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue  # it exited meanwhile
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as listing:
                    found.extend(int(child) for child in listing.read().split())
            except (OSError, ValueError):
                continue  # that thread ended meanwhile
    return found


def _family(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and its descendants (raises psutil.Error if it is gone)."""
    import psutil

    if not CHILDREN_FILES:
        leader = psutil.Process(pid)
        return [leader, *leader.children(recursive=True)]
    family = [psutil.Process(pid)]
    for member in descendants(pid)[1:]:
        with contextlib.suppress(psutil.Error):
            family.append(psutil.Process(member))
    return family


def _rss(process: Any) -> int:
    import psutil

    try:
        return int(process.memory_info().rss)
    except psutil.Error:
        return 0
