"""Dense pure-torch oracle of sparse_coding.py: the same results through dense matrices.

Everything is written the obvious way (a dense weight matrix, full products, a dense [B, n]
latents tensor with ordinary autograd), for tests in float64 and as the baseline of benchmarks.
"""
from __future__ import annotations

from typing import Optional

import torch


def segment_gather_sum(offsets, gather_idx, weights, table) -> torch.Tensor:
    """out = M @ table with M [S, R] dense, M[s, gather_idx[e]] += weights[e] for e in segment s."""
    s = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(s), counts)
    m = torch.zeros(s, table.shape[0], dtype=torch.float64)
    m.index_put_((seg, gather_idx.long()), weights.double(), accumulate=True)
    return (m @ table.double()).to(table.dtype)


def gathered_dot(rows_a, rows_b, A, B) -> torch.Tensor:
    """The full product A Bᵀ read at (rows_a, rows_b)."""
    return (A.double() @ B.double().t())[rows_a.long(), rows_b.long()]


def dense_latents(pre: torch.Tensor, activation: str, k: Optional[int] = None, threshold=None) -> torch.Tensor:
    """act(pre) [B, n] as SAELens defines it (differentiable w.r.t. pre)."""
    if activation == "relu":
        return pre.relu()
    if activation == "topk":
        values, idx = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, values.relu())
    if activation == "batchtopk":  # SAELens's BatchTopK: top B·k of relu(pre) over the whole batch
        flat = pre.relu().reshape(-1)
        values, idx = flat.topk(min(k * pre.shape[0], flat.numel()))
        return torch.zeros_like(flat).scatter(-1, idx, values).reshape(pre.shape)
    if activation == "jumprelu":  # SAELens's JumpReLU inference: relu(pre) · (pre > threshold)
        return pre.relu() * (pre > torch.as_tensor(threshold, dtype=pre.dtype))
    raise ValueError(f"unknown activation {activation!r}")


def encode_decode(x, W_enc, b_enc, b_dec, W_dec, activation, k=None, threshold=None):
    """(latents f [B, n], x̂ [B, d]) of the dense SAE, ordinary autograd throughout."""
    pre = (x - b_dec) @ W_enc + b_enc
    f = dense_latents(pre, activation, k, threshold)
    return f, f @ W_dec + b_dec
