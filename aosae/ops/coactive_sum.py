"""The penalty's sum when its selection would keep every co-active pair: one pass over the entries.

coactive_topk keeps the min(k, P) best of the P co-active pairs of CSR rows, and a loss that sums
|C_ij| over them needs only their sum. When k >= P and every value is positive (ReLU, TopK and
BatchTopK latents), every co-active pair is selected and C_ij > 0, so that sum is Σ_{i<j} C_ij,
and per row Σ_{i<j} f_ti f_tj = ((Σ_i f_ti)² − Σ_i f_ti²) / 2:

    Σ_{i<j} C_ij = Σ_t (s_t² − q_t) / 2,   s_t = Σ_i f_ti,  q_t = Σ_i f_ti²,
    ∂/∂f_ti = s_t − f_ti,

O(nnz) with no pair at all (cosine: the same on f_ti / ‖f_i‖). This is the common case at the
widths SAEs are trained at: TopK k 64 at B 2048 has at most 4.1 M co-active pairs, and the
paper's k = 0.5 % of n(n−1)/2 exceeds that from n ≈ 41 000 on (10.7 M at 2¹⁶, 2.7·10⁹ at 2²⁰);
BatchTopK's first steps at 2¹⁸, whose few dense rows hold ≈ 7·10⁷ pairs, are within k too.

P itself is only known after the pairs are summed, so `pairs_bound` bounds it from the rows:
for any set H of rows, P ≤ C(|U_H|, 2) + Σ_{t∉H} C(L_t, 2), U_H the latents H's rows touch.

When the bound does not prove P ≤ k (BatchTopK, whose batch puts thousands of latents on a few
tokens), `coactive_topk_sum` still sums the selection without listing it (C++, CPU, dot): the
sparse kernel finds the k-th best |C| and sums the pairs above it (plus the ties it keeps), and
its backward recomputes the scores and keeps the same pairs by that cut. Nothing is sized by k,
which at d_sae 262144 is 1.7·10⁸ pairs (6 GB written and differentiated by the selection).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from aosae.ops import extension as _extension
from aosae.ops.coactive_topk import Canonical, _checked, _validate
from aosae.ops.conventions import accumulation_dtype

# H = the rows of at least this many entries, for each threshold: BatchTopK's dense rows at
# initialisation (L in the thousands) and ReLU's outlier tokens (hundreds)
_DENSE_ROW_THRESHOLDS = (4096, 1024, 256, 64)


def pairs_bound(offsets: torch.Tensor, indices: torch.Tensor, k: Optional[int] = None,
                n_latents: Optional[int] = None) -> int:
    """An upper bound on the co-active pairs of CSR rows with distinct latents per row (exact
    when no pair occurs in two rows). With k, stops as soon as the bound is at most k, or as soon
    as no bound can be (one row alone has more than k pairs; a tier's other rows have). Indices
    outside [0, n_latents) (default: their largest + 1) leave the rows' own bound, Σ_t C(L_t, 2)."""
    lengths = (offsets[1:] - offsets[:-1]).long()
    row_pairs = lengths * (lengths - 1) // 2
    best = int(row_pairs.sum())
    if indices.numel() == 0 or (k is not None and (best <= k or int(row_pairs.max()) > k)):  # (a row's pairs are distinct: P > k)
        return best
    indices = indices.long()
    lo, hi = int(indices.min()), int(indices.max())
    n = hi + 1 if n_latents is None else int(n_latents)
    if lo < 0 or hi >= n:  # (the op's own checks name them)
        return best

    def distinct(idx: torch.Tensor) -> int:  # (a count per latent up to the largest: 0.12 ms at nnz 131072,
        return int(torch.bincount(idx).count_nonzero())  # where torch.unique took 3.5 ms and a bool mark 0.5–1.4 ms)

    # (the tiers that hold no row, or every non-empty row, are skipped without a pass over the rows)
    longest = int(lengths.max()) if lengths.numel() else 0
    shortest = int(lengths[lengths > 0].min()) if longest > 0 else 0
    row_of = None
    for threshold in _DENSE_ROW_THRESHOLDS:
        if threshold > longest:  # no dense row
            continue
        if shortest >= threshold:  # every non-empty row: the last bound below, counted once
            break
        dense = lengths >= threshold
        rest = int(row_pairs[~dense].sum())
        if k is not None and rest > k:  # (this tier cannot reach k)
            continue
        if row_of is None:
            row_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=indices.device), lengths,
                                             output_size=indices.numel())
        u = distinct(indices[dense[row_of]])
        best = min(best, u * (u - 1) // 2 + rest)
        if k is not None and best <= k:
            return best
    u = distinct(indices)
    return min(best, u * (u - 1) // 2)


def coactive_sum(offsets: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_latents: int, k: int, *,
                 similarity: str = "dot") -> Optional[torch.Tensor]:
    """Σ |C_ij| over coactive_topk(offsets, indices, values, n_latents, k, similarity)'s pairs,
    differentiable in values, when the rows prove that selection keeps every co-active pair and
    every value is positive; None otherwise (the caller then makes the selection, whose checks
    name any bad input). The same arguments as coactive_topk, and its checks when it answers; a 0-d tensor in the accumulation dtype (float32,
    float64 for float64 values), summed in float64."""
    _validate(offsets, indices, values, n_latents, k, similarity)
    if indices.numel() == 0 or torch.compiler.is_compiling():  # (the bound reads sizes back to the host)
        return None
    offsets, indices = offsets.long(), indices.long()
    if not _on_host(values):
        return _sum_one_sync(offsets, indices, values, n_latents, k, similarity)
    # cheap tests first (a declined call costs its caller the selection anyway): positive values
    # (NaN is not > 0) and sane offsets, then the bound; the op's own checks only when answering
    nnz = indices.numel()
    if not bool((values > 0).all()) or int(offsets[0]) != 0 or int(offsets[-1]) != nnz \
            or bool((offsets[1:] < offsets[:-1]).any()) or pairs_bound(offsets, indices, k, n_latents) > k:
        return None
    c = _checked(offsets, indices, values, n_latents)  # range, distinct latents per row, finite
    # canonical order moves entries within their rows only: the rows, and the sums, are the same
    v = values.index_select(0, c.perm) if c.perm is not None else values
    lengths = offsets[1:] - offsets[:-1]
    row_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=v.device), lengths, output_size=v.numel())
    return _row_formula(v, row_of, lengths.numel(), c.cols, c.uniq.numel(), similarity)


