"""Facts about the machine this runs on, written once: the CPU's name, whether Triton runs
kernels through its CPU interpreter, whether the Hugging Face hub can be reached."""
from __future__ import annotations

import os
import platform
import socket
from pathlib import Path
from urllib.parse import urlparse


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def triton_interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def hub_offline(kind: str = "HUB") -> bool:
    """HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE for kind="DATASETS") is set."""
    names = ("HF_HUB_OFFLINE",) + (("HF_DATASETS_OFFLINE",) if kind == "DATASETS" else ())
    return any(os.environ.get(name, "") not in ("", "0") for name in names)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint ($HF_ENDPOINT) opens within `timeout` s.
    Without one, transformers and datasets retry for ~50 s before failing: callers fail fast instead."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False
