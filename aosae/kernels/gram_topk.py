"""Fused Triton kernels for gram_topk: C = aᵀa tile by tile, filtered in the epilogue.

The n × n Gram matrix never exists. Each program of a 1-D grid owns one tile (bi, bj) of
the upper triangle (bi <= bj), accumulates it with `tl.dot` in fp32 over the m (batch)
dimension, scales it by the inverse column norms in cosine mode, and appends every entry
with i < j and |score| >= threshold to a bounded candidate buffer through one atomic add
per tile. The host side (thresholds, passes, the exact top-k over the candidates) lives in
aosae/ops/backends/triton_driver.py: this module holds only the kernels and their tiling.

"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from aosae.machine import triton_interpreting

# Histogram bins: the top 11 bits of a non-negative fp32 (8 exponent + 3 mantissa bits),
# so a bin spans 12.5% of its value and the bin order is the value order.
HIST_SHIFT = 20
HIST_BINS = 1 << (31 - HIST_SHIFT)


@triton.jit
def _accumulate(acc, ti, tj, CAST_FP32: tl.constexpr, IEEE: tl.constexpr):
    """acc + tiᵀ·tj for tiles ti, tj [BLOCK_K, BLOCK], in fp32."""
    if CAST_FP32:  # the interpreter gets bf16 arithmetic wrong; products are exact in fp32
        ti = ti.to(tl.float32)
        tj = tj.to(tl.float32)
    if IEEE:  # fp32 input and torch's matmul TF32 switch off: match torch.mm precision
        return tl.dot(tl.trans(ti), tj, acc=acc, input_precision="ieee")
    return tl.dot(tl.trans(ti), tj, acc=acc)


@triton.jit
def _tile_result(acc, inv_norm_ptr, offs_i, offs_j, N, COSINE: tl.constexpr):
    """The tile's (scores, |scores|, offs_i, offs_j, valid mask i < j < N), cosine-scaled if asked."""
    if COSINE:
        inv_i = tl.load(inv_norm_ptr + offs_i, mask=offs_i < N, other=0.0)
        inv_j = tl.load(inv_norm_ptr + offs_j, mask=offs_j < N, other=0.0)
        acc = acc * inv_i[:, None] * inv_j[None, :]
    valid = (offs_i[:, None] < offs_j[None, :]) & (offs_j[None, :] < N)
    return acc, tl.abs(acc), offs_i, offs_j, valid


