"""gram_topk whose gradient is kept on the support of its input: for ReLU latents.

Upstream of a ReLU, the gradient of any loss w.r.t. the latents a is masked to their non-zeros
by the ReLU's own backward, so only those entries ever reach the SAE's parameters.
`gram_topk_on_support(a, k)` selects the same pairs as `gram_topk(a, k)`; its backward returns
the gradient at the non-zeros of a only, as a sparse COO tensor. No dense [B, n] gradient is
allocated for the penalty (at B = 2048, n = 16384 its first-touch page faults alone cost more
than the penalty's work), and autograd adds the few entries into the dense gradient that the
decoder sends to a.

Exact for everything upstream of a ReLU (or TopK). It is NOT the gradient w.r.t. a at its
zeros, which `gram_topk`'s contract gives: use `gram_topk` when a itself is what you
differentiate. CPU with aosae._C (C++ backward), or CUDA with Triton (the backward of the
Triton sparse kernels, aosae/ops/backends/sparse_triton.py); `available()` says whether it can run.
"""
from __future__ import annotations

import torch

from aosae.ops import coactive_topk as _coactive
from aosae.ops import extension as _extension
from aosae.ops.backends import sparse as sparse_backend
from aosae.ops.backends import sparse_triton
from aosae.ops.gram_topk import TopKPairs, check_finite, gram_topk, num_pairs, validate


def _ext():
    module, _ = _extension.load()
    if module is None or not hasattr(module, "gram_topk_support_backward_cpu"):
        return None
    return module


def available(a: torch.Tensor) -> bool:
    """Whether gram_topk_on_support runs on a: CPU float32/float64 with aosae._C built with it,
    or CUDA float16/bfloat16/float32 with Triton."""
    if sparse_triton.preferred(a):
        return True
    ext = _ext()
    return a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) and ext is not None \
        and hasattr(ext, "sparse_dense_to_csr")


def _to_csr(a: torch.Tensor):
    if sparse_triton.preferred(a):
        return sparse_backend.dense_to_csr_torch(a, keep_dtype=True)
    return _ext().sparse_dense_to_csr(a)


class _OnSupport(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, k, similarity, backend, threshold, mode):
        # mode: "coactive" (never padded), "sparse" (padded, reuses the CSR) or "dense" (gram_topk)
        cosine = similarity == "cosine"
        row_ptr, cols, vals = _to_csr(a)
        if not bool(torch.isfinite(vals).all()):  # NaN/Inf are non-zeros: checking vals covers a
            check_finite(a)  # raises, naming what is wrong
        ctx.shape, ctx.dtype, ctx.cosine, ctx.gpu = a.shape, a.dtype, cosine, sparse_triton.preferred(a)
        ctx.coactive = mode == "coactive"
        if ctx.coactive:  # min(k, P) pairs, latent ids compacted (aosae.ops.coactive_topk)
            canon = _coactive.canonical(row_ptr, cols, vals, check=False)
            values, rows, cols_sel, rows_compact, cols_compact = _coactive.select(canon, k, cosine)
            ctx.save_for_backward(row_ptr, cols, canon.cols, vals, canon.uniq, values, rows_compact, cols_compact)
            ctx.mark_non_differentiable(rows, cols_sel)
            return values, rows, cols_sel
        if mode == "sparse":
            out = sparse_backend.csr_topk(row_ptr, cols, vals, a.shape[1], k, cosine)  # reuses the CSR
        else:
            out = tuple(gram_topk(a, k, similarity=similarity, backend=backend, threshold=threshold))
        values, rows, cols_sel = (t.contiguous() for t in out)
        ctx.save_for_backward(row_ptr, cols, vals, values, rows, cols_sel)
        ctx.mark_non_differentiable(rows, cols_sel)
        return values, rows, cols_sel

    @staticmethod
    def backward(ctx, grad_values, _grad_rows, _grad_cols):
        if ctx.coactive:
            row_ptr, cols, cols_compact, vals, uniq, values, rows_sel, cols_sel = ctx.saved_tensors
            canon = _coactive.Canonical(row_ptr, cols_compact, vals, None, uniq)
            grad = _coactive.support_grad(canon, grad_values, values, rows_sel, cols_sel, ctx.cosine)
            grad = _coo(grad, row_ptr, cols, ctx.shape, ctx.dtype)
        else:
            csr, pairs = ctx.saved_tensors[:3], ctx.saved_tensors[3:]
            grad = support_backward(grad_values, csr, pairs, ctx.shape, ctx.dtype, ctx.cosine, gpu=ctx.gpu)
        return grad, None, None, None, None, None


