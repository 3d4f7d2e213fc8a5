"""gram_topk for TopK SAEs that already hold their activations as (indices, values) per token.

A TopK SAE's encoder returns, for each of B tokens, the L latents it kept and their
activations. `gram_topk_sparse` finds the k most correlated latent pairs of the implied
[B, n_latents] matrix without ever building it: work O(B·L²), memory O(B·L² + k + n).
It is the custom op `aosae::gram_topk_sparse` (fake kernel + autograd), differentiable
with respect to `values`.

The output is padded to k slots (gram_topk's contract, for direct callers): k·20 bytes (fp32
value, two int64 ids), which at the paper's fraction 0.005 (k ≈ 0.0025·n²) is 3.4 GB at
n = 2¹⁸, 14 GB at 2¹⁹ and 55 GB at 2²⁰: past n ≈ 2¹⁹ it no longer fits in memory. The
training path (TopKOrthoLoss.from_topk / from_sparse) uses aosae.ops.coactive_topk instead,
which returns only the min(k, P) co-active pairs and never pads.

Duplicate latent indices inside one row are an error (a TopK encoder never produces them;
summing them silently would hide a bug upstream). Entries whose value is 0 are allowed
(e.g. a TopK slot after ReLU) and contribute nothing to the forward, but still receive a
gradient.
"""
from __future__ import annotations

import torch

from aosae.ops.backends import sparse as sparse_backend
from aosae.ops.backends import sparse_triton
from aosae.ops.backward import gram_topk_sparse_backward
from aosae.ops.gram_topk import FLOAT_DTYPES, INDEX_DTYPES, TopKPairs, check_finite, validate_k_and_similarity
from aosae.ops.conventions import accumulation_dtype, empty_pairs


def gram_topk_sparse(
    indices: torch.Tensor,
    values: torch.Tensor,
    n_latents: int,
    k: int,
    *,
    similarity: str = "dot",
) -> TopKPairs:
    """The k latent pairs (i < j) with the largest |C_ij|, C = fᵀf, where f [B, n_latents]
    is given by its non-zeros: f[t, indices[t, s]] = values[t, s].

    Args:
        indices: [B, L] int64 (or int32), latent ids in [0, n_latents), distinct within a row.
        values: [B, L] float16/bfloat16/float32/float64 on the same device; the activations.
            Scores are accumulated in float32 (float64 for float64 values).
        n_latents: n, the number of latents (columns of f), >= 2.
        k: number of pairs, 1 <= k <= n(n-1)/2.
        similarity: "dot" (|f_i · f_j|) or "cosine" (|f_i · f_j| / (‖f_i‖‖f_j‖), norms over
            the B rows from the given entries; a latent never active has cosine 0).

    Returns:
        TopKPairs(values [k] float32 (float64 for float64 input), rows [k] int64,
        cols [k] int64): the same result as gram_topk(f, k, similarity=...) on the
        densified f, sorted by |value| desc then (row, col) asc, empty slots (0, -1, -1).
        Differentiable with respect to `values`.
    """
    _validate(indices, values, n_latents, k, similarity)
    out = torch.ops.aosae.gram_topk_sparse(indices.long(), values, n_latents, k, similarity)
    return TopKPairs(*out)


def _validate(indices, values, n_latents, k, similarity) -> None:
    if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError("gram_topk_sparse expects indices and values as torch.Tensor")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be int64 (or int32), got {indices.dtype}; use indices.long()")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"values must be float16/bfloat16/float32/float64, got {values.dtype}; use values.float()")
    if indices.dim() != 2 or indices.shape != values.shape:
        raise ValueError(
            f"indices and values must both be [B, L] with the same shape, got {tuple(indices.shape)} "
            f"and {tuple(values.shape)} (one row per token, one column per kept latent)"
        )
    if indices.device != values.device:
        raise ValueError(f"indices ({indices.device}) and values ({values.device}) must be on the same device")
    if isinstance(n_latents, bool) or not isinstance(n_latents, int) or n_latents < 2:
        raise ValueError(f"n_latents must be an int >= 2, got {n_latents!r}")
    validate_k_and_similarity(k, n_latents, similarity)


