"""Gradient of the selected Gram entries with respect to the input, never dense n × n.

For dot similarity v_p = a[:, r_p] · a[:, c_p], so with upstream grads g_p

    ∂L/∂a = a · G,   G symmetric sparse n × n,  G[r_p, c_p] = G[c_p, r_p] = g_p.

For cosine v_p = â_r · â_c with â = a / ‖a‖ (per column):

    ∂L/∂a = (â · G − â ⊙ u) / ‖a‖,   u_i = Σ_{p ∋ i} g_p v_p.

Three ways to compute a · G, same result:
- scatter (C++, csrc/gram_topk_backward.cpp, CPU): each non-zero a_bj adds a_bj · G[j, :]
  into row b. Work O(m·n) to scan a and write the dense gradient, plus one multiply-add per
  (non-zero, selected partner): ≈ 2·k·m·density. The path for sparse activations.
- product (torch.sparse.mm, any device): O(m·k) whatever the sparsity, but each pair is a
  vectorised axpy over the m rows, so it wins when a is dense (a ReLU SAE at initialisation).
- expand (torch ops, any device; the sparse path on CUDA): each non-zero a_bj expanded over
  G's row j, T = Σ_{non-zeros} deg(j) products summed into the gradient by index_add_ (plus
  passes over a and the [m, n] gradient): the scatter's work without a kernel. On the H200
  the product took 32 ms at n 16384 and 0.45–7.9 s at n ≥ 65536 on TopK latents.
`backward_path` chooses from a sampled density on CPU (see SCATTER_MAX_DENSITY) and from the
products each path would do on CUDA (see EXPAND_MAX_SHARE).

The gradient of gram_topk_sparse is w.r.t. its values [B, L] only: grad[t, s] = Σ over the
row's other entries s' of G[idx_ts, idx_ts'] · x_ts' (+ the cosine norm terms), never
densified (C++ on CPU: latent by latent, its selected partners spread into a dense row of
weights, then each of its entries is a dot product with its row's L entries: O(Σ partners + B·L²)).
"""
from __future__ import annotations

import torch

from aosae.ops import extension as _extension
from aosae.ops.backends import sparse_triton
from aosae.ops.conventions import accumulation_dtype, column_norms

# Above this fraction of non-zeros the scatter stops beating the sparse-dense product on CPU:
# they do ≈ 2·k·m·density vs 2·k·m multiply-adds, the scatter's scalar and random-access.
# Measured (m = 1024, n = 2048, fraction 0.005, 2 loaded cores): scatter 0.70× the product's
# time at density 0.05, 0.57× at 0.1, 0.99× at 0.2, 0.96× at 0.4 (benchmarks/NOTES.md).
SCATTER_MAX_DENSITY = 0.3
# Rows read to estimate the density (strided, deterministic): O(64·n), ≪ the O(m·n) backward.
DENSITY_SAMPLE_ROWS = 64
# Row chunk of the torch sparse backward: at most this many (row, s, s') lookups at a time.
SPARSE_CHUNK = 1 << 22
# The expand path on CUDA when its T products are at most this share of the product's 2·m
# multiply-adds per selected pair (an index_add_ of one product costs several of sparse.mm's
# vectorised ones: a guess until a GPU measures both, benchmarks/gpu_suite.py times the product
# beside it at n <= 16384), in chunks of EXPAND_CHUNK products.
EXPAND_MAX_SHARE = 0.25
EXPAND_CHUNK = 1 << 24


def _cpp(name: str):
    module, _ = _extension.load()
    return getattr(module, name, None) if module is not None else None


