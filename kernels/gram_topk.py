"""Fused Triton kernels for gram_topk: C = aᵀa tile by tile, filtered in the epilogue.

The n × n Gram matrix never exists. Each program of a 1-D grid owns one tile (bi, bj) of
the upper triangle (bi <= bj), accumulates it with `tl.dot` in fp32 over the m (batch)
dimension, scales it by the inverse column norms in cosine mode, and appends every entry
with i < j and |score| >= threshold to a bounded candidate buffer through one atomic add
per tile. The host then selects the exact top-k over the candidates (`finalize`).

The threshold comes from, in order: the caller's hint (the previous step's k-th score,
lowered by a margin), an estimate from a random sample of columns, and, as the always
exact fallback, a radix histogram pass over all tiles. A full buffer or fewer than k
candidates moves to the next stage, so the result is exact whatever the hint.

Entry point: `gram_topk_triton(a, k, cosine, threshold)`; `last_call_info` records the
passes the last call took (for benchmarks).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from aosae.machine import triton_interpreting
from aosae.ops.conventions import finalize, pad_to_k

# Filled by every gram_topk_triton call: passes (GEMM passes over the tiles), threshold,
# candidates (entries >= threshold), capacity, stages tried. Read by the benchmark.
last_call_info: dict = {}

# Histogram bins: the top 11 bits of a non-negative fp32 (8 exponent + 3 mantissa bits),
# so a bin spans 12.5% of its value and the bin order is the value order.
HIST_SHIFT = 20
HIST_BINS = 1 << (31 - HIST_SHIFT)


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
        if CAST_FP32:  # the interpreter gets bf16 arithmetic wrong; products are exact in fp32
            ti = ti.to(tl.float32)
            tj = tj.to(tl.float32)
        if IEEE:  # fp32 input and torch's matmul TF32 switch off: match torch.mm precision
            acc = tl.dot(tl.trans(ti), tj, acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(ti), tj, acc=acc)
        ptr_i += BLOCK_K * stride_m
        ptr_j += BLOCK_K * stride_m
    if COSINE:
        inv_i = tl.load(inv_norm_ptr + offs_i, mask=offs_i < N, other=0.0)
        inv_j = tl.load(inv_norm_ptr + offs_j, mask=offs_j < N, other=0.0)
        acc = acc * inv_i[:, None] * inv_j[None, :]
    valid = (offs_i[:, None] < offs_j[None, :]) & (offs_j[None, :] < N)
    return acc, tl.abs(acc), offs_i, offs_j, valid


@triton.jit
def _collect_kernel(
    a_ptr, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, stride_m, stride_n,
    threshold, val_ptr, row_ptr, col_ptr, counter_ptr, capacity,
    COSINE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """Appends (C_ij, i, j) for i < j, |C_ij| >= threshold, C_ij != 0 to the buffers.
    counter counts every such entry, also those that did not fit (pos >= capacity)."""
    acc, score, offs_i, offs_j, valid = _tile_scores(
        a_ptr, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, stride_m, stride_n,
        COSINE, BLOCK, BLOCK_K, EVEN_M, EVEN_N, CAST_FP32, IEEE,
    )
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
def _histogram_kernel(
    a_ptr, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, stride_m, stride_n, hist_ptr,
    COSINE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
    SHIFT: tl.constexpr, NUM_BINS: tl.constexpr,
):
    """Adds the radix histogram of |C_ij| (i < j) to hist [NUM_BINS] int64; invalid
    entries land in bin 0 together with zeros and denormals."""
    acc, score, offs_i, offs_j, valid = _tile_scores(
        a_ptr, inv_norm_ptr, tile_bi_ptr, tile_bj_ptr, M, N, stride_m, stride_n,
        COSINE, BLOCK, BLOCK_K, EVEN_M, EVEN_N, CAST_FP32, IEEE,
    )
    # a non-negative fp32 orders like its bit pattern, so the top bits are an ordered bin
    bins = tl.where(valid, score.to(tl.int32, bitcast=True) >> SHIFT, 0)
    hist = tl.histogram(tl.reshape(bins, (BLOCK * BLOCK,)), NUM_BINS)
    tl.atomic_add(hist_ptr + tl.arange(0, NUM_BINS), hist.to(tl.int64), mask=hist > 0)


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
    block_k = 32 if dtype == torch.float32 else 64
    return dict(BLOCK=block, BLOCK_K=block_k, num_warps=8 if block >= 128 else 4, num_stages=3, group=8)


def supported_dtypes() -> tuple[torch.dtype, ...]:
    return (torch.float16, torch.bfloat16, torch.float32)


def inverse_column_norms(a: torch.Tensor) -> torch.Tensor:
    """1/‖a[:, i]‖ as fp32 [n]; 0 for zero columns (cosine 0 with everything)."""
    norms = torch.linalg.vector_norm(a, dim=0, dtype=torch.float32)
    return torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))


def sample_threshold(a: torch.Tensor, k: int, inv_norm: torch.Tensor | None, sample_size: int, margin: float) -> float:
    """A threshold expected to let about margin · k pairs through, from the exact scores of
    a fixed pseudo-random subset of columns (all columns when n <= sample_size)."""
    n = a.shape[1]
    s = min(n, sample_size)
    if s < 2:
        return 0.0
    if s == n:
        idx = torch.arange(n, device=a.device)
    else:  # fixed seed: the same input gives the same passes every call
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:s].to(a.device)
    x = a[:, idx].float()
    if inv_norm is not None:
        x = x * inv_norm[idx]
    i, j = torch.triu_indices(s, s, 1, device=a.device)
    scores = (x.t() @ x)[i, j].abs()
    want = math.ceil(min(1.0, margin * k / (n * (n - 1) / 2)) * scores.numel())
    if want >= scores.numel():
        return 0.0
    return float(torch.topk(scores, want).values[-1])


def threshold_from_histogram(hist: torch.Tensor, k: int, num_pairs: int) -> tuple[float, int]:
    """(threshold, exact candidate count) from a radix histogram: the lower edge of the bin
    where the count from the top first reaches k, so >= k entries pass it; 0 (all non-zero
    entries) when fewer than k entries are >= the smallest normal float."""
    counts = hist.cpu()[1:]
    from_top = counts.flip(0).cumsum(0).flip(0)  # from_top[b - 1] = entries in bins >= b
    reach = torch.nonzero(from_top >= k).flatten()
    if reach.numel() == 0:
        return 0.0, min(num_pairs, int(hist.sum()))
    b = int(reach[-1]) + 1
    edge = torch.tensor([b << HIST_SHIFT], dtype=torch.int32).view(torch.float32)
    return float(edge), int(from_top[b - 1])


def gram_topk_triton(
    a: torch.Tensor,
    k: int,
    cosine: bool = False,
    threshold: float | None = None,
    *,
    capacity: int | None = None,
    max_capacity: int | None = None,
    sample_size: int = 1024,
    margin: float = 2.0,
    hint_margin: float = 0.9,
    block: int | None = None,
    block_k: int | None = None,
):
    """Exact top-k pairs of C = aᵀa (or the cosine matrix) with the fused Triton kernel.

    Args:
        a: [m, n] float16/bfloat16/float32 on CUDA (or CPU under TRITON_INTERPRET=1),
            any strides. Scores are accumulated in fp32.
        k: 1 <= k <= n(n-1)/2.
        cosine: score a_i·a_j / (‖a_i‖‖a_j‖) instead of a_i·a_j.
        threshold: hint, about the k-th |score| (e.g. the previous step's); the first pass
            uses hint · hint_margin. Only the number of passes depends on it.
        capacity: candidate buffer size of the first pass (default 4k + 1024).
        max_capacity: largest buffer a retry may grow to before the threshold is re-estimated
            instead (default 16k + 2^20); the histogram stage allocates what it needs.
        sample_size, margin: cold start from the columns sample, aiming at margin · k pairs.
        block, block_k: tile sizes (powers of two >= 16); defaults per device and dtype.

    Returns:
        (values [k] fp32, rows [k] int64, cols [k] int64), the aosae.gram_topk contract:
        |value| desc, ties by (row, col) asc, empty slots (0, -1, -1).
    """
    if a.dtype not in supported_dtypes():
        raise TypeError(f"the triton kernel takes float16/bfloat16/float32 input, got {a.dtype}; convert with a.float()")
    if a.dim() != 2:
        raise ValueError(f"expected a 2-D tensor [m, n], got shape {tuple(a.shape)}")
    if a.device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"the triton kernel runs on CUDA tensors, got a tensor on {a.device}; "
            f"move it with a.cuda() or set TRITON_INTERPRET=1 (before importing triton) to interpret it on CPU"
        )
    m, n = a.shape
    num_pairs = n * (n - 1) // 2
    if not 1 <= k <= num_pairs:
        raise ValueError(f"k must be in [1, {num_pairs}] for n = {n}, got {k}")
    device = a.device
    cfg = _config(a.dtype, n)
    if block is not None:
        cfg["BLOCK"] = block
    if block_k is not None:
        cfg["BLOCK_K"] = block_k
    blk = cfg["BLOCK"]
    inv_norm = inverse_column_norms(a) if cosine else None
    tile_bi, tile_bj = _tile_order(triton.cdiv(n, blk), cfg["group"], str(device))
    common = dict(
        COSINE=cosine, BLOCK=blk, BLOCK_K=cfg["BLOCK_K"],
        EVEN_M=m % cfg["BLOCK_K"] == 0, EVEN_N=n % blk == 0,
        CAST_FP32=triton_interpreting() and a.dtype != torch.float32,
        IEEE=a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    args = (a, a if inv_norm is None else inv_norm, tile_bi, tile_bj, m, n, a.stride(0), a.stride(1))
    grid = (tile_bi.numel(),)
    counter = torch.zeros(1, dtype=torch.int64, device=device)
    buffers = {}

    def collect(thr: float, cap: int) -> int:
        if buffers.get("cap") != cap:
            buffers.clear()
            buffers.update(
                cap=cap,
                vals=torch.empty(cap, dtype=torch.float32, device=device),
                rows=torch.empty(cap, dtype=torch.int32, device=device),
                cols=torch.empty(cap, dtype=torch.int32, device=device),
            )
        counter.zero_()
        _collect_kernel[grid](*args, thr, buffers["vals"], buffers["rows"], buffers["cols"], counter, cap, **common)
        return int(counter.item())

    def histogram() -> torch.Tensor:
        hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=device)
        _histogram_kernel[grid](*args, hist, SHIFT=HIST_SHIFT, NUM_BINS=HIST_BINS, **common)
        return hist

    cap = max(1, min(num_pairs, capacity if capacity is not None else 4 * k + 1024))
    cap_limit = max(cap, min(num_pairs, max_capacity if max_capacity is not None else 16 * k + (1 << 20)))
    stages = []
    if threshold is not None and math.isfinite(threshold) and threshold > 0:
        stages.append("hint")
    stages += ["sample", "histogram"]
    # thresholds known to be too low (buffer overflowed) / too high (fewer than k passed)
    too_low, too_high = -1.0, math.inf
    passes, tried, count, thr, done = 0, [], 0, 0.0, False
    for stage in stages:
        if stage == "histogram":
            thr, need = threshold_from_histogram(histogram(), k, num_pairs)
            passes += 1
            cap = max(1, need)
        else:
            if stage == "hint":
                thr = float(threshold) * hint_margin
            else:
                thr = sample_threshold(a, k, inv_norm, sample_size, margin)
            if not too_low < thr < too_high:
                continue  # a pass at this threshold is known to fail
        tried.append(stage)
        count = collect(thr, cap)
        passes += 1
        if count > cap and count <= cap_limit:
            cap = count  # the same threshold gives the same count: one more pass suffices
            count = collect(thr, cap)
            passes += 1
        if count > cap:
            too_low = max(too_low, thr)
            continue
        if count >= k or thr == 0.0:
            done = True
            break
        too_high = min(too_high, thr)
    last_call_info.clear()
    last_call_info.update(passes=passes, threshold=thr, candidates=count, capacity=cap, stages=tried)
    if not done:  # the histogram pass gives the exact count, so this means a kernel bug
        raise RuntimeError(
            f"gram_topk triton: candidate selection failed after stages {tried} "
            f"(threshold {thr}, {count} candidates, capacity {cap}); please report this with the input shape"
        )
    return select_topk(buffers["vals"][:count], buffers["rows"][:count], buffers["cols"][:count], k, n)


def select_topk(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int, n: int):
    """`aosae.selection.finalize` for candidates with non-zero values and unique (row, col),
    cheaper on many candidates: a radix select of the k-th |value| drops the rest, then
    one sort on a packed key (|value| desc, row, col) when row·n + col fits in 32 bits.

    values: [p] fp32; rows, cols: [p] int32/int64 with row < col < n.
    Returns (values [k] fp32, rows [k] int64, cols [k] int64), padded with (0, -1, -1).
    """
    absv = values.abs()
    if values.numel() > k:
        kth = torch.topk(absv, k, sorted=False).values.min()
        keep = absv >= kth  # every entry tied with the k-th stays: ties are ordered below
        values, rows, cols, absv = values[keep], rows[keep], cols[keep], absv[keep]
    if values.numel() == 0 or n * n > 2**32:
        return finalize(values, rows, cols, k)
    flat = rows.long() * n + cols.long()
    # non-negative fp32 order like their bits; 31 bits of reversed |value|, 32 of (row, col)
    key = ((0x7FFFFFFF - absv.view(torch.int32).long()) << 32) | flat
    order = torch.argsort(key)[:k]
    values, rows, cols = values[order], rows[order].long(), cols[order].long()
    return pad_to_k(values, rows, cols, k)
