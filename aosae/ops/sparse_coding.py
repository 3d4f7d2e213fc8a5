"""The sparse SAE step: encode to (offsets, indices, values), decode from them, and a backward
that follows the kept entries only.

A TopK / BatchTopK SAE (or a ReLU SAE once its latents are sparse) keeps nnz ≪ B·n latents.
Decoding them densely ([B, n] × [n, d]) and back-propagating a dense [B, n] gradient into the
encoder costs ≈ 10·B·d·n FLOPs per step; decoding from the kept entries and giving the encoder
gradient only to them costs 2·B·d·n (the encoder product, which an exact selection needs) +
O(nnz·d). Everything here is built from two primitives:

    segment_gather_sum(offsets, gather_idx, weights, table) -> out [S, d]
        out[s] = Σ_{e in segment s} weights[e] · table[gather_idx[e]]
        decode (segments = tokens, table = W_dec), W_dec's gradient (segments = latents,
        table = ∂L/∂x̂) and W_enc's gradient (segments = latents, table = x − b_dec).
    gathered_dot(rows_a, rows_b, A, B) -> out [nnz] = <A[rows_a[e]], B[rows_b[e]]>
        the gradient of the decoder w.r.t. the kept values (A = ∂L/∂x̂, B = W_dec).

On CPU they are torch's own sparse kernels at the memory floor (embedding_bag in "sum" mode
with per-sample weights; sampled_addmm, an SDDMM; the weights' gradients, `latent_gradient`, a
CSR × dense product into memory kept between steps, aosae.ops.kept_gradients); on CUDA (or on
CPU under Triton's interpreter with AOSAE_SPARSE_TRITON=1) the Triton kernels of
aosae.ops.backends.sparse_coding_triton. sparse_coding_reference.py is the dense oracle.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from aosae.ops import extension
from aosae.ops.kept_gradients import gradient_buffer
from aosae.ops.latent_selection import (ENCODE_ACTIVATIONS, TOPK_TILE, offsets_of, positive_rows, select, tile_buffer,
                                       tiled_topk, topk_rows)

FORCE_TRITON_ENV = "AOSAE_SPARSE_TRITON"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SparseLatents(NamedTuple):
    """B rows of latents in CSR form: row t holds latents indices[offsets[t]:offsets[t+1]]
    (distinct within a row) with values values[offsets[t]:offsets[t+1]].

    offsets [B+1] int64, indices [nnz] int64, values [nnz] float (differentiable), n_latents: int.
    TopK rows have offsets = arange(B+1)·k; BatchTopK and ReLU rows are ragged (some empty).
    """

    offsets: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    n_latents: int

    @property
    def batch(self) -> int:
        return self.offsets.numel() - 1

    def rows(self) -> torch.Tensor:
        """The row (token) of every entry, [nnz] int64."""
        return token_of_entry(self.offsets, self.indices.numel())

    def to_dense(self) -> torch.Tensor:
        """The latents as a dense [B, n_latents] tensor (differentiable w.r.t. values)."""
        dense = self.values.new_zeros(self.batch, self.n_latents)
        return dense.index_put((self.rows(), self.indices), self.values)

    def l0(self) -> torch.Tensor:
        """Non-zero latents per row, [B] int64 (kept entries whose value is 0 do not count)."""
        nonzero = (self.values.detach() != 0).long()
        return torch.zeros(self.batch, dtype=torch.long, device=nonzero.device).index_add_(0, self.rows(), nonzero)


def token_of_entry(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """CSR row pointers [S+1] -> the segment of each of the nnz entries, [nnz] int64."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts, output_size=nnz)


