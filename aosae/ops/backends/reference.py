"""The naive gram_topk: materialise C = aᵀa, take |C| above the diagonal, topk.

O(n²) memory. It is the oracle every backend is tested against and the baseline
every benchmark reports. Runs on any device and any floating dtype.
"""
from __future__ import annotations

import torch

from aosae.ops.conventions import accumulation_dtype, column_norms, finalize


def available() -> tuple[bool, str]:
    return True, ""


def supports(a: torch.Tensor) -> tuple[bool, str]:
    return True, ""


def forward(a: torch.Tensor, k: int, cosine: bool, threshold: float | None = None):
    """a: [m, n] -> (values[k], rows[k], cols[k]); see aosae.gram_topk for the contract."""
    acc = accumulation_dtype(a.dtype)
    x = a.to(acc)
    n = x.shape[1]
    gram = x.t() @ x  # [n, n]: the matrix the other backends never build
    if cosine:  # scale after the product, so an exactly orthogonal pair stays exactly 0
        inv = column_norms(x).clamp_min(torch.finfo(acc).tiny).reciprocal()
        gram = gram * inv[:, None] * inv[None, :]
    score = gram.abs().triu_(1).flatten()
    top_scores, flat = torch.topk(score, k)
    # torch.topk breaks ties arbitrarily: keep every entry above the k-th score and the
    # smallest (row, col) of those tied with it, so the result is deterministic.
    kth = top_scores[-1]
    if kth > 0:
        above = torch.nonzero(score > kth).flatten()
        tied = torch.nonzero(score == kth).flatten()[: k - above.numel()]
        flat = torch.cat([above, tied])
    else:
        flat = torch.nonzero(score).flatten()
    rows, cols = flat // n, flat % n
    return finalize(gram[rows, cols], rows, cols, k)
