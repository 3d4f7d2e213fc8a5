"""Loads the compiled aosae._C extension, remembering why it is missing if it is.

Importing aosae never fails because of the extension: the reference backend works
without it, and the first call that needs it raises one message that says what is
missing and how to build it.
"""
from __future__ import annotations

import functools
import importlib

import torch

BUILD_HINT = (
    "Build it against the torch you run with:\n"
    "    pip install --no-build-isolation -e .      (from a clone of aosae)\n"
    "or use backend='reference'."
)


@functools.lru_cache(maxsize=None)
def load() -> tuple[object | None, str]:
    """Returns (module, "") when aosae._C imports, else (None, reason)."""
    try:
        module = importlib.import_module("aosae._C")
    except ImportError as err:  # missing, or built against another torch (undefined symbols)
        text = str(err)
        if "undefined symbol" in text or "version" in text.lower():
            reason = (
                f"aosae._C was built against a different torch than the one running "
                f"(torch {torch.__version__}): {text}"
            )
        else:
            reason = f"aosae._C is not built ({text})"
        return None, reason
    return module, ""


def available() -> tuple[bool, str]:
    module, reason = load()
    return module is not None, reason


def require() -> object:
    module, reason = load()
    if module is None:
        raise RuntimeError(f"{reason}.\n{BUILD_HINT}")
    return module
