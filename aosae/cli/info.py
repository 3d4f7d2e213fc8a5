"""`aosae info`: versions, the device, and which gram_topk backends are usable (and why not)."""
from __future__ import annotations

import platform

import torch

from aosae import __version__
from aosae.machine import cpu_name
from aosae.ops import backends


def info() -> int:
    """Print versions, the device and which gram_topk backends are usable here (and why not)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"aosae     {__version__}")
    print(f"python    {platform.python_version()}")
    print(f"torch     {torch.__version__}  (threads: {torch.get_num_threads()})")
    print(f"triton    {triton_version}")
    print(f"cpu       {cpu_name()}")
    if torch.cuda.is_available():
        print(f"cuda      {torch.version.cuda}: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
    else:
        print("cuda      not available")
    print("backends:")
    probe = {"cpu": torch.zeros(2, 2)}
    if torch.cuda.is_available():
        probe["cuda"] = torch.zeros(2, 2, device="cuda")
    for name in backends.NAMES:
        lines = []
        for device, t in probe.items():
            ok, why = backends.usable(name, t)
            lines.append(f"{device}: {'yes' if ok else 'no (' + why + ')'}")
        print(f"  {name:<10} " + "; ".join(lines))
    return 0
