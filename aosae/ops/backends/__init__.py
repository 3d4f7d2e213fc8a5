"""Backend registry and the `auto` policy.

A backend is a module in this package with three functions:

    available() -> (bool, reason)        can it run at all in this install?
    supports(a) -> (bool, reason)        can it run on this tensor (device, dtype)?
    forward(a, k, cosine, threshold) -> (values[k], rows[k], cols[k])

`threshold` is an optional hint (a score believed to be at most the k-th best, e.g. the
previous training step's k-th score); a backend may use it to skip work but must return
the exact result whatever the hint.
"""
from __future__ import annotations

import importlib
import os

import torch

NAMES = ("reference", "cpu", "sparse", "triton")
ENV_VAR = "AOSAE_BACKEND"


def check_name(name, option: str = "backend") -> None:
    """A backend setting, refused where it is given (a module's constructor), not at its first call."""
    if not isinstance(name, str) or name not in ("auto", *NAMES):
        raise ValueError(f"{option} {name!r} is not a gram_topk backend: choose one of {', '.join(('auto',) + NAMES)}")


def get(name: str):
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(('auto',) + NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def usable(name: str, a: torch.Tensor | None = None) -> tuple[bool, str]:
    """Whether backend `name` can run (on `a`, if given), and why not."""
    try:
        backend = get(name)
    except ImportError as err:  # a backend module that is not shipped in this build
        return False, f"backend {name!r} is not installed ({err})"
    ok, why = backend.available()
    if ok and a is not None:
        ok, why = backend.supports(a)
    return ok, why


def resolve(name: str, a: torch.Tensor) -> str:
    """Turns 'auto' (or $AOSAE_BACKEND) into a concrete backend that can run on `a`.

    An explicitly named backend that cannot run raises a ValueError that says why.
    """
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto").strip() or "auto"
    if name != "auto":
        ok, why = usable(name, a)
        if not ok:
            raise ValueError(f"gram_topk backend {name!r} cannot run here: {why}")
        return name
    for candidate in auto_order(a):
        if usable(candidate, a)[0]:
            return candidate
    return "reference"


def auto_order(a: torch.Tensor) -> list[str]:
    """Preference order for `auto`: the sparse path when the cost model says so, then the
    fused dense kernel of the device, then the reference."""
    order = []
    try:
        sparse = get("sparse")
        if sparse.available()[0] and sparse.prefers(a):
            order.append("sparse")
    except (ImportError, AttributeError):
        pass
    order.append("triton" if a.device.type == "cuda" else "cpu")
    return order