def group_by(keys: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries grouped by key: (order [nnz]: entry ids sorted by key (stable), offsets [n_groups+1]).

    On CPU a counting sort in aosae._C (csrc/sparse_coding.cpp): torch's parallel argsort is
    10–250× slower on a loaded 2-core machine (benchmarks/NOTES.md). Elsewhere torch.argsort."""
    if keys.device.type == "cpu" and keys.dtype == torch.int64:
        module, _ = extension.load()
        if module is not None and hasattr(module, "group_by_key"):
            order, offsets, ok = module.group_by_key(keys, n_groups)
            if not ok:
                raise ValueError(f"keys must lie in [0, {n_groups}), got values in [{int(keys.min())}, {int(keys.max())}]")
            return order, offsets
    return torch.argsort(keys, stable=True), offsets_of(keys, n_groups)


# ----------------------------------------------------------------------------- the two primitives
def _triton_module(t: torch.Tensor):
    """aosae.ops.backends.sparse_coding_triton when it should run on t: CUDA tensors, or CPU ones
    under TRITON_INTERPRET=1 with AOSAE_SPARSE_TRITON=1 (the convention of sparse_triton.py).
    None otherwise, or when that module (or Triton) is not installed."""
    if t.device.type != "cuda" and os.environ.get(FORCE_TRITON_ENV, "0") != "1":
        return None
    try:
        module = importlib.import_module("aosae.ops.backends.sparse_coding_triton")
    except ImportError:
        return None
    return module if module.usable(t) else None


def _check_index(name: str, t: torch.Tensor, n: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
        what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a 1-D int64 tensor, got {what}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} must have {n} entries, got {t.numel()}")


def _check_table(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in FLOAT_DTYPES:
        what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a 2-D float tensor [rows, d], got {what}")


def segment_gather_sum(
    offsets: torch.Tensor, gather_idx: torch.Tensor, weights: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """out[s] = Σ_{e in [offsets[s], offsets[s+1])} weights[e] · table[gather_idx[e]].

    offsets [S+1] int64 (non-decreasing, offsets[0] = 0, offsets[-1] = nnz), gather_idx [nnz]
    int64 in [0, R), weights [nnz] float, table [R, d] float -> out [S, d] in table's dtype
    (empty segments give zero rows). Not differentiable by itself: the autograd of the sparse
    encode / decode below calls it in both directions.
    """
    _check_index("offsets", offsets)
    _check_index("gather_idx", gather_idx)
    if not isinstance(weights, torch.Tensor) or weights.dtype not in FLOAT_DTYPES or weights.shape != gather_idx.shape:
        what = f"{weights.dtype} {tuple(weights.shape)}" if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise TypeError(f"weights must be a 1-D float tensor like gather_idx [{gather_idx.numel()}], got {what}")
    _check_table("table", table)
    if offsets.numel() < 1:
        raise ValueError("offsets must hold at least one entry (S + 1 row pointers, offsets[0] = 0)")
    module = _triton_module(table)
    if module is not None:
        return module.segment_gather_sum(offsets, gather_idx, weights, table)
    if gather_idx.numel() == 0:
        return table.new_zeros(offsets.numel() - 1, table.shape[1])
    # embedding_bag "sum" with per-sample weights is exactly this, at the memory floor
    # (measured in benchmarks/NOTES.md); it wants one dtype for the weights and the table
    return F.embedding_bag(
        gather_idx.long(), table, offsets.long(), mode="sum",
        per_sample_weights=weights.to(table.dtype), include_last_offset=True,
    )


def gathered_dot(rows_a: torch.Tensor, rows_b: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """out[e] = <A[rows_a[e]], B[rows_b[e]]>, [nnz] in float32 (float64 for float64 inputs).

    rows_a, rows_b [nnz] int64; A [Ra, d], B [Rb, d]. The (rows_a, rows_b) pairs must be
    distinct (they are: one per kept latent of a token).
    """
    _check_index("rows_a", rows_a)
    _check_index("rows_b", rows_b, rows_a.numel())
    _check_table("A", A)
    _check_table("B", B)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"A and B must have the same width, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    out_dtype = torch.float64 if torch.float64 in (A.dtype, B.dtype) else torch.float32
    module = _triton_module(A)
    if module is not None:
        return module.gathered_dot(rows_a, rows_b, A, B)
    nnz = rows_a.numel()
    if nnz == 0:
        return A.new_zeros(0, dtype=out_dtype)
    # An SDDMM: (A Bᵀ) read at the pattern (rows_a, rows_b) by torch's sampled_addmm, which
    # wants the pattern as CSR over A's rows, so entries are visited grouped by rows_a
    rows_a, rows_b = rows_a.long(), rows_b.long()
    grouped = bool((rows_a[1:] >= rows_a[:-1]).all())
    if grouped:  # e.g. the unordered selection's pairs, which come out grouped by their first latent
        order, crow = None, offsets_of(rows_a, A.shape[0])
    else:
        order, crow = group_by(rows_a, A.shape[0])  # counting sort on CPU (argsort: see group_by)
        rows_a, rows_b = rows_a.index_select(0, order), rows_b.index_select(0, order)
    a, b = A.to(out_dtype), B.to(out_dtype)
    pattern = _csr(crow, rows_b, a.new_zeros(nnz), (A.shape[0], B.shape[0]))
    out = torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()
    if order is not None:
        out = torch.empty_like(out).index_copy_(0, order, out)
    return out


def latent_gradient(latent_offsets: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """segment_gather_sum with segments = latents (entries grouped by latent, each latent's tokens
    ascending and distinct): a weight's gradient [n, d]. On CPU in float32 / float64 (outside a
    differentiable backward) it is written into memory kept for `weight` between steps
    (kept_gradients.gradient_buffer: no page faults) by a CSR × dense product, as fast as
    embedding_bag on memory already touched (benchmarks/NOTES.md, thirty-second pass)."""
    n = latent_offsets.numel() - 1
    if (table.device.type != "cpu" or table.dtype not in (torch.float32, torch.float64) or weight.dtype != table.dtype
            or torch.is_grad_enabled()):  # (create_graph: a product with out= has no autograd)
        return segment_gather_sum(latent_offsets, tokens, weights, table)
    out = gradient_buffer(weight, n, table.shape[1])
    if tokens.numel() == 0:
        return out.zero_()
    if not torch.backends.mkl.is_available():
        out.zero_()  # (MKL's product with beta 0 never reads out; torch's own may scale it: 0 · NaN)
    by_latent = _csr(latent_offsets.long(), tokens.long(), weights.to(table.dtype), (n, table.shape[0]))
    return torch.addmm(out, by_latent, table, beta=0.0, out=out)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple) -> torch.Tensor:
    """A CSR matrix from rows the caller built valid (no invariant check)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": these uses are covered by tests
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


