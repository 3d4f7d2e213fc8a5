"""Helpers shared by the backends: column norms and the final ordering of pairs."""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores accumulate in float32, or float64 for float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def column_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each column of x [m, n] -> [n]; zero columns give 0."""
    return torch.linalg.vector_norm(x, dim=0)


def finalize(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int):
    """Order candidate pairs by |value| desc, then (row, col) asc; keep the best k; drop
    zero scores; pad to k with (0, -1, -1).

    values: [p] fp32/fp64 signed scores; rows, cols: [p] integer indices (row < col).
    Returns contiguous (values[k], rows[k] int64, cols[k] int64) on values' device.
    """
    rows, cols = rows.long(), cols.long()
    keep = values != 0
    values, rows, cols = values[keep], rows[keep], cols[keep]
    if values.numel():
        # two stable sorts = lexicographic order: (row, col) asc, then |value| desc
        n = int(cols.max().item()) + 1
        order = torch.argsort(rows * n + cols, stable=True)
        values, rows, cols = values[order], rows[order], cols[order]
        order = torch.argsort(values.abs(), descending=True, stable=True)[:k]
        values, rows, cols = values[order], rows[order], cols[order]
    return pad_to_k(values, rows, cols, k)


def pad_to_k(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int):
    """Append empty slots (value 0, index -1) up to k entries; contiguous outputs."""
    pad = k - values.numel()
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
        rows = torch.cat([rows, rows.new_full((pad,), -1)])
        cols = torch.cat([cols, cols.new_full((pad,), -1)])
    return values.contiguous(), rows.contiguous(), cols.contiguous()