def sampled_density(a: torch.Tensor) -> float:
    """Fraction of non-zeros in a strided sample of ≤ 64 rows of a [m, n] (CPU only: on CUDA
    this would be a host sync, and the CUDA path does not need it)."""
    step = max(1, a.shape[0] // DENSITY_SAMPLE_ROWS)
    sample = a[::step]
    return float(torch.count_nonzero(sample)) / max(1, sample.numel())


def backward_path(a: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> str:
    """'scatter' (C++, CPU: cost follows the non-zeros), 'expand' (torch ops, CUDA: the same
    work, chosen when the selected pairs rows/cols say it is the smaller) or 'product'
    (torch.sparse.mm)."""
    if a.device.type == "cpu":
        if _cpp("gram_topk_backward_cpu") is None:
            return "product"
        return "scatter" if sampled_density(a) <= SCATTER_MAX_DENSITY else "product"
    if rows is None or cols is None:
        return "product"
    return _cheaper_of_expand_and_product(a, rows, cols)


def _cheaper_of_expand_and_product(a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> str:
    """'expand' when its T products are at most EXPAND_MAX_SHARE of the product's 2·m multiply-adds
    per selected pair, else 'product' (any device; on CUDA a few host syncs, small beside the backward)."""
    expand, product = _expand_products(a, rows, cols), 2 * a.shape[0] * int((rows >= 0).sum())
    return "expand" if expand <= EXPAND_MAX_SHARE * product else "product"


def _partners(rows: torch.Tensor, cols: torch.Tensor, n: int):
    """G's directed entries (both (r, c) and (c, r) of each selected pair) grouped by their first
    latent: (ptr [n+1], partner [2P], slot [2P]: the pair each came from), P = the non-empty slots."""
    slots = torch.nonzero(rows >= 0).flatten()
    first = torch.cat([rows[slots], cols[slots]])
    order = torch.argsort(first, stable=True)
    partner = torch.cat([cols[slots], rows[slots]])[order]
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    ptr[1:] = torch.bincount(first, minlength=n).cumsum(0)
    return ptr, partner, torch.cat([slots, slots])[order]


def _expand_products(a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> int:
    """T = Σ over a's non-zeros a_bj of deg(j), latent j's selected partners: the expand path's work."""
    n = a.shape[1]
    valid = rows >= 0
    deg = torch.bincount(torch.cat([rows[valid], cols[valid]]), minlength=n)
    return int(((a != 0).sum(0) * deg).sum())


def gram_topk_backward(
    grad_values: torch.Tensor,
    a: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    cosine: bool,
    path: str = "auto",
) -> torch.Tensor:
    """grad_values [k], a [m, n], values/rows/cols [k] -> grad_a [m, n] in a's dtype.

    path: "auto" (backward_path), "scatter" (C++, CPU), "expand" or "product" (any device).
    """
    if path == "auto":
        path = backward_path(a, rows, cols)
    if path == "expand":
        return expand_backward(grad_values, a, values, rows, cols, cosine)
    if path == "scatter":
        kernel = _cpp("gram_topk_backward_cpu")
        if kernel is None or a.device.type != "cpu":
            raise RuntimeError("the scatter backward needs aosae._C (rebuilt with csrc/gram_topk_backward.cpp) and a CPU tensor")
        acc = accumulation_dtype(a.dtype)
        return kernel(grad_values.to(acc), a, values.to(acc), rows, cols, cosine)
    if path != "product":
        raise ValueError(f"path must be 'auto', 'scatter', 'expand' or 'product', got {path!r}")
    return product_backward(grad_values, a, values, rows, cols, cosine)


def product_backward(grad_values, a, values, rows, cols, cosine: bool) -> torch.Tensor:
    """a · G with torch.sparse.mm (O(m·k)); empty slots (index -1) are masked, not
    filtered out, so no data-dependent shape (a host sync on CUDA) arises here."""
    m, n = a.shape
    acc = accumulation_dtype(a.dtype)
    valid = rows >= 0
    r, c = rows.clamp_min(0), cols.clamp_min(0)
    g = torch.where(valid, grad_values.to(acc), torch.zeros((), dtype=acc, device=a.device))
    x = a.to(acc)
    if cosine:
        norms = column_norms(x).clamp_min(torch.finfo(acc).tiny)
        x = x / norms
    index = torch.stack([torch.cat([r, c]), torch.cat([c, r])])
    gmat = torch.sparse_coo_tensor(index, torch.cat([g, g]), (n, n), check_invariants=False).coalesce()
    grad = torch.sparse.mm(gmat, x.t().contiguous()).t()  # [n, m] = G · xᵀ = (x · G)ᵀ
    if cosine:
        gv = g * values.to(acc)
        u = torch.zeros(n, dtype=acc, device=a.device).index_add_(0, r, gv).index_add_(0, c, gv)
        grad = (grad - x * u) / norms
    return grad.to(a.dtype).contiguous()


def expand_backward(grad_values, a, values, rows, cols, cosine: bool, chunk: int = EXPAND_CHUNK) -> torch.Tensor:
    """a · G (+ cosine's norm terms) from torch ops, any device: each non-zero x_bj (x = a, or
    a over its column norms) adds x_bj · G[j, c] to grad[b, c] for each selected partner c of j,
    at most `chunk` products at a time. O(m·n + k + T) work (a scan of a, the gradient's zeros,
    T = Σ_{non-zeros} deg(j) products); the sums
    by index_add_ (on CUDA in no fixed order: fp32 rounding may differ between runs)."""
    m, n = a.shape
    acc = accumulation_dtype(a.dtype)
    x = a.to(acc)
    if cosine:
        norms = column_norms(x).clamp_min(torch.finfo(acc).tiny)
        x = x / norms
    g = grad_values.to(acc)
    ptr, partner, slot = _partners(rows, cols, n)
    weight = g[slot]
    b, j = torch.nonzero(x, as_tuple=True)
    deg = ptr[j + 1] - ptr[j]
    has = deg > 0
    b, j, deg = b[has], j[has], deg[has]
    xv = x[b, j]
    grad = torch.zeros(m * n, dtype=acc, device=a.device)
    ends = deg.cumsum(0)
    start, count = 0, deg.numel()
    while start < count:  # non-zeros start .. stop, their products at most `chunk` (one non-zero may exceed it)
        before = int(ends[start - 1]) if start > 0 else 0
        stop = max(start + 1, int(torch.searchsorted(ends, before + chunk, right=True)))
        d = deg[start:stop]
        e = torch.repeat_interleave(torch.arange(start, stop, device=a.device), d)
        # the product's partner: latent j's entries from ptr[j], the t-th of non-zero e at ptr[j] + t
        t = torch.arange(e.numel(), device=a.device) - (ends[e] - deg[e] - before)
        p = ptr[j[e]] + t
        grad.index_add_(0, b[e] * n + partner[p], xv[e] * weight[p])
        start = stop
    grad = grad.view(m, n)
    if cosine:
        valid = rows >= 0
        gv = torch.where(valid, g * values.to(acc), torch.zeros((), dtype=acc, device=a.device))
        u = torch.zeros(n, dtype=acc, device=a.device).index_add_(0, rows.clamp_min(0), gv)
        u.index_add_(0, cols.clamp_min(0), gv)
        grad = (grad - x * u) / norms
    return grad.to(a.dtype).contiguous()


def gram_topk_sparse_backward(grad_out, indices, values, out_values, rows, cols, n: int, cosine: bool, impl: str = "auto"):
    """Gradient of gram_topk_sparse's selected scores w.r.t. values [B, L] (indices [B, L]
    int64, distinct per row). impl: "auto" (C++ on CPU when built, Triton on CUDA), "cpp",
    "triton" or "torch"."""
    if impl == "triton" or (impl == "auto" and sparse_triton.preferred(values)):
        return sparse_triton.padded_grad(indices, values, n, grad_out, out_values, rows, cols, cosine)
    kernel = _cpp("gram_topk_sparse_backward_cpu") if values.device.type == "cpu" and impl != "torch" else None
    if impl == "cpp" and kernel is None:
        raise RuntimeError("the C++ sparse backward needs aosae._C (rebuilt with csrc/gram_topk_backward.cpp) and CPU tensors")
    if kernel is not None:
        acc = accumulation_dtype(values.dtype)
        return kernel(grad_out.to(acc), indices.long(), values, out_values.to(acc), rows, cols, n, cosine)
    return sparse_backward_torch(grad_out, indices, values, out_values, rows, cols, n, cosine)


def sparse_backward_torch(grad_out, indices, values, out_values, rows, cols, n: int, cosine: bool):
    """The pure-torch sparse backward (any device):
      dot:    grad[t, s] = Σ_{s'} G[idx_ts, idx_ts'] · x_ts'
      cosine: grad[t, s] = (Σ_{s'} G[idx_ts, idx_ts'] · x̂_ts' − x̂_ts · u_{idx_ts}) / ‖f_{idx_ts}‖,
              x̂ = x / ‖f_idx‖, u_i = Σ_{p ∋ i} g_p v_p.
    G lookups are a binary search of the 2k selected keys for each (t, s, s'): O(B·L²·log k).
    Empty slots are masked to key −1 (matches no query), so nothing here syncs on CUDA.
    """
    acc = accumulation_dtype(values.dtype)
    valid = rows >= 0
    g = torch.where(valid, grad_out.to(acc), torch.zeros((), dtype=acc, device=values.device))
    r, c = rows.clamp_min(0), cols.clamp_min(0)
    if values.numel() == 0:
        return torch.zeros_like(values)
    idx = indices.long()
    x = values.to(acc)
    minus_one = torch.full_like(rows, -1)
    keys, order = torch.sort(torch.cat([torch.where(valid, r * n + c, minus_one), torch.where(valid, c * n + r, minus_one)]))
    gk = torch.cat([g, g])[order]
    if cosine:
        sq = torch.zeros(n, dtype=acc, device=x.device).index_add_(0, idx.flatten(), (x * x).flatten())
        inv = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
        y = x * inv[idx]  # x̂
    else:
        y = x
    B, L = idx.shape
    grad = torch.empty_like(x)
    step = max(1, SPARSE_CHUNK // max(1, L * L))
    for t0 in range(0, B, step):
        ib, yb = idx[t0 : t0 + step], y[t0 : t0 + step]
        q = (ib[:, :, None] * n + ib[:, None, :]).flatten()
        pos = torch.searchsorted(keys, q).clamp_max_(keys.numel() - 1)
        gq = torch.where(keys[pos] == q, gk[pos], torch.zeros((), dtype=acc, device=x.device))
        grad[t0 : t0 + step] = (gq.view(-1, L, L) * yb[:, None, :]).sum(dim=-1)
    if cosine:
        gv = g * out_values.to(acc)
        u = torch.zeros(n, dtype=acc, device=x.device).index_add_(0, r, gv).index_add_(0, c, gv)
        grad = (grad - y * u[idx]) * inv[idx]
    return grad.to(values.dtype)
