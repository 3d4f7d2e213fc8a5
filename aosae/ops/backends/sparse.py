"""The sparse co-activation backend: work O(Σ_rows L0²) instead of O(m·n²).

After ReLU or TopK most activations are zero, and C = aᵀa has at most Σ_t L0_t(L0_t−1)/2
non-zeros above the diagonal (L0_t = non-zeros of row t). The exact top-k lies among them:

    gather each row's non-zeros (CSR) -> emit its co-active pairs (i < j, a_ti·a_tj)
    -> reduce duplicate pairs across rows (sum) -> select the k best by |C_ij|.

Two implementations, same results:
- C++ (csrc/gram_topk_sparse.cpp, OpenMP) on CPU when aosae._C has it: bucket pairs by
  the smaller latent, reduce each bucket with a thread-local accumulator, find the k-th best
  from a histogram of |C| (csrc/pair_select.h). The few densest rows (outlier tokens that
  fire on thousands of latents) are summed by one GEMM over the latents they touch instead of
  pair by pair (csrc/dense_rows.h).
- Triton on CUDA (aosae/ops/backends/sparse_triton.py, aosae/kernels/sparse_pairs.py): every
  co-active pair written to a fixed slot, one radix sort of the keys, each run of equal keys
  summed in row order, one sort of the scores. Deterministic, no float atomics.
- pure torch (any device; float64 on CUDA, and the CPU fallback when aosae._C is missing or
  was built without the sparse kernel): pair expansion with repeat_interleave, stable
  sort of 64-bit keys i·n + j, segment sum, topk.

`prefers(a)` is the cost model `auto` uses (see `COST` below for the measured constants).
"""
from __future__ import annotations

import torch

from aosae.ops import extension as _extension
from aosae.ops.backends import sparse_triton
from aosae.ops.conventions import accumulation_dtype, finalize

# Cost model, in nanoseconds (2-core CI-class CPU; benchmarks/sparse_sweep.py and
# benchmarks/train_step.py, see benchmarks/NOTES.md):
#   sparse  ≈ fixed + scan · m·n + Σ_rows row_cost
#   dense   ≈ mac · m·n²/2          (upper-triangle GEMM of the fused dense backend)
# row_cost = pair · L0(L0−1)/2 for a sparse row. The C++ kernel sums its densest rows
# (outlier tokens) with one GEMM block over the latents they touch instead
# (csrc/dense_rows.h; _block_plan mirrors its plan): h such rows cost block_mac · h·u² plus
# block_entry · u² for a block of width u. Only the ratios matter. CPU crossover for uniform rows:
# L0/n ≈ sqrt(mac/pair) ≈ 0.04, i.e. L0 ≈ 165 at n = 4096, ≈ 660 at n = 16384.
COST = {
    # C++ kernel: ~4–10 ns per co-active pair (scatter + reduce + select, 2 threads; 4.1M
    # pairs in 17 ms at n = 4608), ~1 ns per element to find the non-zeros; fused dense
    # kernel ~0.013 ns per multiply-add (3.5 s for m = 2048, n = 16384).
    # pair, block_mac and block_entry are read from aosae._C (csrc/dense_rows.h), where the
    # kernel plans its block with them: one set of numbers for both decisions.
    "cpu": {"fixed": 2e6, "scan": 1.0, "mac": 0.013},
    # pure-torch path on CPU (aosae._C without the sparse kernel): ~50x slower per pair, no block.
    "cpu_torch": {"fixed": 2e7, "scan": 2.0, "pair": 500.0, "mac": 0.013},
    # CUDA, least squares over the H200 suite's 16 backend="sparse" forward rows on TopK-like
    # input (benchmarks/results/gpu-suite-nvidia-h200-call1.json; B 4096, n 16384–131072, L0
    # 32–128; 14 rows within ±25 %, the worst −31 % and +26 %): ≈ 0.96 ms of launches, the CSR's
    # host sync and the two sorts' fixed cost, 0.0072 ns per input element scanned, 0.14 ns per
    # pair. The fused dense kernel (…-call5.json): 6e-6 ns per multiply-add in bf16/fp16 (3.53 ms
    # at n 16384, 48.9 ms at 65536, 202 ms at 131072), 4.5e-5 in fp32 (25.1 ms at 16384: no
    # tensor cores without TF32; float64 is costed so too). No block.
    "cuda": {"fixed": 9.6e5, "scan": 0.0072, "pair": 0.144, "mac": 6e-6, "mac_fp32": 4.5e-5},
}
# Never pick sparse on its own when the pair list alone would exceed this many pairs
# (~8 bytes each in C++, ~40 in the torch path): the dense kernels need O(tile²) memory.
MAX_AUTO_PAIRS = 1 << 28
# Rows sampled by prefers() to estimate Σ L0² (a strided sample, deterministic).
SAMPLE_ROWS = 256


