"""The fused Triton backend (aosae/kernels/gram_topk.py): upper-triangle
tiles of C = aᵀa computed with tl.dot and filtered against a threshold in the epilogue,
exact top-k over the candidates. Runs on CUDA tensors, or on CPU tensors through Triton's
interpreter when TRITON_INTERPRET=1 (slow: for tests on tiny inputs).

Triton is imported lazily so that `import aosae` works without it.
"""
from __future__ import annotations

import importlib.util

import torch

from aosae.machine import triton_interpreting

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed; install it with `pip install 'aosae[triton]'` (needs a CUDA GPU)"
    if not (triton_interpreting() or torch.cuda.is_available()):
        return False, "no CUDA GPU is available (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return True, ""


def supports(a: torch.Tensor) -> tuple[bool, str]:
    if a.dtype == torch.float64:
        return False, (
            "the triton backend does not support float64 (its tl.dot path is fp32/fp16/bf16); "
            "use backend='reference' or 'cpu' for float64, or convert with a.float()"
        )
    if a.dtype not in _DTYPES:
        return False, f"the triton backend takes float16, bfloat16 or float32 input, got {a.dtype}"
    if a.device.type == "cuda":
        return True, ""
    if a.device.type == "cpu" and triton_interpreting():
        return True, ""
    return False, (
        f"the triton backend runs on CUDA tensors, got a tensor on {a.device}; move it with a.cuda(), "
        f"use backend='cpu', or set TRITON_INTERPRET=1 to run the kernels through Triton's CPU interpreter"
    )


def forward(a: torch.Tensor, k: int, cosine: bool, threshold: float | None = None):
    """a: [m, n] fp16/bf16/fp32 -> (values[k] fp32, rows[k] int64, cols[k] int64);
    see aosae.gram_topk for the contract. `threshold` (previous k-th score) only saves passes."""
    from aosae.ops.backends.triton_driver import gram_topk_triton

    return gram_topk_triton(a, k, cosine, threshold)
