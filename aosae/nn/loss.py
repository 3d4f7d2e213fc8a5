"""The selective orthogonality penalty and its adaptive weight.

    penalty = Σ_{(i,j) ∈ S} |C_ij|,  C = fᵀf,  S = the k most correlated latent pairs
    τ ← clip(τ · L_target / L_recon, τ_min, τ_max)                  (AdaptiveTau)

The selection S is treated as constant in the backward pass (gram_topk's gradient
flows only through the selected values).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from aosae.ops.gram_topk import TopKPairs, gram_topk, k_for_fraction

REDUCTIONS = ("sum", "mean")


def topk_ortho_loss(
    acts: torch.Tensor,
    k: Optional[int] = None,
    *,
    fraction: float = 0.005,
    similarity: str = "dot",
    reduction: str = "sum",
    backend: str = "auto",
    threshold: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, TopKPairs]:
    """Functional penalty: Σ (or mean) of |C_ij| over the k most correlated latent pairs.

    Args:
        acts: [batch, n_latents] latent activations f (any float dtype, CPU or CUDA).
        k: pairs to penalise; default ceil(fraction · n(n−1)/2).
        fraction, similarity, backend, threshold: as in TopKOrthoLoss / gram_topk.
        reduction: "sum" (the paper) or "mean" over the non-empty selected pairs.

    Returns:
        (penalty: 0-d tensor in float32 (float64 for float64 acts), pairs: TopKPairs).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2:
        shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
        raise ValueError(f"acts must be a 2-D tensor [batch, n_latents], got {shape}")
    if k is None:
        k = k_for_fraction(acts.shape[1], fraction)
    pairs = gram_topk(acts, k, similarity=similarity, backend=backend, threshold=threshold)
    penalty = pairs.values.abs().sum()
    if reduction == "mean":
        penalty = penalty / (pairs.rows >= 0).sum().clamp_min(1)
    return penalty, pairs


class TopKOrthoLoss(nn.Module):
    """Selective orthogonality penalty Σ_{(i,j) ∈ top-k} |C_ij| as a module.

    Args:
        fraction: share of the n(n−1)/2 latent pairs to penalise (paper: 0.005).
        k: exact number of pairs instead of `fraction`.
        similarity: "dot" (the paper: raw |f_i · f_j|) or "cosine" (scale-free).
        reduction: "sum" (the paper) or "mean" over selected pairs.
        backend: gram_topk backend ("auto" picks the fastest usable one).
        warm_start: pass the previous call's k-th score to the op as a threshold hint
            (correlations drift slowly during training, so the fused kernels usually
            need a single pass). Never changes the result, only the speed.

    forward(acts [batch, n_latents]) -> 0-d penalty tensor. The last selection is kept
    in `last_pairs` for logging.
    """

    def __init__(
        self,
        fraction: float = 0.005,
        *,
        k: Optional[int] = None,
        similarity: str = "dot",
        reduction: str = "sum",
        backend: str = "auto",
        warm_start: bool = True,
    ):
        super().__init__()
        if k is None:
            k_for_fraction(2, fraction)  # validates fraction now rather than at first call
        elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if similarity not in ("dot", "cosine"):
            raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
        self.fraction, self.k, self.similarity = fraction, k, similarity
        self.reduction, self.backend, self.warm_start = reduction, backend, warm_start
        self.last_pairs: Optional[TopKPairs] = None
        self._kth: Optional[torch.Tensor] = None

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        hint = self._kth if self.warm_start else None
        penalty, pairs = topk_ortho_loss(
            acts,
            self.k,
            fraction=self.fraction,
            similarity=self.similarity,
            reduction=self.reduction,
            backend=self.backend,
            threshold=hint,
        )
        self.last_pairs = TopKPairs(*(t.detach() for t in pairs))
        self._kth = pairs.values[-1].detach().abs()
        return penalty

    def extra_repr(self) -> str:
        size = f"k={self.k}" if self.k is not None else f"fraction={self.fraction}"
        return f"{size}, similarity={self.similarity!r}, reduction={self.reduction!r}, backend={self.backend!r}"
