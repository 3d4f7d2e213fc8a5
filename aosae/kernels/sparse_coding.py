"""Triton kernels of the sparse SAE step on GPU: the two gathers that replace the dense decoder
product and the dense encoder backward once the latents are (indices, values).

    segment_gather_sum:  out[s] = Σ_{e in [offsets[s], offsets[s+1])} w[e] · table[idx[e]]
        decode (segments = tokens, table = W_dec), W_dec's and W_enc's gradients (segments =
        latents, table = grad_x_hat or x − b_dec), the encoder's input gradient.
    gathered_dot:        out[e] = <A[ra[e]], B[rb[e]]>
        the gradient of the decoder w.r.t. the values (A = grad_x_hat, B = W_dec).

Both are memory-bound (nnz · d gathered elements, a few FLOPs each). Segments are CSR, so each
program owns its output rows and sums its entries in a fixed order: deterministic, no atomics
(the caller groups the entries of a W gradient by latent). Every table load is cast to fp32 and
accumulated in fp32. A program covers one BLOCK_D slice of d, so registers do not grow with d,
and a long segment (a latent that fires on half the batch) is shared by cdiv(d, BLOCK_D)
programs. Offsets, rows and output positions are int64: nnz and S·d may pass 2³¹.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _segment_gather_sum_kernel(
    offsets_ptr, idx_ptr, w_ptr, table_ptr, order_ptr, out_ptr,
    d, stride_table, stride_out,
    ORDERED: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (p, t): segment s = order[p] (p without ORDERED), columns [t·BLOCK_D, (t+1)·BLOCK_D).
    Accumulates BLOCK_E × BLOCK_D products per step and reduces over the entries once at the end."""
    s = tl.program_id(0).to(tl.int64)
    if ORDERED:
        s = tl.load(order_ptr + s)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    start = tl.load(offsets_ptr + s)
    end = tl.load(offsets_ptr + s + 1)
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        live = e < end
        row = tl.load(idx_ptr + e, mask=live, other=0)
        w = tl.load(w_ptr + e, mask=live, other=0.0).to(tl.float32)
        tile = tl.load(table_ptr + row[:, None] * stride_table + cols[None, :],
                       mask=live[:, None] & in_d[None, :], other=0.0)
        acc += w[:, None] * tile.to(tl.float32)
    tl.store(out_ptr + s * stride_out + cols, tl.sum(acc, axis=0), mask=in_d)


@triton.jit
def _gathered_dot_kernel(
    rows_a_ptr, rows_b_ptr, a_ptr, b_ptr, out_ptr,
    nnz, d, stride_a, stride_b,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program p: entries [p·BLOCK_E, (p+1)·BLOCK_E), walking d in BLOCK_D slices; the products
    stay in a BLOCK_E × BLOCK_D accumulator and are reduced over d once at the end."""
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    live = e < nnz
    ra = tl.load(rows_a_ptr + e, mask=live, other=0)
    rb = tl.load(rows_b_ptr + e, mask=live, other=0)
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        m = live[:, None] & (cols < d)[None, :]
        x = tl.load(a_ptr + ra[:, None] * stride_a + cols[None, :], mask=m, other=0.0)
        y = tl.load(b_ptr + rb[:, None] * stride_b + cols[None, :], mask=m, other=0.0)
        acc += x.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + e, tl.sum(acc, axis=1), mask=live)