def cpp_costs() -> dict:
    """COST["cpu"] completed with the C++ kernel's own block cost model: pair, block_mac,
    block_entry (ns) and the block's row threshold and width cap."""
    pair, block_mac, block_entry, min_l0, max_latents, hard_max, pair_bytes = cpp_module().sparse_block_costs()
    return {**COST["cpu"], "pair": pair, "block_mac": block_mac, "block_entry": block_entry,
            "block_min_l0": min_l0, "block_max_latents": max_latents, "block_hard_max_latents": hard_max,
            "block_pair_bytes": pair_bytes}


def cpp_module():
    """aosae._C when it was built with the sparse kernel, else None."""
    module, _ = _extension.load()
    if module is not None and hasattr(module, "gram_topk_sparse_cpu") and hasattr(module, "sparse_block_costs"):
        return module
    return None


def available() -> tuple[bool, str]:
    # The pure-torch path runs on any device, so the backend is always available.
    return True, ""


def supports(a: torch.Tensor) -> tuple[bool, str]:
    return True, ""


def _sample(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A strided sample of at most SAMPLE_ROWS rows of a [m, n] (as its non-zero mask), their
    L0, and the rows each stands for."""
    m = a.shape[0]
    rows = a[:: max(1, m // SAMPLE_ROWS)] != 0
    # (a bool sum is ~10x slower than the same bytes summed as uint8 on CPU)
    return rows, rows.view(torch.uint8).sum(dim=1, dtype=torch.int32).double(), m / rows.shape[0]


def estimate_pairs(a: torch.Tensor) -> float:
    """Estimated Σ_t L0_t(L0_t−1)/2 of a [m, n] from a strided sample of at most 256 rows."""
    _, l0, weight = _sample(a)
    return float((l0 * (l0 - 1) / 2).sum()) * weight


def _block_plan(rows: torch.Tensor, l0: torch.Tensor, weight: float, c: dict) -> tuple[float, float]:
    """The GEMM block of csrc/dense_rows.h on the sample: the densest rows first, skipping a row
    that would widen the latents they touch past the block's width cap, the cheapest prefix of
    the rows taken. Returns (pairs those rows take off the pair path, the block's cost in ns),
    both for the whole batch."""
    heavy = (l0 >= c["block_min_l0"]).nonzero().flatten()
    if heavy.numel() == 0:
        return 0.0, 0.0
    heavy = heavy[l0[heavy].argsort(descending=True)]
    touched, sizes, taken, pairs = torch.zeros(rows.shape[1], dtype=torch.bool), [], [], 0.0
    for t, row in zip(heavy.tolist(), rows[heavy]):  # |U| after each row taken
        wider = touched | row
        size = float(wider.view(torch.uint8).sum(dtype=torch.int32))
        row_pairs = float(l0[t]) * (float(l0[t]) - 1) / 2
        # past the width cap, a block no larger than the pair path's memory for its row pairs (dense_rows.h)
        if size > c["block_max_latents"] and not (size <= c["block_hard_max_latents"]
                                                  and 4 * size**2 <= c["block_pair_bytes"] * (pairs + row_pairs)):
            continue
        touched, sizes, pairs = wider, sizes + [size], pairs + row_pairs
        taken.append(t)
    heavy = torch.tensor(taken, dtype=torch.int64)
    fits = len(sizes)
    if fits == 0:
        return 0.0, 0.0
    union = torch.tensor(sizes, dtype=torch.float64)
    moved_pairs = (l0[heavy[:fits]] * (l0[heavy[:fits]] - 1) / 2).cumsum(0) * weight
    h = torch.arange(1, fits + 1, dtype=torch.float64) * weight
    cost = c["block_mac"] * h * union**2 + c["block_entry"] * union**2 - c["pair"] * moved_pairs
    best = int(cost.argmin())
    if float(cost[best]) >= 0:  # moving nothing is cheaper
        return 0.0, 0.0
    return float(moved_pairs[best]), float(c["block_mac"] * h[best] * union[best] ** 2 + c["block_entry"] * union[best] ** 2)


def predicted_ms(a: torch.Tensor, pairs: float | None = None) -> dict[str, float]:
    """The cost model's predicted times (ms) of the sparse and the dense path for a [m, n],
    and the pairs the sparse path would emit one by one (`pairs` overrides the estimate and
    assumes no outlier rows)."""
    m, n = a.shape
    if a.device.type == "cuda":
        c = COST["cuda"]
    else:
        c = cpp_costs() if cpp_module() is not None else COST["cpu_torch"]
    block = 0.0
    if pairs is None:
        rows, l0, weight = _sample(a)
        pairs = float((l0 * (l0 - 1) / 2).sum()) * weight
        if "block_mac" in c:  # outlier rows summed by the GEMM block instead of pair by pair
            moved, block = _block_plan(rows, l0, weight, c)
            pairs -= moved
    sparse = c["fixed"] + c["scan"] * m * n + c["pair"] * pairs + block
    wide = a.dtype in (torch.float32, torch.float64) and "mac_fp32" in c
    dense = c["mac_fp32" if wide else "mac"] * m * n * n / 2
    return {"sparse": sparse * 1e-6, "dense": dense * 1e-6, "pairs": pairs}


def prefers(a: torch.Tensor) -> bool:
    """Whether `auto` should use the sparse path on a [m, n]: predicted sparse time below
    the dense one, and a pair list that fits comfortably in memory."""
    if a.dim() != 2 or a.numel() == 0:
        return False
    pred = predicted_ms(a)
    return pred["pairs"] <= MAX_AUTO_PAIRS and pred["sparse"] < pred["dense"]


def forward(a: torch.Tensor, k: int, cosine: bool, threshold: float | None = None):
    """a: [m, n] -> (values[k], rows[k], cols[k]); see aosae.gram_topk for the contract.

    `threshold` is ignored: the pair list is built in full either way.
    """
    if sparse_triton.preferred(a):
        row_ptr, cols, vals = dense_to_csr_torch(a, keep_dtype=True)
        return sparse_triton.csr_topk(row_ptr, cols, vals, a.shape[1], k, cosine)
    ext = cpp_module() if a.device.type == "cpu" else None
    if ext is not None:
        return tuple(ext.gram_topk_sparse_cpu(a, k, cosine))
    row_ptr, cols, vals = dense_to_csr_torch(a)
    return csr_topk_torch(row_ptr, cols, vals, a.shape[1], k, cosine)


def csr_topk(row_ptr, cols, vals, n: int, k: int, cosine: bool, impl: str = "auto"):
    """Top-k pairs of the CSR matrix (row_ptr [m+1] int64, cols [nnz] int64 strictly
    increasing per row, vals [nnz] float32/float64) of shape [m, n].

    impl: "auto" (C++ on CPU when built, Triton on CUDA, else torch), "cpp", "triton" or "torch".
    Returns (values [k] in vals' dtype, rows [k] int64, cols [k] int64), contract order.
    """
    if impl not in ("auto", "cpp", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'cpp', 'triton' or 'torch', got {impl!r}")
    if impl == "triton" or (impl == "auto" and sparse_triton.preferred(vals)):
        if not sparse_triton.usable(vals):
            raise RuntimeError(
                f"the Triton sparse kernels need Triton and float16/bfloat16/float32 values on CUDA "
                f"(or TRITON_INTERPRET=1 on CPU), got {vals.dtype} on {vals.device}"
            )
        return sparse_triton.csr_topk(row_ptr, cols, vals, n, k, cosine)
    ext = cpp_module() if (impl != "torch" and vals.device.type == "cpu") else None
    if impl == "cpp" and ext is None:
        raise RuntimeError(
            "the C++ sparse kernel is not available (aosae._C is missing, on another device, "
            f"or was built before csrc/gram_topk_sparse.cpp existed): {_extension.load()[1] or 'rebuild aosae._C'}"
        )
    if ext is not None:
        return tuple(ext.sparse_csr_topk(row_ptr, cols, vals, n, k, cosine))
    return csr_topk_torch(row_ptr, cols, vals, n, k, cosine)


def dense_to_csr_torch(a: torch.Tensor, keep_dtype: bool = False):
    """Non-zeros of a [m, n] as CSR (row_ptr [m+1] int64, cols [nnz] int64 ascending per
    row, vals [nnz] float32/float64, or a's dtype with keep_dtype)."""
    m = a.shape[0]
    t, c = torch.nonzero(a, as_tuple=True)  # row-major order: cols ascending within a row
    vals = a[t, c] if keep_dtype else a[t, c].to(accumulation_dtype(a.dtype))
    row_ptr = torch.zeros(m + 1, dtype=torch.int64, device=a.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(t, minlength=m), 0)
    return row_ptr, c, vals


def _segment_sum(keys: torch.Tensor, vals: torch.Tensor):
    """Sum of vals per distinct key -> (sorted distinct keys, sums). Deterministic: a stable
    sort then a segmented reduction in the original order (no atomics)."""
    keys, order = torch.sort(keys, stable=True)
    vals = vals[order]
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    return uniq, torch.segment_reduce(vals, "sum", lengths=counts)


def csr_topk_torch(row_ptr, cols, vals, n: int, k: int, cosine: bool):
    """The pure-torch sparse top-k on CSR input (any device); see csr_topk."""
    sums, rows, cols_out = csr_pairs_torch(row_ptr, cols, vals, n, cosine)
    if sums.numel() > k:
        # keep every pair scoring at least the k-th best (ties included); finalize orders
        # by (|value| desc, (row, col) asc) and cuts to k
        kth = torch.topk(sums.abs(), k, sorted=False).values.min()
        keep = sums.abs() >= kth
        sums, rows, cols_out = sums[keep], rows[keep], cols_out[keep]
    return finalize(sums, rows, cols_out, k, n)


def csr_pairs_torch(row_ptr, cols, vals, n: int, cosine: bool):
    """Every co-active pair of the CSR matrix with a non-zero score, in (row, col) ascending
    order (the order the duplicate reduction leaves): (values [P] in vals' dtype, rows [P],
    cols [P] int64). Memory O(Σ_t L0_t²); cols must be ascending within each row."""
    device, acc = vals.device, vals.dtype
    m = row_ptr.numel() - 1
    nnz = cols.numel()
    counts = row_ptr[1:] - row_ptr[:-1]
    row_of = torch.repeat_interleave(torch.arange(m, device=device), counts, output_size=nnz)
    pos = torch.arange(nnz, device=device) - row_ptr[:-1][row_of]
    partners = counts[row_of] - 1 - pos  # entries after this one in its row
    total = int(partners.sum())
    if total == 0:
        return vals.new_zeros(0), cols.new_zeros(0), cols.new_zeros(0)
    # Pair expansion: entry e pairs with e+1, …, e+partners[e] (same row, larger column).
    first = torch.repeat_interleave(torch.arange(nnz, device=device), partners, output_size=total)
    starts = torch.cumsum(partners, 0) - partners
    second = first + 1 + torch.arange(total, device=device) - starts[first]
    keys, sums = _segment_sum(cols[first] * n + cols[second], vals[first] * vals[second])
    del first, second
    rows, cols_out = keys // n, keys % n
    if cosine:
        norm_idx, norm_sq = _segment_sum(cols, vals * vals)
        inv = torch.zeros(n, dtype=acc, device=device)
        inv[norm_idx] = torch.where(norm_sq > 0, norm_sq.rsqrt(), torch.zeros_like(norm_sq))
        sums = sums * inv[rows] * inv[cols_out]
    keep = sums != 0
    return sums[keep], rows[keep], cols_out[keep]