# ----------------------------------------------------------------------------- autograd
def _layout_of(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """grad in param's memory layout, so that autograd keeps it as param.grad without another
    copy: row-major, or column-major for a W_enc stored as the transpose of a [n, d] buffer
    (SparseAutoencoder does: its gradient is then built in place, ≈ 0.14 s less per step at
    n 16384, d 576 than transposing it)."""
    if param.t().is_contiguous() and not param.is_contiguous():
        return grad if grad.t().is_contiguous() else grad.t().contiguous().t()
    return grad.contiguous()


class _SparseEncode(torch.autograd.Function):
    """x [B, d] -> (offsets, indices, values, pre [B, n], or empty when nobody asked for it); the
    gradient w.r.t. the values follows the kept entries only; pre's gradient (when a caller uses
    pre) is added densely."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, activation, k, threshold, max_nnz, want_pre):
        # pre only selected from (nobody asked for it) on CPU outside autocast (where addmm with out= would keep
        # the buffer's dtype): TopK's never written whole, BatchTopK's and ReLU's written into this thread's
        # kept tile, so no fresh [B, n] pages each step (benchmarks/NOTES.md, thirty-first and -second passes)
        unread = not want_pre and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") \
            and activation != "jumprelu"
        if unread and activation == "topk":
            offsets, indices, values = topk_rows(*tiled_topk(x - b_dec, W_enc, b_enc, k, TOPK_TILE), ascending=True)
        else:
            centered = x - b_dec
            pre = torch.addmm(b_enc, centered, W_enc,
                              out=tile_buffer(x.shape[0], W_enc.shape[1], centered) if unread else None)
            # (values: copies, never views of pre)
            found = positive_rows(pre, max_nnz) if activation == "relu" else select(pre, activation, k, threshold)
            if found is None:  # ReLU, too dense (more than max_nnz): the caller runs the dense path from pre
                found = pre.new_zeros(0, dtype=torch.long), pre.new_zeros(0, dtype=torch.long), pre.new_zeros(0)
            offsets, indices, values = found
        if unread:
            pre = x.new_empty(0)
        ctx.save_for_backward(x, W_enc, b_dec, offsets, indices, values)
        ctx.mark_non_differentiable(offsets, indices, *([pre] if unread else []))
        ctx.set_materialize_grads(False)
        return offsets, indices, values, pre

    @staticmethod
    def backward(ctx, _g_offsets, _g_indices, g_values, g_pre):
        x, W_enc, b_dec, offsets, indices, values = ctx.saved_tensors
        n = W_enc.shape[1]
        need_x, need_w, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
        centered = x - b_dec
        grad_x = grad_w = grad_b_enc = grad_b_dec = None
        if g_values is not None:
            # ReLU: a kept slot holding 0 (TopK) passes no gradient
            g = torch.where(values > 0, g_values, 0).to(W_enc.dtype)
            grad_b_enc = W_enc.new_zeros(n).index_add_(0, indices, g)
            if need_w:  # ∂L/∂W_enc[:, j] = Σ_{t: j kept in t} g_tj (x_t − b_dec), grouped by latent j
                rows = token_of_entry(offsets, indices.numel())
                order, latent_offsets = group_by(indices, n)
                grad_w = latent_gradient(latent_offsets, rows[order], g[order], centered, W_enc).t()  # [n, d] -> [d, n]
            if need_x:
                grad_x = segment_gather_sum(offsets, indices, g, W_enc.t())
        if g_pre is not None:  # someone used the dense pre-activations: their gradient is dense
            g_pre = g_pre.to(W_enc.dtype)
            grad_b_enc = g_pre.sum(0) if grad_b_enc is None else grad_b_enc + g_pre.sum(0)
            dense_w = centered.t() @ g_pre if need_w else None
            grad_w = dense_w if grad_w is None else (grad_w + dense_w if dense_w is not None else grad_w)
            if need_x:
                dense_x = g_pre @ W_enc.t()
                grad_x = dense_x if grad_x is None else grad_x + dense_x
        if need_b_dec and grad_b_enc is not None:  # pre = (x − b_dec) W_enc + b_enc
            grad_b_dec = -(W_enc @ grad_b_enc)
        if grad_w is not None:
            grad_w = _layout_of(grad_w, W_enc)
        return (grad_x, grad_w, grad_b_enc if need_b_enc else None, grad_b_dec, None, None, None, None, None)


class _SparseDecode(torch.autograd.Function):
    """(offsets, indices, values) -> x̂ = Σ values · W_dec[indices] + b_dec, backward through the
    two primitives."""

    @staticmethod
    def forward(ctx, offsets, indices, values, W_dec, b_dec):
        x_hat = segment_gather_sum(offsets, indices, values, W_dec) + b_dec
        ctx.save_for_backward(offsets, indices, values, W_dec)
        return x_hat

    @staticmethod
    def backward(ctx, g):
        offsets, indices, values, W_dec = ctx.saved_tensors
        need_values, need_w, need_b = ctx.needs_input_grad[2:5]
        g = g.contiguous()
        rows = token_of_entry(offsets, indices.numel())
        grad_values = grad_w = None
        if need_values:
            grad_values = gathered_dot(rows, indices, g, W_dec).to(values.dtype)
        if need_w:
            order, latent_offsets = group_by(indices, W_dec.shape[0])
            grad_w = latent_gradient(latent_offsets, rows[order], values[order], g.to(W_dec.dtype), W_dec)
        grad_b = g.sum(0) if need_b else None
        return None, None, grad_values, grad_w, grad_b


def _check_encode_args(x, W_enc, b_enc, b_dec, activation, k, threshold) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [B, d_in], got {tuple(x.shape) if isinstance(x, torch.Tensor) else x!r}")
    d, n = W_enc.shape
    if x.shape[1] != d or b_enc.shape != (n,) or b_dec.shape != (d,):
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)} (want [d_in, n]), "
            f"b_enc {tuple(b_enc.shape)} (want [{n}]), b_dec {tuple(b_dec.shape)} (want [{d}])"
        )
    if activation not in ENCODE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {ENCODE_ACTIVATIONS}, got {activation!r}")
    if activation in ("topk", "batchtopk"):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"activation={activation!r} needs an int k in [1, n={n}], got k={k!r}")
    if activation == "jumprelu" and threshold is None:
        raise ValueError("activation='jumprelu' needs a threshold (a float, a 0-d tensor or one per latent)")


def sparse_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    activation: str,
    k: Optional[int] = None,
    threshold=None,
    *,
    return_pre: bool = False,
    max_nnz: Optional[int] = None,
):
    """x [B, d_in] -> SparseLatents of act((x − b_dec) W_enc + b_enc), values differentiable w.r.t.
    W_enc, b_enc, b_dec (and x if it requires grad), the gradient following the kept entries.

    activation: "topk" (k per row), "batchtopk" (B·k over the batch), "relu" (the non-zeros), or
    "jumprelu" (entries above `threshold`). The dense pre-activations [B, n] are computed (an exact
    selection needs them) and returned too with return_pre=True: (SparseLatents, pre), pre
    differentiable (a dense gradient then, only if the caller uses it). Without return_pre, on CPU
    outside autocast, TopK never writes them whole (tiled_topk) and BatchTopK and ReLU write them
    into this thread's kept tile (latent_selection.tile_buffer): no fresh [B, n] pages each call.

    max_nnz (ReLU's dense phase): when more than max_nnz entries are positive nothing is selected
    and the latents come back as None (use return_pre=True and the dense pre then).
    """
    _check_encode_args(x, W_enc, b_enc, b_dec, activation, k, threshold)
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.detach()
    if max_nnz is not None and activation != "relu":
        raise ValueError(f"max_nnz is for activation='relu' (its dense phase), got activation={activation!r}")
    offsets, indices, values, pre = _SparseEncode.apply(x, W_enc, b_enc, b_dec, activation, k, threshold, max_nnz,
                                                        return_pre)
    latents = SparseLatents(offsets, indices, values, W_enc.shape[1]) if offsets.numel() else None
    return (latents, pre) if return_pre else latents


def sparse_decode(latents: SparseLatents, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """x̂ [B, d] = Σ_e values[e] · W_dec[indices[e]] (per row) + b_dec, differentiable w.r.t. the
    values, W_dec and b_dec; nothing [B, n] is built in either direction."""
    offsets, indices, values, n = latents
    if W_dec.dim() != 2 or W_dec.shape[0] != n or b_dec.shape != (W_dec.shape[1],):
        raise ValueError(f"W_dec must be [n_latents={n}, d] and b_dec [d], got {tuple(W_dec.shape)} and {tuple(b_dec.shape)}")
    return _SparseDecode.apply(offsets, indices, values, W_dec, b_dec)