def support_backward(grad_values, csr, pairs, shape, dtype, cosine: bool, gpu: bool = False) -> torch.Tensor:
    """The gradient of the selected scores at the non-zeros of a [B, n] given as CSR
    (row_ptr, cols, vals), as a coalesced sparse COO tensor of `shape` and `dtype`.
    gpu: the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) instead of the C++ one."""
    row_ptr, cols, vals = csr
    if gpu:
        grad = sparse_triton.support_grad(row_ptr, cols, vals, shape[1], grad_values, *pairs, cosine)
    else:
        grad = _ext().gram_topk_support_backward_cpu(grad_values, row_ptr, cols, vals, *pairs, shape[1], cosine)
    return _coo(grad, row_ptr, cols, shape, dtype)


def _coo(grad, row_ptr, cols, shape, dtype) -> torch.Tensor:
    """The values grad [nnz] at the CSR's entries as a coalesced sparse COO tensor [B, n]."""
    rows = torch.arange(shape[0], device=cols.device)
    row_of = torch.repeat_interleave(rows, row_ptr[1:] - row_ptr[:-1], output_size=cols.numel())
    return torch.sparse_coo_tensor(
        torch.stack([row_of, cols]), grad.to(dtype), shape, is_coalesced=True, check_invariants=False
    )


def gram_topk_on_support(
    a: torch.Tensor,
    k: int,
    *,
    similarity: str = "dot",
    backend: str = "auto",
    threshold: torch.Tensor | None = None,
    pad: bool = True,
) -> TopKPairs:
    """gram_topk(a, k, ...) with the gradient restricted to a's non-zeros (sparse COO).

    Same arguments and the same selection as `aosae.gram_topk`; see the module docstring for
    when the gradient is exact. Raises RuntimeError where `available(a)` is False.
    pad=False (the training path): where the sparse path runs, the selection is coactive_topk's,
    min(k, P) pairs and nothing sized by k (k may then exceed n(n−1)/2); the dense kernels, picked
    only where they are cheaper (dense latents, small n), still return k slots.
    """
    n = a.shape[1] if isinstance(a, torch.Tensor) and a.dim() == 2 else 2
    if not pad and isinstance(k, int) and not isinstance(k, bool) and k > num_pairs(n):
        validate(a, num_pairs(n), similarity, backend)  # unpadded: a k above every pair means every pair
    else:
        validate(a, k, similarity, backend)
    if not available(a):
        raise RuntimeError(
            "gram_topk_on_support needs a float32/float64 CPU tensor and aosae._C built with "
            "gram_topk_support_backward_cpu, or a float16/bfloat16/float32 CUDA tensor and Triton "
            f"(got {a.dtype} on {a.device}); use aosae.gram_topk instead, "
            "or rebuild: pip install --no-build-isolation -e ."
        )
    if pad and (not torch.is_grad_enabled() or not a.requires_grad):
        return gram_topk(a, k, similarity=similarity, backend=backend, threshold=threshold)
    sparse = backend == "sparse" or (backend == "auto" and sparse_backend.prefers(a))
    if sparse:
        mode = "sparse" if pad else "coactive"
    else:
        mode, k = "dense", min(k, num_pairs(n))  # k slots (at most every pair) from the dense kernels
    return TopKPairs(*_OnSupport.apply(a, k, similarity, backend, threshold, mode))
