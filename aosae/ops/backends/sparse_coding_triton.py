"""Host side of the sparse SAE step's two primitives on GPU, around aosae.kernels.sparse_coding.

    segment_gather_sum(offsets, gather_idx, weights, table) -> [S, d] fp32
        out[s] = Σ_{e in [offsets[s], offsets[s+1])} weights[e] · table[gather_idx[e]]
    gathered_dot(rows_a, rows_b, A, B) -> [nnz] fp32
        out[e] = <A[rows_a[e]], B[rows_b[e]]>

Tables may be float32, bfloat16 or float16; weights any of the three. Everything is accumulated
in fp32 and **returned in fp32** whatever the table's dtype (the caller casts: W gradients stay
fp32 for the optimiser, a bf16 decode casts once). Deterministic: each output element is summed
by one program in a fixed order. No host sync, so neither the rows nor the offsets are
bounds-checked (that would sync): out-of-range rows, or offsets[-1] ≠ nnz, are the caller's bug,
as with torch's own gathers.

Runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1 when AOSAE_SPARSE_TRITON=1 asks for it
(the convention of sparse_triton: dry runs and tests of the GPU path). Imports Triton only when
called: check `usable(t)` first.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from aosae.machine import triton_interpreting

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FORCE_ENV = "AOSAE_SPARSE_TRITON"
# (BLOCK_S segments, BLOCK_D, num_warps) of segment_gather_sum and (BLOCK_E entries, BLOCK_D,
# num_warps) of gathered_dot on GPU: a 32 × 128 fp32 tile is 16 values per thread at 8 warps, a
# 256/512-byte row slice per gathered row (bf16/fp32); benchmarks/kernel_resources.py compiles
# these for sm_90 (registers, spills). The segment sum's 8 warps are not measured on a GPU yet.
SEGMENT_CONFIG = (32, 128, 8)
DOT_CONFIG = (16, 128, 4)
# under the interpreter (~10 ms a program on a loaded 2-core machine): tiles small enough that dry runs
# cover several of them, few enough programs to finish; the tests set (4, 8, 1)
INTERPRETER_CONFIG = (16, 32, 1)


def usable(t: torch.Tensor) -> bool:
    """Whether these kernels run on tensors like t (the table): float16/bfloat16/float32 on CUDA
    with Triton installed, or on CPU under TRITON_INTERPRET=1 with AOSAE_SPARSE_TRITON=1."""
    if t.dtype not in DTYPES or importlib.util.find_spec("triton") is None:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and triton_interpreting() and os.environ.get(FORCE_ENV, "0") == "1"


def segment_gather_sum(offsets: torch.Tensor, gather_idx: torch.Tensor, weights: torch.Tensor,
                       table: torch.Tensor, *, longest_first: bool = True) -> torch.Tensor:
    """out[s] = Σ_{e in segment s} weights[e] · table[gather_idx[e]], fp32 [S, d].

    offsets [S+1] integer CSR row pointers (offsets[0] = 0, non-decreasing, offsets[S] = nnz;
    empty segments allowed), gather_idx [nnz] integer rows of table (repeats allowed), weights
    [nnz] float, table [R, d] float (rows are read in place when its columns are contiguous; a
    transposed view such as W_enc.t() is copied first: a strided gather would read a 32-byte sector
    per element, 8× the bytes of the copy at the widths trained). longest_first: group segments of
    like length in a program (one argsort of the S lengths), which takes as many steps as its
    longest segment; for ragged segments (the W gradients, where a latent may fire on most of the
    batch beside thousands that fire once). The result is the same either way, bit for bit."""
    _check_index("offsets", offsets, table)
    _check_index("gather_idx", gather_idx, table)
    _check_float("weights", weights, table)
    _check_table("table", table)
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be 1-D [S+1] CSR row pointers, got shape {tuple(offsets.shape)}")
    if gather_idx.dim() != 1 or weights.shape != gather_idx.shape:
        raise ValueError(f"gather_idx and weights must be 1-D of the same length [nnz], got "
                         f"{tuple(gather_idx.shape)} and {tuple(weights.shape)}")
    with _on_device(table):
        return _segment_gather_sum(offsets, gather_idx, weights, table, longest_first)


def _segment_gather_sum(offsets, gather_idx, weights, table, longest_first):
    from aosae.kernels import sparse_coding as kern  # Triton: imported only when used

    S, d = offsets.numel() - 1, table.shape[1]
    out = torch.empty(S, d, dtype=torch.float32, device=table.device)
    if S == 0 or d == 0:
        return out
    block_s, block_d, warps = _config(SEGMENT_CONFIG)
    offsets, gather_idx = offsets.long().contiguous(), gather_idx.long().contiguous()
    order = None
    if longest_first:
        order = torch.argsort(offsets[1:] - offsets[:-1], descending=True, stable=True)
    table = _interpretable(_rows_contiguous(table))
    kern._segment_gather_sum_kernel[(_cdiv(S, block_s), _cdiv(d, block_d))](
        offsets, gather_idx, _interpretable(weights.contiguous()), table, offsets if order is None else order, out,
        S, d, table.stride(0), out.stride(0),
        ORDERED=order is not None, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def gathered_dot(rows_a: torch.Tensor, rows_b: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """out[e] = <A[rows_a[e]], B[rows_b[e]]>, fp32 [nnz]. rows_a/rows_b [nnz] integer, A [Ra, d]
    and B [Rb, d] float (any mix of float16/bfloat16/float32; a transposed view is copied first, as
    in segment_gather_sum)."""
    _check_index("rows_a", rows_a, A)
    _check_index("rows_b", rows_b, A)
    _check_table("A", A)
    _check_table("B", B)
    if B.device != A.device:
        raise ValueError(f"A and B must be on the same device, got {A.device} and {B.device}")
    if rows_a.dim() != 1 or rows_b.shape != rows_a.shape:
        raise ValueError(f"rows_a and rows_b must be 1-D of the same length [nnz], got "
                         f"{tuple(rows_a.shape)} and {tuple(rows_b.shape)}")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"A and B must have the same width d, got {tuple(A.shape)} and {tuple(B.shape)}")
    with _on_device(A):
        return _gathered_dot(rows_a, rows_b, A, B)


def _gathered_dot(rows_a, rows_b, A, B):
    from aosae.kernels import sparse_coding as kern

    nnz, d = rows_a.numel(), A.shape[1]
    out = torch.empty(nnz, dtype=torch.float32, device=A.device)
    if nnz == 0:
        return out
    if d == 0:
        return out.zero_()
    block_e, block_d, warps = _config(DOT_CONFIG)
    A, B = _interpretable(_rows_contiguous(A)), _interpretable(_rows_contiguous(B))
    kern._gathered_dot_kernel[(_cdiv(nnz, block_e),)](
        rows_a.long().contiguous(), rows_b.long().contiguous(), A, B, out,
        nnz, d, A.stride(0), B.stride(0),
        BLOCK_E=block_e, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def _config(gpu: tuple[int, int, int]) -> tuple[int, int, int]:
    return INTERPRETER_CONFIG if triton_interpreting() else gpu


def _interpretable(t: torch.Tensor) -> torch.Tensor:
    """bf16 is wrong inside Triton's interpreter (DESIGN.md, environment facts): fp32 there. The
    kernels accumulate in fp32 either way, so the result is the same."""
    return t.float() if t.dtype == torch.bfloat16 and triton_interpreting() else t


def _check_index(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {getattr(t, 'dtype', type(t))}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the table is on {like.device}: move it there")


def _check_float(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {getattr(t, 'dtype', type(t))}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the table is on {like.device}: move it there")


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _check_table(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {getattr(t, 'dtype', type(t))}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, d], got shape {tuple(t.shape)}")


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (a tensor on cuda:1, say)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