def _check_data(indices: torch.Tensor, values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks range, duplicates and finiteness; returns (indices sorted within each row [B, L],
    the permutation that sorts them [B, L]). One host sync for all checks (on CUDA each
    bool()/int() waits for the device); the detailed message is built only on bad input."""
    sorted_idx, perm = torch.sort(indices, dim=1)
    if indices.numel() == 0:
        return sorted_idx, perm
    bad = (sorted_idx[:, 0].min() < 0) | (sorted_idx[:, -1].max() >= n)
    bad = bad | ~torch.isfinite(torch.linalg.vector_norm(values.float(), float("inf")))
    if sorted_idx.shape[1] > 1:
        bad = bad | (sorted_idx[:, 1:] == sorted_idx[:, :-1]).any()
    if not bool(bad):
        return sorted_idx, perm
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"indices must lie in [0, n_latents) = [0, {n}), got values in [{lo}, {hi}]")
    check_finite(values)
    row = int((sorted_idx[:, 1:] == sorted_idx[:, :-1]).any(dim=1).nonzero()[0])
    raise ValueError(
        f"row {row} of indices repeats a latent; each row must list distinct latents "
        f"(sum the duplicate activations first if that is what you mean)"
    )


def to_csr(indices: torch.Tensor, values: torch.Tensor, n: int):
    """(indices, values) [B, L] -> CSR (row_ptr [B+1], cols [nnz], vals [nnz] in the
    accumulation dtype) of the non-zero entries, cols ascending per row."""
    ext = sparse_backend.cpp_module() if values.device.type == "cpu" else None
    if ext is not None and hasattr(ext, "sparse_topk_to_csr"):  # one pass instead of a dozen small ops
        row_ptr, cols, vals, ok = ext.sparse_topk_to_csr(indices.long(), values, n)
        if ok:
            return row_ptr, cols, vals
        _check_data(indices, values, n)  # raises the message that says what is wrong
    acc = accumulation_dtype(values.dtype)
    sorted_idx, perm = _check_data(indices, values, n)
    vals = torch.gather(values, 1, perm).to(acc)
    mask = vals != 0
    row_ptr = torch.zeros(indices.shape[0] + 1, dtype=torch.int64, device=indices.device)
    row_ptr[1:] = torch.cumsum(mask.sum(dim=1), 0)
    return row_ptr, sorted_idx[mask], vals[mask]


@torch.library.custom_op("aosae::gram_topk_sparse", mutates_args=())
def _gram_topk_sparse_op(
    indices: torch.Tensor, values: torch.Tensor, n_latents: int, k: int, similarity: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if sparse_triton.preferred(values):
        _check_data(indices, values, n_latents)  # the rows are read in place, zeros and all
        out = sparse_triton.padded_topk(indices, values, n_latents, k, similarity == "cosine")
    else:
        row_ptr, cols, vals = to_csr(indices, values, n_latents)
        out = sparse_backend.csr_topk(row_ptr, cols, vals, n_latents, k, similarity == "cosine")
    return tuple(t.contiguous() for t in out)


@_gram_topk_sparse_op.register_fake
def _(indices, values, n_latents, k, similarity):
    return empty_pairs(values, k)


@torch.library.custom_op("aosae::gram_topk_sparse_backward", mutates_args=())
def _gram_topk_sparse_backward_op(
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    out_values: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    n_latents: int,
    similarity: str,
) -> torch.Tensor:
    return gram_topk_sparse_backward(grad_out, indices, values, out_values, rows, cols, n_latents, similarity == "cosine")


@_gram_topk_sparse_backward_op.register_fake
def _(grad_out, indices, values, out_values, rows, cols, n_latents, similarity):
    return torch.empty_like(values)


def _setup_context(ctx, inputs, output):
    indices, values, n_latents, _, similarity = inputs
    out_values, rows, cols = output
    ctx.save_for_backward(indices, values, out_values, rows, cols)
    ctx.n_latents = n_latents
    ctx.similarity = similarity


def _backward(ctx, grad_out, grad_rows, grad_cols):
    indices, values, out_values, rows, cols = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    grad_values = torch.ops.aosae.gram_topk_sparse_backward(
        grad_out, indices, values, out_values, rows, cols, ctx.n_latents, ctx.similarity
    )
    return None, grad_values, None, None, None


_gram_topk_sparse_op.register_autograd(_backward, setup_context=_setup_context)
