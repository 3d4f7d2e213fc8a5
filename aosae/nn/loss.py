"""The selective orthogonality penalty and its adaptive weight.

    penalty = Σ_{(i,j) ∈ S} |C_ij|,  C = fᵀf / B,  S = the k most correlated latent pairs
    τ ← clip(τ · L_target / L_recon, τ_min, τ_max)                  (AdaptiveTau)

One scale everywhere (trainer, ablation, adapters, examples): scale="per_token" (default)
divides the batch's co-activation by its B tokens, so the penalty sits on the same per-token
scale as the reconstruction and L1 terms and τ means the same at any batch size.
scale="batch_sum" is the paper's literal C = fᵀf (B× larger; at the paper's τ range it
collapses training, see the README's ablation). similarity="cosine" scores C's cosines, which
do not depend on B: there both scales give the same penalty.

The selection S is treated as constant in the backward pass (gram_topk's gradient
flows only through the selected values).

On the training path (forward when `auto` picks the sparse path, on_support, from_topk,
from_sparse) the selection never pads: it holds min(k, P) pairs, P = the co-active pairs with
a non-zero score (aosae.ops.coactive_topk), so its cost follows P, not k ≈ fraction·n²/2.
The penalty is the same: the padded slots held zeros.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from aosae.ops import backends, gram_topk_support
from aosae.ops.coactive_sum import coactive_sum, coactive_topk_sum
from aosae.ops.coactive_topk import coactive_topk, coactive_topk_dense
from aosae.ops.gram_topk import TopKPairs, gram_topk, k_for_fraction, kth_score

REDUCTIONS = ("sum", "mean")
SCALES = ("per_token", "batch_sum")


def check_scale_and_reduction(scale: str, reduction: str) -> None:
    if scale not in SCALES:
        raise ValueError(
            f"scale must be one of {SCALES}, got {scale!r}: 'per_token' (C = fᵀf / B, the default) or "
            "'batch_sum' (the paper's literal C = fᵀf, B times larger)"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def penalty_from_pairs(
    pairs: TopKPairs, batch: int, *, scale: str = "per_token", reduction: str = "sum", similarity: str = "dot"
) -> torch.Tensor:
    """The penalty of a selection made on a batch of `batch` tokens (pairs.values: the op's fᵀf
    scores, or cosines).

    The one place where scale and reduction are applied: gram_topk and gram_topk_sparse
    callers (TopKOrthoLoss.forward and its TopK path) all end here. The selection may be
    padded (k slots, empty ones −1) or not (coactive_topk's min(k, P)): "mean" is over the
    selected non-zero pairs either way.
    """
    penalty = pairs.values.abs().sum()  # (not vector_norm(·, 1): on CPU it sums float32 naively, 0.7 % off at 10⁷ pairs)
    if reduction == "mean":
        penalty = penalty / (pairs.rows >= 0).sum().clamp_min(1)
    return _scaled(penalty, batch, scale, similarity)


def _scaled(penalty: torch.Tensor, batch: int, scale: str, similarity: str) -> torch.Tensor:
    if scale == "per_token" and similarity == "dot":  # cosines of fᵀf / B equal those of fᵀf
        penalty = penalty / max(int(batch), 1)
    return penalty


def topk_ortho_loss(
    acts: torch.Tensor,
    k: Optional[int] = None,
    *,
    fraction: float = 0.005,
    similarity: str = "dot",
    reduction: str = "sum",
    scale: str = "per_token",
    backend: str = "auto",
    threshold: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, TopKPairs]:
    """Functional penalty: Σ (or mean) of |C_ij| over the k most correlated latent pairs.

    Args:
        acts: [batch, n_latents] latent activations f (any float dtype, CPU or CUDA).
        k: pairs to penalise; default ceil(fraction · n(n−1)/2).
        fraction, similarity, backend, threshold: as in TopKOrthoLoss / gram_topk.
        reduction: "sum" (the paper) or "mean" over the non-empty selected pairs.
        scale: "per_token" (C = fᵀf / B, default) or "batch_sum" (the paper's literal C = fᵀf).

    Returns:
        (penalty: 0-d tensor in float32 (float64 for float64 acts), pairs: TopKPairs with the
        op's raw fᵀf scores, whatever the scale).
    """
    check_scale_and_reduction(scale, reduction)
    if not isinstance(acts, torch.Tensor):
        raise TypeError(f"acts must be a torch.Tensor [batch, n_latents], got {type(acts).__name__}")
    if acts.dim() != 2:
        raise ValueError(f"acts must be a 2-D tensor [batch, n_latents], got {tuple(acts.shape)}")
    if k is None:
        k = k_for_fraction(acts.shape[1], fraction)
    pairs = gram_topk(acts, k, similarity=similarity, backend=backend, threshold=threshold)
    return penalty_from_pairs(pairs, acts.shape[0], scale=scale, reduction=reduction, similarity=similarity), pairs


class TopKOrthoLoss(nn.Module):
    """Selective orthogonality penalty Σ_{(i,j) ∈ top-k} |C_ij|, C = fᵀf / B, as a module.

    Args:
        fraction: share of the n(n−1)/2 latent pairs to penalise (paper: 0.005).
        k: exact number of pairs instead of `fraction`.
        similarity: "dot" (the paper: raw |f_i · f_j|) or "cosine" (scale-free).
        reduction: "sum" (the paper) or "mean" over selected pairs.
        scale: "per_token" (default: C = fᵀf / B, on the scale of a per-token MSE, so one τ fits
            any batch size) or "batch_sum" (the paper's literal C = fᵀf, B× larger).
        backend: gram_topk backend ("auto" picks the fastest usable one).
        warm_start: pass the previous call's k-th score to the op as a threshold hint
            (correlations drift slowly during training, so the fused kernels usually
            need a single pass; a sparse dot sum whose last batch had at least k pairs
            skips the closed form's bound). The same selection either way; a sum may
            differ in its last bits (the closed form adds in float64, the k-best sum in
            its own order).

    forward(acts [batch, n_latents]) -> 0-d penalty tensor. For logging, the last call keeps
    `last_pairs` (the selection, raw fᵀf scores: min(k, P) pairs on the sparse paths, k slots
    from the dense kernels), `last_k` (the k asked for), `last_nonzero_share` (non-zero pairs
    ÷ k) and `last_mean_abs` (the selected pairs' mean |C_ij| at this loss's scale, a detached
    0-d tensor).
    """

    def __init__(
        self,
        fraction: float = 0.005,
        *,
        k: Optional[int] = None,
        similarity: str = "dot",
        reduction: str = "sum",
        scale: str = "per_token",
        backend: str = "auto",
        warm_start: bool = True,
    ):
        super().__init__()
        if k is None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))):
            raise TypeError(f"fraction must be a number in (0, 1] (the share of latent pairs penalised, e.g. 0.005), "
                            f"got {fraction!r} ({type(fraction).__name__})")
        if k is None:
            k_for_fraction(2, fraction)  # validates fraction now rather than at first call
        elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        check_scale_and_reduction(scale, reduction)
        backends.check_name(backend)
        if similarity not in ("dot", "cosine"):
            raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
        self.fraction, self.k, self.similarity = fraction, k, similarity
        self.reduction, self.scale = reduction, scale
        self.backend, self.warm_start = backend, warm_start
        self.last_pairs: Optional[TopKPairs] = None
        self.last_k = 0
        self._kth_value: Optional[torch.Tensor] = None  # set by a checkpoint, else read off last_pairs
        self._last: Optional[tuple] = None  # (penalty, unpadded, count) of the last call, for last_mean_abs

    @property
    def last_pairs(self) -> Optional[TopKPairs]:
        """The last call's selection (detached; None before any). A call that summed every
        co-active pair without building them (aosae.ops.coactive_sum) leaves its rows instead, and
        the selection is made from them here, when first asked for."""
        pending = getattr(self, "_unselected", None)
        if pending is not None:
            offsets, indices, values, n_latents, k, similarity = pending
            with torch.no_grad():
                self._last_pairs = coactive_topk(offsets, indices, values, n_latents, k, similarity=similarity,
                                                 ordered=False)
            self._unselected = None
        return getattr(self, "_last_pairs", None)

    @last_pairs.setter
    def last_pairs(self, pairs: Optional[TopKPairs]) -> None:
        self._last_pairs, self._unselected = pairs, None

    @property
    def last_nonzero_share(self) -> float:
        """Share of the last call's k that held a pair with a non-zero score (NaN before any)."""
        if self._unselected is not None and self._last[2] is not None:  # a sum that counted its pairs
            return self._last[2] / max(1, self.last_k)
        if self.last_pairs is None:
            return float("nan")
        return int((self.last_pairs.rows >= 0).sum()) / max(1, self.last_k)

    @property
    def _kth(self) -> Optional[torch.Tensor]:
        """The last selection's k-th score (raw units; 0 when fewer than k pairs were selected): the
        next call's warm-start hint, saved in checkpoints. Computed when asked for: the training
        path's selection is unordered, and its k-th score is the smallest |value| of the k."""
        if self._kth_value is None and self.last_pairs is not None:
            self._kth_value = kth_score(self.last_pairs.values, self.last_k)
        return self._kth_value

    @_kth.setter
    def _kth(self, value: Optional[torch.Tensor]) -> None:
        self._kth_value = value

    @property
    def last_mean_abs(self) -> Optional[torch.Tensor]:
        """The last selection's mean |C_ij| at this loss's scale (detached, 0-d; None before any
        call), from the penalty's own sum: no pass over the selection when it is unpadded."""
        if self._last is None:
            return None
        penalty, unpadded, count = self._last  # sum reduction: Σ|C| at this scale, ÷ the pairs held
        if self.reduction == "mean":
            return penalty
        if count is None:
            count = self.last_pairs.values.numel() if unpadded else int((self.last_pairs.rows >= 0).sum())
        return penalty / max(count, 1)

    def _k(self, n_latents: int) -> int:
        return self.k if self.k is not None else k_for_fraction(n_latents, self.fraction)

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        """The penalty of dense latents acts [batch, n_latents]; where `backend` resolves to the
        sparse path, through coactive_topk (never padded) with gram_topk's gradient."""
        _check_acts(acts, "forward")
        backend = self.backend
        # (under torch.compile the op decides inside: resolving here would break the graph)
        if not torch.compiler.is_compiling() and isinstance(acts, torch.Tensor) and acts.dim() == 2 \
                and acts.shape[1] >= 2 and acts.shape[0] >= 1:
            backend = backends.resolve(self.backend, acts)  # once: gram_topk below need not decide again
            if backend == "sparse":  # the set is all a sum needs: unordered (no sort of k keys)
                pairs = coactive_topk_dense(acts, self._k(acts.shape[1]), similarity=self.similarity, ordered=False)
                return self._penalty(pairs, acts.shape[0], self._k(acts.shape[1]))
        hint = self._kth if self.warm_start else None
        penalty, pairs = topk_ortho_loss(
            acts,
            self.k,
            fraction=self.fraction,
            similarity=self.similarity,
            reduction=self.reduction,
            scale=self.scale,
            backend=backend,
            threshold=hint,
        )
        self._record(pairs, self._k(acts.shape[1]), penalty, unpadded=False)
        return penalty

    def on_support(self, acts: torch.Tensor) -> torch.Tensor:
        """forward(acts) for ReLU latents: the same penalty, but its gradient is kept at the
        non-zeros of acts (a sparse tensor), which is all a ReLU upstream passes on, so no dense
        [B, n_latents] gradient is built (aosae.ops.gram_topk_support). Falls back to forward()
        where that path cannot run (half precision on CPU, no aosae._C, CUDA without Triton)."""
        _check_acts(acts, "on_support")
        if not gram_topk_support.available(acts):
            return self(acts)
        k = self._k(acts.shape[1])
        pairs = gram_topk_support.gram_topk_on_support(
            acts, k, similarity=self.similarity, backend=self.backend, threshold=self._kth if self.warm_start else None,
            pad=False,
        )
        return self._penalty(pairs, acts.shape[0], k)

    def from_topk(self, indices: torch.Tensor, values: torch.Tensor, n_latents: int) -> torch.Tensor:
        """The penalty of a TopK SAE's latents given sparsely: the same value (and gradient) as
        forward(f) on the dense f [B, n_latents] with f[t, indices[t, s]] = values[t, s], through
        coactive_topk, so no [B, n_latents] tensor and nothing sized by k is built.

        indices: [B, L] int64/int32, distinct latents per row; values: [B, L] float (the kept
        activations, differentiable). `backend` and the warm-start hint do not apply: the sparse
        op enumerates every co-active pair, O(B·L²), whatever the threshold.
        """
        _check_n_latents(n_latents)
        if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise TypeError("from_topk expects indices and values as torch.Tensor")
        if indices.dim() != 2 or indices.shape != values.shape:
            raise ValueError(
                f"indices and values must both be [B, L] with the same shape, got {tuple(indices.shape)} "
                f"and {tuple(values.shape)} (one row per token, one column per kept latent); "
                "rows of different lengths (BatchTopK): use from_sparse"
            )
        batch, width = indices.shape
        offsets = torch.arange(batch + 1, device=indices.device, dtype=torch.int64) * width
        return self._sparse_penalty(offsets, indices.reshape(-1), values.reshape(-1), n_latents, batch)

    def from_sparse(self, latents, n_latents: Optional[int] = None) -> torch.Tensor:
        """The penalty of latents given as CSR rows, e.g. aosae.ops.sparse_coding.SparseLatents:
        (offsets [B+1] int64, indices [nnz], values [nnz] differentiable[, n_latents]). Rows may
        have different lengths (BatchTopK, ReLU) or be empty. The same value and gradient as
        forward(f) on the densified f, through coactive_topk. n_latents: the SAE's width (default:
        latents.n_latents)."""
        if n_latents is None:
            n_latents = getattr(latents, "n_latents", None)
        _check_n_latents(n_latents)
        try:
            if isinstance(latents, torch.Tensor):
                raise TypeError
            offsets, indices, values = tuple(latents)[:3]
        except (TypeError, ValueError):
            raise TypeError(
                "from_sparse expects (offsets, indices, values), e.g. a SparseLatents, got "
                f"{type(latents).__name__}"
            ) from None
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError("from_sparse: offsets must be a 1-D tensor [B+1] of CSR row pointers")
        return self._sparse_penalty(offsets, indices, values, n_latents, offsets.numel() - 1)

    def _sparse_penalty(self, offsets, indices, values, n_latents: int, batch: int) -> torch.Tensor:
        k = self._k(n_latents)
        if self.reduction == "sum":  # a sum needs no list of its pairs
            # k covering every co-active pair: their sum in one pass over the entries. Not tried when
            # the last batch's k-th score was > 0 (it had at least k pairs, and so, about, will this
            # one: the bound that declines it cost 0.5 ms of a TopK d_sae 16384 step); a batch with
            # fewer pairs records a k-th score of 0, and the next call tries it again. (A batch with
            # fewer pairs after one with k gets the k-best sum: the same pairs, a sum that may differ
            # from the closed form's in its last bits.)
            total = None
            if not self._had_k_pairs(values):
                total = coactive_sum(offsets, indices, values, n_latents, k, similarity=self.similarity)
            count = kth = None
            if total is None:  # else the k best, summed where they are found (C++, dot)
                found = coactive_topk_sum(offsets, indices, values, n_latents, k, similarity=self.similarity)
                if found is not None:
                    total, count, kth = found
            if total is not None:
                penalty = _scaled(total, batch, self.scale, self.similarity)
                self._record(None, k, penalty, unpadded=True, count=count)
                if kth is not None:
                    self._kth_value = torch.tensor(kth, dtype=total.dtype, device=total.device)
                # copies (nnz-sized): the caller may reuse its tensors before the pairs are asked for
                self._unselected = (offsets.clone(), indices.clone(), values.detach().clone(), n_latents, k,
                                    self.similarity)
                return penalty
        # the set is all a sum needs: unordered (no sort of k keys)
        pairs = coactive_topk(offsets, indices, values, n_latents, k, similarity=self.similarity, ordered=False)
        return self._penalty(pairs, batch, k)

    def _had_k_pairs(self, values) -> bool:
        """Whether the last call's k-best sum (warm start, dot: the k-th score it recorded itself)
        found at least k pairs: its k-th score is > 0. Read on the CPU only, where reading it back
        costs nothing."""
        kth = self._kth_value
        return (self.warm_start and self.similarity == "dot" and isinstance(kth, torch.Tensor)
                and isinstance(values, torch.Tensor) and values.device.type == "cpu" and kth.device.type == "cpu"
                and kth.numel() == 1 and float(kth) > 0)

    def _penalty(self, pairs: TopKPairs, batch: int, k: int) -> torch.Tensor:
        """The penalty of an unpadded selection, recorded for logging and the next hint."""
        penalty = penalty_from_pairs(pairs, batch, scale=self.scale, reduction=self.reduction,
                                     similarity=self.similarity)
        self._record(pairs, k, penalty, unpadded=True)
        return penalty

    def _record(self, pairs: TopKPairs, k: int, penalty: torch.Tensor, unpadded: bool,
                count: Optional[int] = None) -> None:
        """Keep the selection for logging; its k-th score (the next hint, `_kth`) and mean |C_ij|
        (`last_mean_abs`) are derived from it and from the penalty only when asked for. count:
        the pairs summed, when a call knows it without the selection."""
        self.last_pairs = None if pairs is None else TopKPairs(*(t.detach() for t in pairs))
        self.last_k = k
        self._kth_value = None
        self._last = (penalty.detach(), unpadded, count)

    def extra_repr(self) -> str:
        size = f"k={self.k}" if self.k is not None else f"fraction={self.fraction}"
        return (
            f"{size}, similarity={self.similarity!r}, reduction={self.reduction!r}, scale={self.scale!r}, "
            f"backend={self.backend!r}"
        )


def _check_acts(acts, method: str) -> None:
    """TopKOrthoLoss.forward / on_support's latents: a dense 2-D tensor on a real device (the
    dtype, NaN/Inf and sizes are checked by the op)."""
    if not isinstance(acts, torch.Tensor):
        raise TypeError(f"{method} expects acts as a torch.Tensor [batch, n_latents], got {type(acts).__name__}: "
                        "convert with torch.as_tensor")
    if acts.layout != torch.strided:
        raise TypeError(f"{method} expects dense acts [batch, n_latents], got a {str(acts.layout).removeprefix('torch.')} "
                        "tensor: use acts.to_dense(), or from_topk / from_sparse for sparse latents")
    if acts.dim() != 2:
        raise ValueError(f"{method} expects acts as a 2-D tensor [batch, n_latents], got shape {tuple(acts.shape)}: "
                         "reshape to (-1, n_latents)")
    if acts.device.type == "meta":
        raise ValueError(f"{method} got acts on the meta device (a shape without values): the penalty needs the "
                         "values; pass acts on cpu or cuda")


def _check_n_latents(n_latents) -> None:
    if isinstance(n_latents, bool) or not isinstance(n_latents, int):
        raise TypeError(f"n_latents must be an int (the SAE's d_sae), got {type(n_latents).__name__}")
