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
    S, d, stride_table, stride_out,
    ORDERED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (p, t): segments i in [p·BLOCK_S, (p+1)·BLOCK_S) (segment order[i] with ORDERED),
    columns [t·BLOCK_D, (t+1)·BLOCK_D). Step j adds every segment's j-th entry at once, one
    gathered row per segment, in its own accumulator row: no reduction, and BLOCK_S independent
    gathers in flight. (A program per segment summing its entries as a tile waited on one
    segment's loads at a time: 6.1 ms for the W gradients at n = 65536 on an H200, linear in the
    number of segments, whatever the grid.) Segments ordered longest first make a program's steps
    (its longest segment) close to its segments' lengths."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    live_s = i < S
    s = i
    if ORDERED:
        s = tl.load(order_ptr + i, mask=live_s, other=0)
    start = tl.load(offsets_ptr + s, mask=live_s, other=0)
    length = tl.load(offsets_ptr + s + 1, mask=live_s, other=0) - start
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    start2, length2 = start[:, None], length[:, None]  # [BLOCK_S, 1]: one layout for every load below
    for j in range(0, tl.max(length, axis=0)):
        live = j < length2
        row = tl.load(idx_ptr + start2 + j, mask=live, other=0)
        w = tl.load(w_ptr + start2 + j, mask=live, other=0.0).to(tl.float32)
        tile = tl.load(table_ptr + row * stride_table + cols[None, :], mask=live & in_d[None, :], other=0.0)
        acc += w * tile.to(tl.float32)
    tl.store(out_ptr + s[:, None] * stride_out + cols[None, :], acc, mask=live_s[:, None] & in_d[None, :])


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
