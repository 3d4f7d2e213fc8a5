"""The fused C++ CPU backend (csrc/gram_topk_cpu.cpp): upper-triangle tiles, one BLAS
GEMM each, selection against a rising threshold; memory O(tile² + k), never O(n²)."""
from __future__ import annotations

import torch

from aosae.ops import extension as _extension


def available() -> tuple[bool, str]:
    return _extension.available()


def supports(a: torch.Tensor) -> tuple[bool, str]:
    if a.device.type != "cpu":
        return False, f"the cpu backend runs on CPU tensors, got a tensor on {a.device}; use backend='triton' or 'auto' on GPU"
    return True, ""


def forward(a: torch.Tensor, k: int, cosine: bool, threshold: float | None = None):
    ext = _extension.require()
    return tuple(ext.gram_topk_cpu(a, k, cosine, -1.0 if threshold is None else float(threshold)))
