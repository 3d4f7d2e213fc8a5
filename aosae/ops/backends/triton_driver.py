"""Host side of the Triton backend: thresholds, passes and the exact selection around the fused
kernels of aosae.kernels.gram_topk (which only compute tiles and append candidates).

The threshold comes from, in order: the caller's hint (the previous step's k-th score,
lowered by a margin), an estimate from a random sample of columns, and, as the always
exact fallback, a radix histogram pass over all tiles. A full buffer or fewer than k
candidates moves to the next stage, so the result is exact whatever the hint.

Entry point: `gram_topk_triton(a, k, cosine, threshold)`; `last_call_info` records the
passes the last call took (for benchmarks). Imports Triton: load it only when Triton is usable.
"""
from __future__ import annotations

import math

import torch
import triton

from aosae.kernels.gram_topk import (
    HIST_BINS, HIST_SHIFT, _collect_kernel, _collect_tma_kernel, _config, _histogram_kernel, _histogram_tma_kernel,
    _tile_order, supported_dtypes,
)
from aosae.machine import triton_interpreting
from aosae.ops.conventions import select_topk

# Filled by every gram_topk_triton call: passes (GEMM passes over the tiles), threshold,
# candidates (entries >= threshold), capacity, stages tried. Read by the benchmark.
last_call_info: dict = {}


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


def tma_usable(a: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address a: unit column stride, 16-byte aligned base and rows."""
    return a.stride(1) == 1 and a.data_ptr() % 16 == 0 and (a.stride(0) * a.element_size()) % 16 == 0


def make_passes(a: torch.Tensor, inv_norm: torch.Tensor | None, cfg: dict):
    """The two kernel passes over all upper-triangle tiles of a, launched with cfg:
    collect(threshold, capacity) -> count (candidates land in buffers["vals"/"rows"/"cols"])
    and histogram() -> int64 [HIST_BINS]. Used by gram_topk_triton and the tuning benchmark."""
    m, n = a.shape
    device = a.device
    blk = cfg["BLOCK"]
    tile_bi, tile_bj = _tile_order(triton.cdiv(n, blk), cfg["group"], str(device))
    common = dict(
        COSINE=inv_norm is not None, BLOCK=blk, BLOCK_K=cfg["BLOCK_K"],
        EVEN_M=m % cfg["BLOCK_K"] == 0, EVEN_N=n % blk == 0,
        CAST_FP32=triton_interpreting() and a.dtype != torch.float32,
        IEEE=a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    args = (a, a if inv_norm is None else inv_norm, tile_bi, tile_bj, m, n, a.stride(0), a.stride(1))
    collect_kernel, histogram_kernel = _collect_kernel, _histogram_kernel
    if cfg.get("TMA"):  # a's tiles through a tensor descriptor (Hopper's TMA unit); the same results
        if not tma_usable(a):
            raise ValueError(
                f"config TMA=True needs a with unit column stride, a 16-byte aligned base and 16-byte rows (got "
                f"strides {a.stride()}, {a.dtype}, base offset {a.data_ptr() % 16} mod 16): a contiguous a needs n a "
                f"multiple of {16 // a.element_size()} for {a.dtype}; otherwise drop TMA")
        try:
            from triton.tools.tensor_descriptor import TensorDescriptor
        except ImportError:
            raise ValueError(f"config TMA=True needs Triton >= 3.3 (tensor descriptors), this is {triton.__version__}: "
                             "drop TMA or upgrade triton") from None
        desc = TensorDescriptor.from_tensor(a, [cfg["BLOCK_K"], blk])
        args = (desc, a if inv_norm is None else inv_norm, tile_bi, tile_bj, m, n)
        collect_kernel, histogram_kernel = _collect_tma_kernel, _histogram_tma_kernel
        for flag in ("EVEN_M", "EVEN_N"):  # (the unit pads with zeros: no masks)
            common.pop(flag)
    grid = (tile_bi.numel(),)
    counter = torch.zeros(1, dtype=torch.int64, device=device)
    buffers: dict = {}

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
        collect_kernel[grid](*args, thr, buffers["vals"], buffers["rows"], buffers["cols"], counter, cap, **common)
        return int(counter.item())

    def histogram() -> torch.Tensor:
        hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=device)
        histogram_kernel[grid](*args, hist, SHIFT=HIST_SHIFT, NUM_BINS=HIST_BINS, **common)
        return hist

    return collect, histogram, buffers


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
    config: dict | None = None,
):
    """Exact top-k pairs of C = aᵀa (or the cosine matrix) with the fused Triton kernel.

    Args:
        a: [m, n] float16/bfloat16/float32 on CUDA (or CPU under TRITON_INTERPRET=1),
            any strides (TMA: see config). Scores are accumulated in fp32.
        k: 1 <= k <= n(n-1)/2.
        cosine: score a_i·a_j / (‖a_i‖‖a_j‖) instead of a_i·a_j.
        threshold: hint, about the k-th |score| (e.g. the previous step's); the first pass
            uses hint · hint_margin. Only the number of passes depends on it.
        capacity: candidate buffer size of the first pass (default 4k + 1024).
        max_capacity: largest buffer a retry may grow to before the threshold is re-estimated
            instead (default 16k + 2^20); the histogram stage allocates what it needs.
        sample_size, margin: cold start from the columns sample, aiming at margin · k pairs.
        block, block_k: tile sizes (powers of two >= 16); defaults per device and dtype.
        config: overrides of the launch configuration (BLOCK, BLOCK_K, num_warps,
            num_stages, group, TMA: a's tiles through a tensor descriptor, which needs unit
            column stride and 16-byte rows), for tuning: see benchmarks/gpu_triton_tune.py.

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
    cfg = _config(a.dtype, n)
    if block is not None:
        cfg["BLOCK"] = block
    if block_k is not None:
        cfg["BLOCK_K"] = block_k
    cfg.update(config or {})
    inv_norm = inverse_column_norms(a) if cosine else None
    collect, histogram, buffers = make_passes(a, inv_norm, cfg)

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