@triton.jit
def _tile_scores(
    a_ptr, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, stride_m, stride_n,
    COSINE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """Scores of this program's tile: (scores [BLOCK, BLOCK] fp32 signed, |scores|,
    row indices [BLOCK], col indices [BLOCK], valid mask (i < j < N))."""
    pid = tl.program_id(0)
    bi = tl.load(tile_bi_ptr + pid)
    bj = tl.load(tile_bj_ptr + pid)
    offs_i = bi * BLOCK + tl.arange(0, BLOCK)
    offs_j = bj * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    # int64 offsets: m * n elements can exceed 2^31 for wide SAEs
    ptr_i = a_ptr + offs_k[:, None].to(tl.int64) * stride_m + offs_i[None, :].to(tl.int64) * stride_n
    ptr_j = a_ptr + offs_k[:, None].to(tl.int64) * stride_m + offs_j[None, :].to(tl.int64) * stride_n
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        if EVEN_M and EVEN_N:
            ti = tl.load(ptr_i)
            tj = tl.load(ptr_j)
        else:
            in_k = (k0 + offs_k) < M
            ti = tl.load(ptr_i, mask=in_k[:, None] & (offs_i < N)[None, :], other=0.0)
            tj = tl.load(ptr_j, mask=in_k[:, None] & (offs_j < N)[None, :], other=0.0)
        acc = _accumulate(acc, ti, tj, CAST_FP32, IEEE)
        ptr_i += BLOCK_K * stride_m
        ptr_j += BLOCK_K * stride_m
    return _tile_result(acc, inv_norm_ptr, offs_i, offs_j, N, COSINE)


@triton.jit
def _tile_scores_tma(
    a_desc, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N,
    COSINE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, CAST_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    """_tile_scores with a's tiles loaded by the TMA unit (Hopper's tensor memory accelerator)
    through a host tensor descriptor of block [BLOCK_K, BLOCK]: no pointer tensors, no masks
    (the unit fills whatever lies outside a with zeros), the loads issued asynchronously."""
    pid = tl.program_id(0)
    bi = tl.load(tile_bi_ptr + pid)
    bj = tl.load(tile_bj_ptr + pid)
    offs_i = bi * BLOCK + tl.arange(0, BLOCK)
    offs_j = bj * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        ti = a_desc.load([k0, bi * BLOCK])
        tj = a_desc.load([k0, bj * BLOCK])
        acc = _accumulate(acc, ti, tj, CAST_FP32, IEEE)
    return _tile_result(acc, inv_norm_ptr, offs_i, offs_j, N, COSINE)


@triton.jit
def _append_candidates(
    acc, score, offs_i, offs_j, valid, threshold, val_ptr, row_ptr, col_ptr, counter_ptr, capacity,
    BLOCK: tl.constexpr,
):
    """Appends (C_ij, i, j) for the valid entries with |C_ij| >= threshold, C_ij != 0 to the
    buffers; counter counts every such entry, also those that did not fit (pos >= capacity)."""
    keep = valid & (score >= threshold) & (score > 0.0)
    keep_i = keep.to(tl.int32)
    row_count = tl.sum(keep_i, axis=1)
    total = tl.sum(row_count, axis=0)
    if total > 0:
        # one atomic per tile reserves a contiguous range; positions inside it by a 2-D
        # prefix sum (row offsets, then within rows), which keeps the accumulator layout
        base = tl.atomic_add(counter_ptr, total.to(tl.int64))
        row_offset = tl.cumsum(row_count, axis=0) - row_count
        # int32 offsets relative to the scalar int64 base keep the register count down
        rel = row_offset[:, None] + tl.cumsum(keep_i, axis=1) - 1
        room = tl.maximum(tl.minimum(capacity - base, BLOCK * BLOCK), 0).to(tl.int32)
        store = keep & (rel < room)
        zero = tl.zeros((BLOCK, BLOCK), dtype=tl.int32)
        tl.store(val_ptr + base + rel, acc, mask=store)
        tl.store(row_ptr + base + rel, offs_i[:, None] + zero, mask=store)
        tl.store(col_ptr + base + rel, offs_j[None, :] + zero, mask=store)


@triton.jit
def _add_histogram(score, valid, hist_ptr, BLOCK: tl.constexpr, SHIFT: tl.constexpr, NUM_BINS: tl.constexpr):
    """Adds the radix histogram of the valid |C_ij| to hist [NUM_BINS] int64; invalid entries
    land in bin 0 together with zeros and denormals."""
    # a non-negative fp32 orders like its bit pattern, so the top bits are an ordered bin
    bins = tl.where(valid, score.to(tl.int32, bitcast=True) >> SHIFT, 0)
    hist = tl.histogram(tl.reshape(bins, (BLOCK * BLOCK,)), NUM_BINS)
    tl.atomic_add(hist_ptr + tl.arange(0, NUM_BINS), hist.to(tl.int64), mask=hist > 0)


@triton.jit
def _collect_kernel(
    a_ptr, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, stride_m, stride_n,
    threshold, val_ptr, row_ptr, col_ptr, counter_ptr, capacity,
    COSINE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """Appends (C_ij, i, j) for i < j, |C_ij| >= threshold, C_ij != 0 to the buffers."""
    acc, score, offs_i, offs_j, valid = _tile_scores(
        a_ptr, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, stride_m, stride_n,
        COSINE, BLOCK, BLOCK_K, EVEN_M, EVEN_N, CAST_FP32, IEEE,
    )
    _append_candidates(acc, score, offs_i, offs_j, valid, threshold, val_ptr, row_ptr, col_ptr, counter_ptr,
                       capacity, BLOCK)


@triton.jit
def _histogram_kernel(
    a_ptr, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, stride_m, stride_n, hist_ptr,
    COSINE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
    SHIFT: tl.constexpr, NUM_BINS: tl.constexpr,
):
    """Adds the radix histogram of |C_ij| (i < j) to hist [NUM_BINS] int64."""
    acc, score, offs_i, offs_j, valid = _tile_scores(
        a_ptr, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, stride_m, stride_n,
        COSINE, BLOCK, BLOCK_K, EVEN_M, EVEN_N, CAST_FP32, IEEE,
    )
    _add_histogram(score, valid, hist_ptr, BLOCK, SHIFT, NUM_BINS)


@triton.jit
def _collect_tma_kernel(
    a_desc, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N,
    threshold, val_ptr, row_ptr, col_ptr, counter_ptr, capacity,
    COSINE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, CAST_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    """_collect_kernel with its tiles loaded through a's tensor descriptor."""
    acc, score, offs_i, offs_j, valid = _tile_scores_tma(
        a_desc, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, COSINE, BLOCK, BLOCK_K, CAST_FP32, IEEE,
    )
    _append_candidates(acc, score, offs_i, offs_j, valid, threshold, val_ptr, row_ptr, col_ptr, counter_ptr,
                       capacity, BLOCK)


@triton.jit
def _histogram_tma_kernel(
    a_desc, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, hist_ptr,
    COSINE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, CAST_FP32: tl.constexpr,
    IEEE: tl.constexpr, SHIFT: tl.constexpr, NUM_BINS: tl.constexpr,
):
    """_histogram_kernel with its tiles loaded through a's tensor descriptor."""
    acc, score, offs_i, offs_j, valid = _tile_scores_tma(
        a_desc, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, COSINE, BLOCK, BLOCK_K, CAST_FP32, IEEE,
    )
    _add_histogram(score, valid, hist_ptr, BLOCK, SHIFT, NUM_BINS)


@functools.lru_cache(maxsize=16)
def _tile_order(num_blocks: int, group: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(bi, bj) int32 [T] for the T = nb(nb+1)/2 upper-triangle tiles, grouped so that
    consecutive programs share `group` row blocks (they stay in L2 while bj streams)."""
    bi, bj = torch.triu_indices(num_blocks, num_blocks)
    key = (bi // group) * (num_blocks * group) + bj * group + bi % group
    order = torch.argsort(key)
    return bi[order].to(torch.int32).to(device), bj[order].to(torch.int32).to(device)


def _config(dtype: torch.dtype, n: int) -> dict:
    """Tile configuration: H100-sized on GPU, tiny under the interpreter."""
    if triton_interpreting():
        return dict(BLOCK=16, BLOCK_K=16, num_warps=4, num_stages=1, group=4)
    block = min(128, max(16, triton.next_power_of_2(n)))
    # 16-bit: BLOCK_K 128 (3 stages, 192 KiB of shared memory) ran the n = 16384 call in 3.37 ms
    # against 3.93 ms at 64 (H200, benchmarks/results/triton-tune-nvidia-h200.json)
    block_k = 32 if dtype == torch.float32 else (128 if block >= 128 else 64)
    return dict(BLOCK=block, BLOCK_K=block_k, num_warps=8 if block >= 128 else 4, num_stages=3, group=8)


def supported_dtypes() -> tuple[torch.dtype, ...]:
    return (torch.float16, torch.bfloat16, torch.float32)
