"""The penalty's selection that never pads: the best min(k, P) co-active latent pairs.

The paper's k is a share of all n(n−1)/2 pairs (k ≈ 2.7·10⁹ at n = 2²⁰), while a batch of B
tokens with L active latents each has at most P ≤ B·L(L−1)/2 co-active pairs (≈ 4·10⁶ at B
2048, L 64), and every other slot of a k-sized output would hold a zero. `coactive_topk`
returns the P pairs (or the best k of them) and nothing else:

    CSR rows (offsets, indices, values) -> compact the latent ids to the U active ones
    -> co-active pairs, summed over rows (C++ on CPU, Triton on CUDA, torch elsewhere)
    -> the best k by |C_ij| when k < P (sorted, or just the set with ordered=False); all P,
       unsorted by score, when k >= P.

Compacting the ids (a sort of the nnz indices) keeps every per-latent array O(U) with U ≤ nnz,
so the memory is O(B·L² + nnz) whatever n (2²⁴ and up) and k. The ids keep their order, so
the selection and its tie order are those of gram_topk on the densified matrix.

Differentiable w.r.t. values, with a backward that follows the non-zeros (csrc's
support backward / the Triton support_grad): no [B, n] tensor, no k-sized one.
`coactive_topk_dense` is the same selection for a dense [B, n] input with gram_topk's gradient.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from aosae.ops import extension as _extension
from aosae.ops.backends import sparse as sparse_backend
from aosae.ops.backends import sparse_triton
from aosae.ops.conventions import accumulation_dtype
from aosae.ops.gram_topk import FLOAT_DTYPES, INDEX_DTYPES, SIMILARITIES, TopKPairs, check_finite


def coactive_topk(
    offsets: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    n_latents: int,
    k: int,
    *,
    similarity: str = "dot",
    ordered: bool = True,
) -> TopKPairs:
    """The min(k, P) best latent pairs (i < j) of f [B, n_latents] given as CSR rows, P = the
    co-active pairs (both non-zero in some row) whose score is non-zero. Never padded.

    Args:
        offsets: [B+1] int64 (or int32) row pointers: row t holds entries offsets[t]:offsets[t+1];
            offsets[0] = 0, non-decreasing, offsets[B] = nnz. Rows may differ in length
            (BatchTopK, ReLU) or be empty. TopK rows of L entries: arange(B+1) * L.
        indices: [nnz] int64 (or int32) latent ids in [0, n_latents), distinct within a row, in
            any order.
        values: [nnz] float16/bfloat16/float32/float64 on the same device; f[t, indices[e]] =
            values[e]. Zeros are allowed (they score nothing but receive a gradient).
        n_latents: n >= 2. Only the ids that occur cost memory: n = 2²⁴ is fine.
        k: >= 1, any size (k larger than n(n−1)/2 or than P just means "every pair").
        similarity: "dot" (C = fᵀf) or "cosine" (C_ij / (‖f_i‖‖f_j‖), norms over these entries).
        ordered: False when only the set matters (a loss summing over it): for k < P the same
            k pairs (ties at the k-th |value| settled by (row, col) asc, as when sorted) without
            ordering them by score; the C++ kernel then lays them out as for k >= P and skips
            the sort of k keys.

    Returns:
        TopKPairs(values [s] float32 (float64 for float64 input), rows [s] int64, cols [s]
        int64), s = min(k, P), every entry a pair with a non-zero score. k < P: sorted by
        |value| desc, ties by (row, col) asc (gram_topk's order, its first s entries). k >= P:
        every pair, without sorting by score, grouped by row (the smaller latent) ascending;
        within a row the C++ kernel lists partners in order of first co-activation (row order;
        outlier rows summed by its GEMM block last), the torch and Triton paths by col
        ascending. k < P with ordered=False: the sorted output's set; C++ and torch group it
        by row as for k >= P, Triton keeps the sorted order. Deterministic for a given input
        and device. Differentiable w.r.t. values.
    """
    _validate(offsets, indices, values, n_latents, k, similarity)
    if not isinstance(ordered, bool):
        raise TypeError(f"ordered must be a bool, got {ordered!r}")
    args = (offsets.long(), indices.long(), values, n_latents, k, similarity, ordered)
    if torch.compiler.is_compiling():
        out = torch.ops.aosae.coactive_topk(*args)
    else:  # eager: the same functions without the custom op, whose dispatch imports torch._dynamo (≈ 2 s) on first use
        out = _Eager.apply(*args)
    return TopKPairs(*out[:3])


def _validate(offsets, indices, values, n_latents, k, similarity) -> None:
    for name, t in (("offsets", offsets), ("indices", indices), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"coactive_topk expects {name} as a torch.Tensor, got {type(t).__name__}")
    if offsets.dtype not in INDEX_DTYPES or indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"offsets and indices must be int64 (or int32), got {offsets.dtype} and {indices.dtype}")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"values must be float16/bfloat16/float32/float64, got {values.dtype}; use values.float()")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be 1-D [B+1] (CSR row pointers), got shape {tuple(offsets.shape)}")
    if indices.dim() != 1 or indices.shape != values.shape:
        raise ValueError(
            f"indices and values must both be 1-D [nnz] with the same length, got {tuple(indices.shape)} and "
            f"{tuple(values.shape)}; for TopK rows [B, L] pass indices.flatten(), values.flatten() and "
            "offsets = arange(B + 1) * L"
        )
    if not offsets.device == indices.device == values.device:
        raise ValueError(f"offsets ({offsets.device}), indices ({indices.device}) and values ({values.device}) "
                         "must be on the same device")
    if values.device.type == "meta":  # a shape without values: the selection reads them
        raise ValueError("offsets, indices and values are on the meta device (shapes without values): the penalty "
                         "needs the values; pass them on cpu or cuda")
    if isinstance(n_latents, bool) or not isinstance(n_latents, int) or n_latents < 2:
        raise ValueError(f"n_latents must be an int >= 2, got {n_latents!r}")
    _check_k_and_similarity(k, similarity)


def _check_k_and_similarity(k, similarity) -> None:
    # any k >= 1: the selection holds min(k, P) pairs, so k above n(n−1)/2 is no error here
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


def _check_data(offsets: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n: int) -> None:
    """Offsets, index range and finiteness in one host sync; the messages only on bad input."""
    nnz = indices.numel()
    bad = (offsets[0] != 0) | (offsets[-1] != nnz)
    if offsets.numel() > 1:
        bad = bad | (offsets[1:] < offsets[:-1]).any()
    if nnz:
        bad = bad | (indices.min() < 0) | (indices.max() >= n)
        bad = bad | ~torch.isfinite(torch.linalg.vector_norm(values.float(), float("inf")))
    if not bool(bad):
        return
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != nnz or (offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any())):
        raise ValueError(f"offsets must start at 0, never decrease and end at nnz = {nnz} "
                         f"(got offsets[0] = {first}, offsets[-1] = {last})")
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"indices must lie in [0, n_latents) = [0, {n}), got values in [{lo}, {hi}]")
    check_finite(values)


class Canonical(NamedTuple):
    """CSR rows with compact latent ids: cols ascending within each row, uniq[cols] = the ids."""

    row_ptr: torch.Tensor  # [B+1] int64
    cols: torch.Tensor  # [nnz] int64 in [0, U)
    vals: torch.Tensor  # [nnz] the input's dtype
    perm: Optional[torch.Tensor]  # canonical entry e is input entry perm[e]; None: the same order
    uniq: torch.Tensor  # [U] int64, the active latent ids ascending


def canonical(offsets: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, check: bool = True,
              n: Optional[int] = None) -> Canonical:
    """Compacts the latent ids (C++: a rank table when n <= 16·max(nnz, 4096), else a sort of the
    nnz ids with nothing n-sized; torch: a sort) and sorts each row by id
    where it is not sorted yet. check: raise on a latent repeated within a row (and, with n,
    on every other defect of the rows: offsets, range, NaN/Inf). One C++ pass on CPU."""
    module, _ = _extension.load()
    if values.device.type == "cpu" and module is not None and hasattr(module, "sparse_canonical_csr"):
        cols, vals, perm, uniq, status = module.sparse_canonical_csr(offsets, indices, values, n or 2**62)
        if status == 0:
            return Canonical(offsets, cols, vals, perm, uniq)
        if n is not None:
            _check_data(offsets, indices, values, n)  # raises the message that says what is wrong
    return _canonical_torch(offsets, indices, values, check)


def _canonical_torch(offsets, indices, values, check: bool) -> Canonical:
    nnz = indices.numel()
    uniq, inv = torch.unique(indices, sorted=True, return_inverse=True)
    u = uniq.numel()
    counts = offsets[1:] - offsets[:-1]
    row_of = torch.repeat_interleave(torch.arange(counts.numel(), device=indices.device), counts, output_size=nnz)
    key = row_of * u + inv  # (row, compact id): ascending iff every row is sorted and distinct
    if nnz < 2 or bool((key[1:] > key[:-1]).all()):
        return Canonical(offsets, inv, values, None, uniq)
    key, perm = torch.sort(key, stable=True)  # rows stay in place: only ids within a row move
    if check:
        repeat = key[1:] == key[:-1]
        if bool(repeat.any()):
            row = int(row_of[1:][repeat][0])
            raise ValueError(f"row {row} repeats a latent; each row must list distinct latents "
                             "(sum the duplicate activations first if that is what you mean)")
    return Canonical(offsets, key - row_of * u, values[perm], perm, uniq)


def _cpp():
    module, _ = _extension.load()
    return module if module is not None and hasattr(module, "sparse_csr_coactive") else None


def _route(vals: torch.Tensor) -> str:
    if sparse_triton.preferred(vals):
        return "triton"
    if vals.device.type == "cpu" and _cpp() is not None:
        return "cpp"
    return "torch"


def _empty(like: torch.Tensor):
    acc = accumulation_dtype(like.dtype)
    return (like.new_zeros(0, dtype=acc), like.new_zeros(0, dtype=torch.int64), like.new_zeros(0, dtype=torch.int64))


def select(c: Canonical, k: int, cosine: bool, impl: str = "auto", ordered: bool = True):
    """The selection on canonical rows: (values, rows, cols) in the original latent ids, then
    (rows, cols) in the compact ids (what support_grad takes). ordered=False: for k < P the
    same set, not sorted by score (C++ and torch: grouped by row as for k >= P)."""
    u = c.uniq.numel()
    if u < 2:
        return _empty(c.vals) + _empty(c.vals)[1:]
    impl = _route(c.vals) if impl == "auto" else impl
    if impl == "triton":
        values, rows, cols = sparse_triton.csr_topk(c.row_ptr, c.cols, c.vals, u, k, cosine, pad=False)
    elif impl == "cpp":  # writes the original ids itself (no second pass over the selection)
        return _cpp().sparse_csr_coactive(c.row_ptr, c.cols, c.vals, u, k, cosine, ordered, c.uniq)
    else:
        vals = c.vals.to(accumulation_dtype(c.vals.dtype))
        values, rows, cols = sparse_backend.csr_pairs_torch(c.row_ptr, c.cols, vals, u, cosine)
        if values.numel() > k:  # (row, col) order now: a stable sort by |value| keeps it for ties
            order = torch.argsort(values.abs(), descending=True, stable=True)[:k]
            if not ordered:  # back to (row, col) order, the C++ kernel's layout
                order = order.sort().values
            values, rows, cols = values[order], rows[order], cols[order]
    values = values.to(accumulation_dtype(c.vals.dtype))
    # index_select: ~5x faster than advanced indexing on CPU for millions of ids
    return values.contiguous(), c.uniq.index_select(0, rows), c.uniq.index_select(0, cols), rows, cols


def support_grad(c: Canonical, grad_out, out_values, rows, cols, cosine: bool, impl: str = "auto",
                 n: Optional[int] = None) -> torch.Tensor:
    """Gradient of the selected scores w.r.t. the canonical entries' values ([nnz], in the
    accumulation dtype, canonical order). rows/cols: the selection in the compact ids.
    n: any bound above the compact ids (default the number of distinct ids, len(c.uniq))."""
    acc = accumulation_dtype(c.vals.dtype)
    if rows.numel() == 0:
        return torch.zeros(c.cols.numel(), dtype=acc, device=c.vals.device)
    u = c.uniq.numel() if n is None else n
    impl = _route(c.vals) if impl == "auto" else impl
    if impl == "triton":
        grad = sparse_triton.support_grad(c.row_ptr, c.cols, c.vals, u, grad_out, out_values, rows, cols, cosine)
    elif impl == "cpp":
        module = _extension.require()
        # coactive_backward_cpu: the rows' own pairs, no transposed adjacency (csrc/coactive_backward.cpp)
        kernel = getattr(module, "coactive_backward_cpu", module.gram_topk_support_backward_cpu)
        grad = kernel(grad_out.to(acc), c.row_ptr, c.cols, c.vals.to(acc).contiguous(), out_values.to(acc), rows, cols,
                      u, cosine)
    else:
        grad = _support_grad_torch(c, grad_out.to(acc), out_values.to(acc), rows, cols, cosine)
    return grad.to(acc)


def _support_grad_torch(c: Canonical, g, out_values, r, q, cosine: bool) -> torch.Tensor:
    """grad[e] = Σ_{e' in e's row} G[c_e, c_e'] · y_e' (+ the cosine terms), G looked up by a
    binary search of the selected keys. Memory O(Σ_t L0_t²)."""
    u, x = int(c.cols.max()) + 1, c.vals.to(g.dtype)
    cols, row_ptr, nnz = c.cols, c.row_ptr, c.cols.numel()
    keys, order = torch.sort(torch.cat([r * u + q, q * u + r]))
    gk = torch.cat([g, g])[order]
    if cosine:
        sq = torch.zeros(u, dtype=x.dtype, device=x.device).index_add_(0, cols, x * x)
        inv = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
        y = x * inv[cols]
    else:
        y = x
    counts = row_ptr[1:] - row_ptr[:-1]
    row_of = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts, output_size=nnz)
    per_entry = counts[row_of]  # each entry meets every entry of its row (itself: G_ii = 0)
    total = int(per_entry.sum())
    first = torch.repeat_interleave(torch.arange(nnz, device=x.device), per_entry, output_size=total)
    start = torch.cumsum(per_entry, 0) - per_entry
    second = row_ptr[row_of[first]] + torch.arange(total, device=x.device) - start[first]
    query = cols[first] * u + cols[second]
    pos = torch.searchsorted(keys, query).clamp_max_(keys.numel() - 1)
    hit = torch.where(keys[pos] == query, gk[pos], torch.zeros((), dtype=x.dtype, device=x.device))
    grad = torch.zeros(nnz, dtype=x.dtype, device=x.device).index_add_(0, first, hit * y[second])
    if cosine:
        gv = g * out_values
        uu = torch.zeros(u, dtype=x.dtype, device=x.device).index_add_(0, r, gv).index_add_(0, q, gv)
        grad = (grad - y * uu[cols]) * inv[cols]
    return grad


# The op returns the selection twice, in the original ids (what callers get) and in the compact
# ids (what its backward needs: no search from ids back to ranks), and the canonical rows' compact
# cols and permutation (empty: the input order), so that the backward does not rebuild them.
def _forward(offsets, indices, values, n_latents: int, k: int, similarity: str, ordered: bool = True):
    c = _checked(offsets, indices, values, n_latents)
    perm = c.perm if c.perm is not None else indices.new_empty(0)
    return (*select(c, k, similarity == "cosine", ordered=ordered), c.cols, perm)


@torch.library.custom_op("aosae::coactive_topk", mutates_args=())
def _coactive_topk_op(
    offsets: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_latents: int, k: int, similarity: str,
    ordered: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(offsets, indices, values, n_latents, k, similarity, ordered)


def _checked(offsets, indices, values, n: int) -> Canonical:
    if values.device.type == "cpu" and _cpp() is not None:
        return canonical(offsets, indices, values, n=n)  # checks on the way
    _check_data(offsets, indices, values, n)
    return canonical(offsets, indices, values)


@_coactive_topk_op.register_fake
def _(offsets, indices, values, n_latents, k, similarity, ordered=True):
    ctx = torch.library.get_ctx()
    size = ctx.new_dynamic_size()
    ids = [values.new_empty((size,), dtype=torch.int64) for _ in range(4)]
    canon_cols = indices.new_empty(indices.shape)
    perm = indices.new_empty((ctx.new_dynamic_size(),))  # 0 or nnz
    return (values.new_empty((size,), dtype=accumulation_dtype(values.dtype)), *ids, canon_cols, perm)


@torch.library.custom_op("aosae::coactive_topk_backward", mutates_args=())
def _coactive_topk_backward_op(
    grad_out: torch.Tensor,
    offsets: torch.Tensor,
    values: torch.Tensor,
    canon_cols: torch.Tensor,
    canon_perm: torch.Tensor,
    out_values: torch.Tensor,
    rows_compact: torch.Tensor,
    cols_compact: torch.Tensor,
    similarity: str,
) -> torch.Tensor:
    return _backward_values(grad_out, offsets, values, canon_cols, canon_perm, out_values, rows_compact,
                            cols_compact, similarity)


def _backward_values(grad_out, offsets, values, canon_cols, canon_perm, out_values, rows_compact, cols_compact,
                     similarity: str) -> torch.Tensor:
    permuted = canon_perm.numel() > 0
    vals = values.index_select(0, canon_perm) if permuted else values
    c = Canonical(offsets, canon_cols, vals, canon_perm if permuted else None, canon_cols.new_empty(0))
    # the compact ids are ranks among at most nnz distinct ids: nnz bounds them
    grad = support_grad(c, grad_out, out_values, rows_compact, cols_compact, similarity == "cosine",
                        n=max(2, canon_cols.numel()))
    if permuted:
        grad = torch.empty_like(grad).index_copy_(0, canon_perm, grad)
    return grad.to(values.dtype)


@_coactive_topk_backward_op.register_fake
def _(grad_out, offsets, values, canon_cols, canon_perm, out_values, rows_compact, cols_compact, similarity):
    return torch.empty_like(values)


def _setup_context(ctx, inputs, output):
    offsets, _, values, _, _, similarity = inputs[:6]
    out_values, rows, cols, rows_compact, cols_compact, canon_cols, canon_perm = output
    ctx.save_for_backward(offsets, values, canon_cols, canon_perm, out_values, rows_compact, cols_compact)
    ctx.similarity = similarity
    ctx.mark_non_differentiable(rows, cols, rows_compact, cols_compact, canon_cols, canon_perm)
    # autograd would otherwise hand the backward a zero-filled gradient for each of the six id
    # outputs (selection- and nnz-sized: 88 ms of fill_ + their pages at n 16384, 8 % of the step)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *_grad_ids):
    if grad_out is None:
        return None, None, None, None, None, None, None
    grad = torch.ops.aosae.coactive_topk_backward(grad_out, *ctx.saved_tensors, ctx.similarity)
    return None, None, grad, None, None, None, None


_coactive_topk_op.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The op's forward, context and backward as a plain autograd.Function (eager mode)."""

    @staticmethod
    def forward(ctx, offsets, indices, values, n_latents, k, similarity, ordered):
        with torch.no_grad():
            output = _forward(offsets, indices, values, n_latents, k, similarity, ordered)
        _setup_context(ctx, (offsets, indices, values, n_latents, k, similarity, ordered), output)
        return output

    @staticmethod
    def backward(ctx, grad_out, *_grad_ids):
        if grad_out is None:
            return None, None, None, None, None, None, None
        grad = _backward_values(grad_out, *ctx.saved_tensors, ctx.similarity)
        return None, None, grad, None, None, None, None


def dense_to_csr(a: torch.Tensor):
    """Non-zeros of a dense [B, n] as CSR (row_ptr, cols ascending per row, vals): one C++ pass
    on CPU (vals in the accumulation dtype), torch elsewhere (vals in a's dtype)."""
    module, _ = _extension.load()
    if a.device.type == "cpu" and module is not None and hasattr(module, "sparse_dense_to_csr"):
        return module.sparse_dense_to_csr(a.detach())
    return sparse_backend.dense_to_csr_torch(a.detach(), keep_dtype=True)


class _Dense(torch.autograd.Function):
    """The selection on a's non-zeros; gram_topk's backward (the gradient at every entry of a)."""

    @staticmethod
    def forward(ctx, a, k, similarity, ordered):
        row_ptr, cols, vals = dense_to_csr(a)
        check_finite(vals)
        out = select(canonical(row_ptr, cols, vals, check=False), k, similarity == "cosine", ordered=ordered)[:3]
        ctx.save_for_backward(a, *out)
        ctx.similarity = similarity
        ctx.mark_non_differentiable(out[1], out[2])
        return out

    @staticmethod
    def backward(ctx, grad_values, _grad_rows, _grad_cols):
        a, values, rows, cols = ctx.saved_tensors
        if rows.numel() == 0:
            return torch.zeros_like(a), None, None, None
        grad = torch.ops.aosae.gram_topk_backward(grad_values, a, values, rows, cols, ctx.similarity)
        return grad, None, None, None


def coactive_topk_dense(a: torch.Tensor, k: int, *, similarity: str = "dot", ordered: bool = True) -> TopKPairs:
    """coactive_topk of a dense [B, n] (its non-zeros), with gram_topk's gradient w.r.t. every
    entry of a (zeros included), so it is a drop-in for gram_topk(a, k) that never pads.
    ordered: as in coactive_topk."""
    if not isinstance(a, torch.Tensor) or a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"coactive_topk_dense expects a floating tensor [B, n], got "
                        f"{a.dtype if isinstance(a, torch.Tensor) else type(a).__name__}; convert with a.float()")
    if a.dim() != 2:
        raise ValueError(f"coactive_topk_dense expects a 2-D tensor [B, n], got shape {tuple(a.shape)}")
    if a.shape[1] < 2:
        raise ValueError(f"coactive_topk_dense needs n >= 2 columns, got shape {tuple(a.shape)}")
    _check_k_and_similarity(k, similarity)
    if not isinstance(ordered, bool):
        raise TypeError(f"ordered must be a bool, got {ordered!r}")
    return TopKPairs(*_Dense.apply(a, k, similarity, ordered))
