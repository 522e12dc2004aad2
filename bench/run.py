"""The llamaswap benchmark suite: ``make bench`` (or ``python -m bench``).

Runs every comparison side by side, prints the tables and writes
``docs/benchmarks.md``.  See that file for the method.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from . import footprint, kv, proxy, report, streaming, swap, trace
from .common import REPO, VENV_BIN, CpuMonitor, Procs, log, marked_processes, sweep, which
from .profile import make_profiler

SECTIONS = ("proxy", "stream", "swap", "footprint", "trace", "kv")
# trace (mixed traffic, fifo vs collate) takes ~5 min more, kv (conversations across
# swaps, real prefills of 4k tokens) ~6 min: only on request, each its own section
DEFAULT_SECTIONS = ("proxy", "stream", "swap", "footprint")
ON_REQUEST = {"trace": trace, "kv": kv}  # each has TITLE and render(results, machine)
REAL_MODEL = ("stream", "swap", "kv")
LAST = REPO / "bench" / ".last-results.json"


def script_path(name: str, env_name: str) -> str | None:
    """$env_name, or the last line printed by scripts/NAME (cached: instant)."""
    if os.environ.get(env_name):
        return os.environ[env_name]
    try:
        out = subprocess.run(
            ["bash", str(REPO / "scripts" / name)],
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError) as e:
        log(f"scripts/{name} failed: {e}")
        return None
    return out.splitlines()[-1] if out else None


def version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "not available"
    text = (out.stdout + out.stderr).strip()
    for line in text.splitlines():
        if "version" in line.lower() or line.startswith(("wrk ", "py-spy ")):
            return line.strip()
    return text.splitlines()[0] if text else "unknown"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    git = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "llamaswap"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        git = commit + (" + uncommitted changes in llamaswap/" if dirty else "")
    nginx = which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    spy = which("py-spy") or str(VENV_BIN / "py-spy")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": psutil.virtual_memory().total / 2**30,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": importlib.metadata.version("twisted"),
        "klein": importlib.metadata.version("klein"),
        "llamaswap": f"{importlib.metadata.version('llamaswap')} (git {git})",
        "llama_server": version_of([os.environ.get("LLAMA_SERVER", "llama-server"), "--version"]),
        "model": Path(os.environ.get("LLAMASWAP_MODEL", "?")).name,
        "wrk": version_of(["wrk", "-v"]) if which("wrk") else "not installed",
        "nginx": version_of([nginx, "-v"]) if nginx else "not installed",
        "py_spy": version_of([spy, "--version"])
        if os.path.exists(spy) or which("py-spy")
        else "not installed",
        "load_before": os.getloadavg(),
    }


def write_on_request_only(name: str, results: dict[str, Any], no_docs: bool) -> None:
    """Print an on-request section; replace (or append) just that section of the docs."""
    if name not in results:
        log(f"{name} failed: docs left alone")
        return
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(LAST.read_text()) if LAST.exists() else {}
        saved[name] = results[name]
        saved[f"{name}_machine"] = results["machine"]
        LAST.write_text(json.dumps(saved, indent=1, default=str))
    text = ON_REQUEST[name].render(results[name], results["machine"])
    print(text)
    if not no_docs:
        target = REPO / "docs" / "benchmarks.md"
        existing = target.read_text() if target.exists() else "# Benchmarks\n"
        target.write_text(trace.splice(existing, text))
        log(f"wrote the {name} section of {target.relative_to(REPO)}")


def kept_on_request(target: Path, text: str, results: dict[str, Any]) -> str:
    """``text`` with each on-request section it lacks kept from the page as it is.

    The saved results may not hold them (another checkout, a partial run), and a
    full run must not wipe a section that takes minutes to regenerate."""
    existing = target.read_text() if target.exists() else ""
    for name, module in ON_REQUEST.items():
        section = trace.section_of(existing, module.TITLE)
        if name not in results and section is not None and module.TITLE not in text:
            text = trace.splice(text, section)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated subset of {SECTIONS} (default: all but trace)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds (a smoke test, not numbers)"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument(
        "--python-loadgen", action="store_true", help="use bench/loadgen.py, not wrk"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work dir (logs, configs, profiles)"
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument(
        "--render",
        nargs="?",
        const=str(LAST),
        metavar="JSON",
        help=f"run nothing: rewrite the docs from saved results (default {LAST.relative_to(REPO)})",
    )
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        only = args.only.strip()
        if only in ON_REQUEST:  # just that section, in place
            text = ON_REQUEST[only].render(
                saved[only], saved.get(f"{only}_machine") or saved.get("machine")
            )
            if not args.no_docs:
                target = REPO / "docs" / "benchmarks.md"
                target.write_text(trace.splice(target.read_text(), text))
            print(text)
            return 0
        text = report.render(saved)
        if not args.no_docs:
            target = REPO / "docs" / "benchmarks.md"
            target.write_text(kept_on_request(target, text, saved))
        print(text)
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")

    # 500 streams through llamaswap need 1000+ descriptors in it and in us
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, 65536)), hard))

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)

    # on a shared machine, other people's builds and tests steal CPU from the run;
    # as root, raise the run's priority a little (every child inherits it, so the
    # comparisons stay fair).  BENCH_NICE=0 leaves it alone.
    nice = int(os.environ.get("BENCH_NICE", "-5"))
    if nice and os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, nice)

    for script, name in (("llama-server.sh", "LLAMA_SERVER"), ("model.sh", "LLAMASWAP_MODEL")):
        path = script_path(script, name)
        if path is None:
            if set(REAL_MODEL) & set(sections):
                log(f"no {name}: skipping the real-model sections")
            sections = [s for s in sections if s not in REAL_MODEL]
        else:
            os.environ[name] = path

    workdir = Path(tempfile.mkdtemp(prefix="llamaswap-bench-"))
    procs = Procs(workdir)
    monitor = CpuMonitor().start()
    info = machine()
    info["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    info["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    log(f"work dir {workdir}; {info['cpu']}, {info['cores']} cores; load {info['load_before']}")
    profiler = None if args.no_profile else make_profiler(workdir)
    quick = args.quick
    results: dict[str, Any] = {"machine": info, "errors": {}}
    started = time.perf_counter()
    failed = False
    try:
        for section in sections:
            log(f"== {section}")
            t0 = time.perf_counter()
            try:
                if section == "proxy":
                    results["proxy"] = proxy.run(
                        procs,
                        monitor,
                        rounds=1 if quick else 3,
                        duration=1.0 if quick else 3.0,
                        force_python=args.python_loadgen,
                        profile=profiler,
                    )
                elif section == "stream":
                    results["stream"] = streaming.run(procs, monitor, runs=2 if quick else 24)
                elif section == "swap":
                    results["swap"] = swap.run(
                        procs,
                        monitor,
                        swaps=2 if quick else 20,
                        lag_swaps=3 if quick else 20,
                        profile=profiler,
                    )
                elif section == "footprint":
                    results["footprint"] = footprint.run(
                        procs, monitor, clients_count=50 if quick else 500
                    )
                elif section == "trace":
                    results["trace"] = trace.run(procs, monitor, quick=quick)
                elif section == "kv":
                    results["kv"] = kv.run(procs, monitor, quick=quick)
            except Exception as e:  # report it, run the other sections
                failed = True
                log(f"{section} failed: {e!r}")
                traceback.print_exc()
                results["errors"][section] = f"{type(e).__name__}: {e}"
                for proc in list(procs.items):
                    procs.stop(proc)
            results.setdefault("seconds", {})[section] = time.perf_counter() - t0
    finally:
        procs.close()
        monitor.stop()
        time.sleep(0.5)
        leftovers = sweep()
        still = marked_processes()
        results["leftovers"] = leftovers
        results["still_running"] = len(still)
        if leftovers:
            log(f"killed leftover processes: {leftovers}")
    results["total_seconds"] = time.perf_counter() - started
    results["machine"]["load_after"] = os.getloadavg()
    results["quick"] = quick

    if len(sections) == 1 and sections[0] in ON_REQUEST:
        # only that section: keep the other sections' saved results and text
        write_on_request_only(sections[0], results, args.no_docs)
    else:
        for name in set(ON_REQUEST) - set(sections):  # keep the last on-request sections
            with contextlib.suppress(OSError, ValueError, KeyError):
                saved = json.loads(LAST.read_text())
                results[name] = saved[name]
                results[f"{name}_machine"] = saved.get(f"{name}_machine", saved["machine"])
        with contextlib.suppress(OSError):
            LAST.write_text(json.dumps(results, indent=1, default=str))
        text = report.render(results)
        print(text)
        if not args.no_docs:
            target = REPO / "docs" / "benchmarks.md"
            target.write_text(kept_on_request(target, text, results))
            log(f"wrote {target.relative_to(REPO)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.keep or failed:
        log(f"work dir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    log(
        f"done in {results['total_seconds']:.0f} s; "
        f"processes of this run still running: {len(still)}"
    )
    return 1 if failed or still else 0


if __name__ == "__main__":
    sys.exit(main())