def _on_host(values: torch.Tensor) -> bool:
    """CPU with the C++ extension: its canonical pass checks the rows (a host sync costs nothing
    there). Elsewhere (CUDA) every check and the rows' own pair count come back in one sync."""
    return values.device.type == "cpu" and _extension.load()[0] is not None


def _sum_one_sync(offsets, indices, values, n: int, k: int, similarity: str) -> Optional[torch.Tensor]:
    """coactive_sum with every test in one host sync (an H200 step spent ≈ 1.5 ms in the ~8 syncs
    of the checks one by one, each draining the queue). No canonical order: the sum needs none,
    and a sort of (row, latent) keys finds a latent repeated within a row."""
    nnz, lengths = indices.numel(), offsets[1:] - offsets[:-1]
    # entry e's row, in range whatever the offsets (repeat_interleave would trust them)
    row_of = torch.searchsorted(offsets, torch.arange(nnz, device=offsets.device), right=True) - 1
    keys = torch.sort(row_of * n + indices).values
    sane = (values > 0).all() & (offsets[0] == 0) & (offsets[-1] == nnz) & (lengths >= 0).all()
    valid = ((indices >= 0) & (indices < n)).all() & torch.isfinite(values).all() & (keys[1:] != keys[:-1]).all()
    is_sane, is_valid, row_pairs = torch.stack([sane.long(), valid.long(), (lengths * (lengths - 1) // 2).sum()]).tolist()
    if not is_sane or (row_pairs > k and pairs_bound(offsets, indices, k, n) > k):
        return None
    if not is_valid:
        _checked(offsets, indices, values, n)  # raises the message that says what is wrong
    return _row_formula(values, row_of, lengths.numel(), indices, n, similarity)


def _row_formula(values: torch.Tensor, row_of: torch.Tensor, rows: int, cols: torch.Tensor, n_cols: int,
                 similarity: str) -> torch.Tensor:
    """Σ_t (s_t² − q_t) / 2 over the rows of values (entry e in row row_of[e], latent cols[e] <
    n_cols; cosine: each value over its latent's norm), summed in float64, returned in the
    accumulation dtype."""
    v = values.to(torch.float64)
    if similarity == "cosine":
        norms_sq = v.new_zeros(n_cols).index_add(0, cols, v * v)
        v = v * norms_sq.rsqrt().index_select(0, cols)  # > 0: every value is
    row_sums = v.new_zeros(rows).index_add(0, row_of, v)
    row_squares = v.new_zeros(rows).index_add(0, row_of, v * v)
    total = (row_sums.square() - row_squares).sum() / 2  # per row: no cancellation across rows
    return total.to(accumulation_dtype(values.dtype))


class TopKSum(NamedTuple):
    """coactive_topk_sum's answer: the sum, and what a caller logs without the pairs."""

    total: torch.Tensor  # 0-d, accumulation dtype, differentiable in values
    kept: int  # min(k, P): the pairs summed
    kth: float  # the k-th best |C_ij| (0 when fewer than k co-active pairs: every one is kept)


def coactive_topk_sum(offsets: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_latents: int, k: int, *,
                      similarity: str = "dot") -> Optional[TopKSum]:
    """Σ |C_ij| over coactive_topk(offsets, indices, values, n_latents, k, similarity=similarity)'s
    min(k, P) pairs, without writing them; differentiable in values (the same gradient as summing
    the selection). CPU with aosae._C and similarity "dot" only: None otherwise (the caller then
    makes the selection). The same arguments and checks as coactive_topk."""
    _validate(offsets, indices, values, n_latents, k, similarity)
    if torch.compiler.is_compiling() or similarity != "dot" or values.device.type != "cpu":
        return None  # (compiled: the loss's selection is the custom op, which the compiler traces)
    module, _ = _extension.load()
    if module is None or not hasattr(module, "sparse_csr_topk_sum"):
        return None
    with torch.no_grad():
        c = _checked(offsets.long(), indices.long(), values.detach(), n_latents)
    acc = accumulation_dtype(values.dtype)
    if c.uniq.numel() < 2:  # no pair: a zero that still reaches values (a zero gradient)
        return TopKSum((values * 0).sum().to(acc), 0, 0.0)
    # the forward's plan only where a backward can follow (needs_input_grad ignores no_grad)
    keep_plan = torch.is_grad_enabled() and values.requires_grad
    total, kept, kth = _TopKSum.apply(values, c, k, keep_plan)
    return TopKSum(total, kept, kth)


class _TopKSum(torch.autograd.Function):
    """The C++ sum on canonical rows; its backward re-derives the kept pairs from (kth, tie_cut), or
    reads them from the plan's kept bits (the bracketed sum, csrc/bracketed_sum.h)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, c: Canonical, k: int, keep_plan: bool):
        module = _extension.require()
        vals = c.vals.to(accumulation_dtype(values.dtype)).contiguous()
        u = c.uniq.numel()
        # the forward's plan (the latents' order, the block, every row pair's score: O(Σ_t L_t²), 16 MB at
        # TopK B 2048, L 64; from the bracketed sum a kept bit per row pair instead, 0.5 MB) is kept for
        # the backward, which otherwise derives it again (13.6 ms -> 5 ms at TopK d_sae 16384, and 1.3 ms
        # from the bits; benchmarks/NOTES.md)
        total, kth, tie_cut, kept, in_block, width, live_end, _, plan = module.sparse_csr_topk_sum(
            c.row_ptr, c.cols, vals, u, k, keep_plan=keep_plan)
        perm = c.perm if c.perm is not None else c.cols.new_empty(0)
        ctx.save_for_backward(c.row_ptr, c.cols, vals, perm, live_end)
        ctx.plan = plan
        ctx.u, ctx.kth, ctx.tie_cut, ctx.in_block, ctx.width = u, float(kth), int(tie_cut), int(in_block), int(width)
        ctx.dtype = values.dtype
        return total.to(vals.dtype), int(kept), float(kth)

    @staticmethod
    @once_differentiable  # the backward is a kernel: a second derivative would silently be zero
    def backward(ctx, grad_total, _grad_kept, _grad_kth):
        row_ptr, cols, vals, perm, live_end = ctx.saved_tensors
        grad = _extension.require().sparse_csr_topk_sum_backward(float(grad_total), row_ptr, cols, vals, ctx.u,
                                                                 ctx.kth, ctx.tie_cut, ctx.width, ctx.in_block,
                                                                 live_end=live_end, plan=ctx.plan)
        ctx.plan = None  # (its buffers go back now, not with the graph)
        if perm.numel() > 0:  # canonical order -> the caller's
            grad = torch.empty_like(grad).index_copy_(0, perm, grad)
        return grad.to(ctx.dtype), None, None, None
