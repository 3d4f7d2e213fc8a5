"""What every benchmark row records: the machine, the versions, the date; and peak memory."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

from aosae.machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def machine_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    import aosae

    out["aosae"] = aosae.__version__
    return out


def git_commit() -> str:
    """The checkout's short commit (+dirty with uncommitted changes to tracked files)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def today() -> str:
    return datetime.date.today().isoformat()


def spread(values: list[float], suffix: str = "") -> dict:
    """Median, quartiles, min and max of repeated measurements (never the best alone); keys end in suffix."""
    if not values:
        return {}
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    stats = {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": min(values), "max": max(values)}
    return {key + suffix: value for key, value in stats.items()}


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)


def write_summary(prefix: str, summary: dict, bulky: str) -> None:
    """Stamps a one-row result (threads, machine, versions, date), writes it to
    results/<prefix>-<machine>.json and prints it without its `bulky` per-step key."""
    summary.update(threads=torch.get_num_threads(), machine=machine_name(), versions=versions(), date=today())
    write_rows(RESULTS / f"{prefix}-{slug(machine_name())}.json", [summary])
    print({k: v for k, v in summary.items() if k != bulky})


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_cpu_memory_mib(fn) -> tuple[object, float]:
    """Runs fn() and returns (result, peak resident memory above the level before, MiB).

    Peak = ru_maxrss when the call raised the process's high-water mark, else the
    highest RSS seen by a 1 ms sampler (torch returns large blocks to the OS on free,
    so RSS follows live memory). Run it in a fresh process for clean numbers.
    """
    before = _rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    top = maxrss_after if maxrss_after > maxrss_before else peak[0]
    return result, max(0, top - before) / 2**20
